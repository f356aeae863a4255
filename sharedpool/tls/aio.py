"""The record layer under an asyncio stream, for ``sharedpool.asyncio``.

redis-py's asyncio connection reads a ``StreamReader`` and writes a
``StreamWriter``. Here the protocol under the reader opens records before
the reader sees a byte, and the writer seals what redis-py writes, so the
asyncio client (autopipelining included) runs on the same ``RecordLayer``
as the sync one. A record that cannot be trusted sets the reader's
exception: redis-py's next read raises ``TLSRecordError`` and the lease
ends broken.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from sharedpool.errors import TLSRecordError
from sharedpool.tls.keys import Handover
from sharedpool.tls.records import RecordLayer
from sharedpool.tls.row import RowSeqs


class TLSState:
    """One asyncio connection's keys, record layer and row."""

    __slots__ = ("handover", "layer", "seqs")

    def __init__(self, handover: Handover, seqs: RowSeqs) -> None:
        self.handover = handover
        self.layer = handover.layer()
        self.seqs = seqs

    def __repr__(self) -> str:
        return f"<TLSState {self.layer!r}>"

    def take_up(self) -> None:
        self.layer.set_seqs(*self.seqs.load())

    def write_back(self) -> None:
        if not self.layer.broken:
            self.seqs.store(self.layer.send_seq, self.layer.recv_seq)

    def fresh(self) -> TLSState:
        """The same keys with a record state of its own (a dup of the fd)."""
        return TLSState(self.handover, self.seqs)


class _Protocol(asyncio.StreamReaderProtocol):
    def __init__(self, reader: asyncio.StreamReader, layer: RecordLayer) -> None:
        super().__init__(reader)
        self._reader = reader
        self._layer = layer

    def data_received(self, data: bytes) -> None:
        layer = self._layer
        try:
            layer.feed(data)
        except TLSRecordError as exc:
            self._reader.set_exception(exc)
            return
        plain = layer.take(1 << 30)
        if plain:
            super().data_received(plain)


class _Writer(asyncio.StreamWriter):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol, reader: asyncio.StreamReader,
                 loop: asyncio.AbstractEventLoop, layer: RecordLayer) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._layer = layer

    def write(self, data: Any) -> None:
        self.transport.write(self._layer.seal(data))

    def writelines(self, data: Any) -> None:
        self.write(b"".join(bytes(chunk) for chunk in data))


async def open_stream(sock: socket.socket, state: TLSState, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = _Protocol(reader, state.layer)
    transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    return reader, _Writer(transport, protocol, reader, loop, state.layer)
