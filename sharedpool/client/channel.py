"""A worker process's control connection to the manager.

One channel per process, shared by its threads under a lock: with the lease
table, a lease takes no frame, so the channel carries only the rare
requests (a first fd, a slot to open, a report, stats) and a thread per
request costs no connection (issue 12: thousands of short-lived threads).

Every request carries an id and every wait has a deadline. A reply whose
asker gave up (a signal handler raised while it waited) is dropped when it
arrives, never read as the answer to the next request, and any fd it
carried is closed. A channel belongs to the process that opened it: after a
fork the child never touches it (DESIGN fact 5).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, cast

from sharedpool import errors, protocol
from sharedpool.protocol import FrameType
from sharedpool.shell.frames import ChannelReplies, close_fds, explain_connect_error
from sharedpool.shell.links import ConnectRetry
from sharedpool.version import __version__

log = logging.getLogger("sharedpool.client")

class ControlChannel(ChannelReplies):
    """One control connection. ``welcome`` and ``table_fd`` come from the handshake."""

    def __init__(self, socket_path: str, connect_timeout: float = 5.0, reply_timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.reply_timeout = reply_timeout
        timeout = connect_timeout
        self.pid = os.getpid()
        self.closed = False
        self.table_fd = -1
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        started = time.monotonic()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(max(0.001, timeout))
        try:
            sock.connect(socket_path)
        except OSError as exc:
            sock.close()
            raise errors.ManagerUnavailable(explain_connect_error(socket_path, exc)) from None
        self.sock = sock
        try:
            try:
                sock.send(protocol.encode_json(FrameType.HELLO, {"pid": self.pid, "client": f"sharedpool/{__version__}"}))
            except OSError:
                pass  # refused and closed at once: the reason may still be waiting to be read
            frame_type, _rid, body, fd = self._read(started + timeout, want_fd=True)
            self._take_welcome(frame_type, body, fd)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<ControlChannel {self.socket_path} pid={self.pid} {'closed' if self.closed else 'open'}>"

    # ----- requests ----------------------------------------------------------

    def call(
        self, frame_type: FrameType, body: bytes, reply_type: FrameType, timeout: float, want_fd: bool = False
    ) -> tuple[bytes, int | None]:
        """Send a request and wait for its own reply, at most ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            raise errors.ManagerUnavailable(
                f"manager at {self.socket_path}: another thread's request did not finish within {timeout:.2f} s"
            )
        try:
            request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            self._send(protocol.header(frame_type, request_id) + body)
            while True:
                got_type, got_id, got_body, fd = self._read(deadline, want_fd)
                if got_id != request_id:
                    # The answer to a request whose asker gave up: drop it.
                    if fd is not None:
                        os.close(fd)
                    continue
                return self._reply(got_type, got_body, fd, reply_type, want_fd)
        finally:
            self._lock.release()

    def request(self, frame: bytes, reply_type: FrameType, timeout: float | None = None) -> dict[str, Any]:
        """Send an encoded frame (its request id is set here); return the JSON reply."""
        _version, frame_type, _rid, body = protocol.split(frame)
        reply, _fd = self.call(FrameType(frame_type), body, reply_type, self.reply_timeout if timeout is None else timeout)
        return protocol.decode_json(reply) if reply else {}

    def notify(self, frame: bytes) -> None:
        """Send a frame that gets no reply. A dead manager is not an error here:
        the next one repairs from the table, or the channel's EOF said enough."""
        if self.closed:
            return
        if not self._lock.acquire(timeout=1.0):
            return
        try:
            self.sock.send(frame)
        except OSError:
            pass
        finally:
            self._lock.release()

    def ping(self, timeout: float | None = None) -> float:
        started = time.monotonic()
        self.call(FrameType.PING, b"", FrameType.PONG, self.reply_timeout if timeout is None else timeout)
        return time.monotonic() - started

    def __del__(self) -> None:
        # A pool dropped without disconnect() (redis.Redis(connection_pool=...)
        # never closes a pool it was given): close quietly, as redis-py's
        # connections do, rather than leave the socket to a ResourceWarning.
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Close our end. Only ever called in the process that opened it."""
        if not self.closed:
            self.closed = True
            self.sock.close()
            if self.table_fd >= 0:
                os.close(self.table_fd)
                self.table_fd = -1

    def abandon(self) -> None:
        """Drop the fds in a forked child without telling the manager anything.

        ``close()`` on an inherited descriptor only drops the child's
        reference; the parent's connection is untouched.
        """
        self.closed = True
        self._lock = threading.Lock()  # a parent thread may have held it at fork
        for close in (self.sock.close, lambda: os.close(self.table_fd) if self.table_fd >= 0 else None):
            try:
                close()
            except OSError:
                pass
        self.table_fd = -1

    # ----- frames --------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        if self.closed:
            raise errors.ManagerUnavailable(f"control connection to {self.socket_path} is closed")
        try:
            self.sock.send(frame)
        except OSError as exc:
            self.close()
            raise errors.ManagerUnavailable(f"manager at {self.socket_path} went away ({exc.strerror or exc})") from None

    def _read(self, deadline: float, want_fd: bool) -> tuple[int, int, bytes, int | None]:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._silent()
            self.sock.settimeout(remaining)
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(protocol.MAX_FRAME, protocol.FD_ANCILLARY_SPACE, protocol.RECV_FLAGS)
            except TimeoutError:
                raise self._silent() from None
            except OSError as exc:
                self.close()
                raise errors.ManagerUnavailable(f"manager at {self.socket_path} went away ({exc.strerror or exc})") from None
            frame_type, request_id, body, fds = self._frame(data, ancdata, flags)
            if frame_type in protocol.UNSOLICITED_TYPES:
                close_fds(fds)
                continue  # a newer manager's notice we do not know
            if len(fds) > (1 if want_fd else 0):
                close_fds(fds)
                raise self._broken(f"frame type {frame_type} carried {len(fds)} fds")
            return frame_type, request_id, body, (fds[0] if fds else None)

    def _fail(self, error: errors.SharedPoolError) -> errors.SharedPoolError:
        self.close()
        return error


def sync_channel(att: Any) -> ControlChannel:
    """A sync pool's attachment's channel, with its blocking requests (the attachment types it by its sync surface)."""
    return cast(ControlChannel, att.channel)


def open_channel(socket_path: str, deadline: float) -> ControlChannel:
    """Connect, retrying while no manager answers, until ``deadline``."""
    retry = ConnectRetry(deadline)
    while True:
        try:
            return ControlChannel(socket_path, connect_timeout=retry.timeout())
        except errors.ManagerUnavailable as exc:
            time.sleep(retry.failed(exc))
