"""Control connections: accepting, admitting by SO_PEERCRED, reading frames,
handing them to ``handlers.py``, and closing a connection with its reason.

A malformed frame, or any error one frame triggers, closes that worker's
connection with a logged reason, never the manager.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from sharedpool import protocol, stat_keys
from sharedpool.protocol import ErrorCode, FrameType

if TYPE_CHECKING:
    from sharedpool.manager.context import ManagerContext

log = logging.getLogger("sharedpool.manager")

_PEERCRED = struct.Struct("3i")
_FRAMES_PER_WAKEUP = 16
# After EMFILE, stop watching the listener this long (else: a busy loop).
_ACCEPT_BACKOFF = 0.5


class PeerState(enum.Enum):
    HANDSHAKE = "handshake"
    READY = "ready"
    CLOSED = "closed"


class Peer:
    """One accepted control connection (one per worker process, plus one-shot admin ones)."""

    __slots__ = ("sock", "pid", "uid", "state", "accepted_at", "label")

    def __init__(self, sock: socket.socket, pid: int, uid: int, now: float) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.state = PeerState.HANDSHAKE
        self.accepted_at = now
        self.label = f"pid {pid} uid {uid}"


class ControlServer:
    """Every control connection the manager has, by state."""

    def __init__(
        self, manager: ManagerContext, handlers: Mapping[int, Callable[[ManagerContext, Peer, int, bytes], None]]
    ) -> None:
        self._manager = manager
        self._handlers = handlers
        self.clients: dict[int, Peer] = {}  # socket fd -> client past HELLO
        self.handshaking: set[Peer] = set()

    def __len__(self) -> int:
        return len(self.clients) + len(self.handshaking)

    def handshake_deadline(self) -> float | None:
        if not self.handshaking:
            return None
        return min(c.accepted_at for c in self.handshaking) + self._manager.config.handshake_timeout

    def channels_by_pid(self) -> dict[int, int]:
        channels: dict[int, int] = {}
        for client in self.clients.values():
            channels[client.pid] = channels.get(client.pid, 0) + 1
        return channels

    def on_accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The pending connection keeps the listener readable:
                    # stop watching it for a while instead of spinning.
                    log.error(
                        "cannot accept control connections (%s); pausing accepts for %.1f s", exc.strerror, _ACCEPT_BACKOFF
                    )
                    self._manager.pause_accepts(_ACCEPT_BACKOFF)
                    return
                continue
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        config = self._manager.config
        sock.setblocking(False)
        pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if pid == 0:
            log.warning("control connection from a process outside our pid namespace (uid %d): "
                        "it can be reaped only when its socket closes", uid)
        refusal: tuple[ErrorCode, str] | None = None
        if uid not in {os.getuid(), *config.allowed_uids}:
            log.warning("refused control connection from pid %d uid %d: uid not in allowed_uids", pid, uid)
            refusal = ErrorCode.FORBIDDEN, f"uid {uid} is not allowed to use pool {config.pool_name!r}"
        elif len(self) >= config.max_clients:
            log.warning("refused control connection from pid %d: max_clients (%d) reached", pid, config.max_clients)
            refusal = ErrorCode.TOO_MANY_CLIENTS, f"manager has max_clients={config.max_clients} control connections"
        if refusal is not None:
            self._manager.counters[stat_keys.CLIENTS_REFUSED] += 1
            _refuse(sock, *refusal)
            return
        self._manager.counters[stat_keys.CLIENTS_ACCEPTED] += 1
        client = Peer(sock, pid, uid, time.monotonic())
        self.handshaking.add(client)
        self._manager.watch(sock.fileno(), lambda: self._on_readable(client))

    def admitted(self, client: Peer) -> None:
        """HELLO accepted: the client may send every other frame."""
        client.state = PeerState.READY
        self.handshaking.discard(client)
        self.clients[client.sock.fileno()] = client

    def expire_handshakes(self, now: float) -> None:
        limit = self._manager.config.handshake_timeout
        for client in [c for c in self.handshaking if now - c.accepted_at >= limit]:
            self.send(client, protocol.encode_error(ErrorCode.NOT_READY, f"no HELLO within {limit:.1f} s"))
            self.drop(client, "handshake timeout")

    def drop_pid(self, pid: int, reason: str) -> None:
        for client in [c for c in self.clients.values() if c.pid == pid]:
            self.drop(client, reason, sweep=False)

    def close_all(self, reason: str) -> None:
        for client in list(self.clients.values()) + list(self.handshaking):
            self.drop(client, reason, sweep=False)

    def drop(self, client: Peer, reason: str, sweep: bool = True) -> None:
        if client.state is PeerState.CLOSED:
            return
        was_ready = client.state is PeerState.READY
        client.state = PeerState.CLOSED
        self.handshaking.discard(client)
        fd = client.sock.fileno()
        self.clients.pop(fd, None)
        self._manager.unwatch(fd)
        client.sock.close()
        log.debug("control connection of %s closed (%s)", client.label, reason)
        if was_ready and not any(c.pid == client.pid for c in self.clients.values()):
            self._manager.pool.forget_sites(client.pid)
            if sweep:
                # The process may be gone: a lease it held shows as a row
                # HELD with a free lock. Look at its rows now rather than at
                # the next sweep.
                self._manager.reaper.sweep(time.monotonic(), only_pid=client.pid)

    def send(self, client: Peer, frame: bytes) -> bool:
        try:
            client.sock.send(frame)
            return True
        except BlockingIOError:
            # SEQPACKET send buffers hold hundreds of our frames: a full one
            # means the worker stopped reading. It cannot be served.
            self.drop(client, "not reading its replies")
        except OSError as exc:
            self.drop(client, f"send failed ({exc.strerror or exc})")
        return False

    def _on_readable(self, client: Peer) -> None:
        # Frames that arrive together are handled in one wake-up, up to a
        # bound, so one busy worker cannot starve the others.
        for _ in range(_FRAMES_PER_WAKEUP):
            if client.state is PeerState.CLOSED:
                return
            try:
                data, _anc, flags, _addr = client.sock.recvmsg(protocol.MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.drop(client, f"read failed ({exc.strerror or exc})")
                return
            if not data:
                self.drop(client, "closed by peer")
                return
            self._on_frame(client, data, flags)

    def _on_frame(self, client: Peer, data: bytes, flags: int) -> None:
        request_id = 0
        try:
            protocol.check_recv_flags(flags)
            version, frame_type, request_id, body = protocol.split(data)
            if version not in protocol.SUPPORTED_VERSIONS:
                self._refuse_version(client, version, request_id)
                return
            handler = self._handlers.get(frame_type)
            if handler is None:
                self.send(client, protocol.encode_error(
                    ErrorCode.UNSUPPORTED, f"frame type {frame_type} is not supported", request_id))
                return
            if client.state is PeerState.HANDSHAKE and frame_type != FrameType.HELLO:
                self.send(client, protocol.encode_error(ErrorCode.NOT_READY, "the first frame must be HELLO", request_id))
                self.drop(client, f"frame type {frame_type} before HELLO")
                return
            handler(self._manager, client, request_id, body)
        except protocol.ProtocolError as exc:
            log.warning("malformed frame from %s: %s; closing its connection", client.label, exc)
            self._close_for_frame(client, ErrorCode.MALFORMED, str(exc), request_id, "malformed frame")
        except Exception:
            # One worker's frame must never take the manager down: whatever
            # it triggered, only that worker's connection pays.
            log.exception("internal error handling a frame from %s; closing its connection", client.label)
            self._close_for_frame(client, ErrorCode.INTERNAL, "internal error; see the manager log", request_id, "internal error")

    def _close_for_frame(self, client: Peer, code: ErrorCode, message: str, request_id: int, reason: str) -> None:
        self._manager.counters[stat_keys.PROTOCOL_ERRORS] += 1
        if client.state is not PeerState.CLOSED:
            self.send(client, protocol.encode_error(code, message, request_id))
            self.drop(client, reason)

    def _refuse_version(self, client: Peer, version: int, request_id: int) -> None:
        message = (
            f"this manager speaks sharedpool protocol {protocol.VERSION}, the client speaks {version}: "
            f"run the same sharedpool version in the workers as in the manager"
        )
        if version == 1:
            self.send(client, protocol.encode_v1_refusal(message))
        else:
            self.send(client, protocol.encode_error(ErrorCode.VERSION, message, request_id))
        self.drop(client, f"unsupported protocol version {version}")


def _refuse(sock: socket.socket, code: ErrorCode, message: str) -> None:
    try:
        sock.send(protocol.encode_error(code, message))
        # Closing with the peer's HELLO unread would reset the connection
        # before the peer reads our reason: read what has arrived first.
        for _ in range(4):
            if not sock.recv(protocol.MAX_FRAME):
                break
    except OSError:
        pass
    sock.close()
