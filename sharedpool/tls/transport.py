"""``TLSSocket``: a socket-shaped object that speaks TLS records over a plain socket.

redis-py reads and writes a connection's ``_sock`` through a handful of
socket methods (``recv``, ``recv_into``, ``sendall``, ``settimeout``...).
This object offers those over the raw TCP socket (the manager's, or a
worker's dup of the passed fd), encrypting and decrypting with a
``RecordLayer``, so redis-py's own parsers, pipelines and pub/sub run
unchanged. Timeouts are the raw socket's: a record cut by a timeout stays
buffered and is finished by the next read, as with a plain socket.
"""

from __future__ import annotations

import mmap
import os
import socket
from typing import Any

from sharedpool.tls.keys import Handover
from sharedpool.tls.records import RecordLayer
from sharedpool.tls.row import RowSeqs

_READ_SIZE = 65536


class TLSSocket:
    __slots__ = ("raw", "layer", "seqs", "handover")

    def __init__(self, raw: socket.socket, layer: RecordLayer, seqs: RowSeqs | None = None,
                 handover: Handover | None = None) -> None:
        self.raw = raw
        self.layer = layer
        self.seqs = seqs
        self.handover = handover

    @classmethod
    def handed_over(cls, raw: socket.socket, handover: bytes, table_map: mmap.mmap, slot: int) -> TLSSocket:
        """A worker's transport on the fd and hand-over of an FD frame; its sequence numbers from the row."""
        keys = Handover.decode(handover)
        return cls(raw, keys.layer(), RowSeqs(table_map, slot), keys)

    def dup_for_lease(self) -> TLSSocket:
        """Another object on a dup of the fd, with the same keys and its own record state."""
        assert self.handover is not None and self.seqs is not None
        return TLSSocket(socket.socket(fileno=os.dup(self.raw.fileno())), self.handover.layer(), self.seqs, self.handover)

    def __repr__(self) -> str:
        return f"<TLSSocket fd={self.fileno()} {self.layer!r}>"

    # ----- the lease's two steps -------------------------------------------

    def take_up(self) -> None:
        """At the start of a lease (or of the manager's own work): the row's sequence numbers."""
        if self.seqs is not None:
            self.layer.set_seqs(*self.seqs.load())

    def write_back(self) -> None:
        """Before the lock is given up: this holder's sequence numbers, for the next one."""
        if self.seqs is not None and not self.layer.broken:
            self.seqs.store(self.layer.send_seq, self.layer.recv_seq)

    def pending(self) -> int:
        return self.layer.pending()

    # ----- what redis-py calls ---------------------------------------------

    def sendall(self, data: Any, flags: int = 0) -> None:
        try:
            self.raw.sendall(self.layer.seal(data))
        except (ConnectionResetError, BrokenPipeError):
            self._explain_reset()
            raise

    def _explain_reset(self) -> None:
        """A server that refuses us (a client certificate missing) sends an alert, then resets:
        the alert may still be readable, and says why better than the reset does."""
        try:
            pending = self.raw.recv(_READ_SIZE, socket.MSG_DONTWAIT)
        except OSError:
            return
        if pending:
            self.layer.feed(pending)  # raises TLSRecordError naming the alert

    def send(self, data: Any, flags: int = 0) -> int:
        self.sendall(data)
        return len(data)

    def recv(self, size: int, flags: int = 0) -> bytes:
        layer = self.layer
        if flags & socket.MSG_PEEK:
            # hiredis asks whether the peer closed; answer from what we hold first.
            return bytes(layer._plain[:size]) if layer._plain else self.raw.recv(size, flags)
        while True:
            data = layer.take(size)
            if data:
                return data
            raw = self.raw.recv(_READ_SIZE)
            if not raw:
                return b""
            layer.feed(raw)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data)

    def settimeout(self, value: float | None) -> None:
        self.raw.settimeout(value)

    def gettimeout(self) -> float | None:
        return self.raw.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self.raw.setblocking(flag)

    def fileno(self) -> int:
        return self.raw.fileno()

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        self.raw.close()

    def getsockname(self) -> Any:
        return self.raw.getsockname()

    def getpeername(self) -> Any:
        return self.raw.getpeername()

    def setsockopt(self, *args: Any) -> None:
        self.raw.setsockopt(*args)
