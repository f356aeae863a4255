"""A worker's control connection to the manager.

Each thread of a worker process owns one channel (see ``pool.py``), so a
thread blocked waiting for a grant never holds anything another thread
needs. A channel belongs to the process that opened it: after a fork the
child never touches it (DESIGN fact 5).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from sharedpool import __version__, errors, protocol
from sharedpool.protocol import ErrorCode, FrameType, Grant, Outcome

log = logging.getLogger("sharedpool.client")

# Beyond the manager's own acquire deadline, how long to wait for its
# answer before deciding the manager is hung.
_REPLY_MARGIN = 5.0

_ERRORS: dict[int, type[errors.SharedPoolError]] = {
    ErrorCode.TIMEOUT: errors.PoolTimeout,
    ErrorCode.POOL_FULL: errors.PoolFull,
    ErrorCode.REDIS_UNAVAILABLE: errors.RedisUnavailable,
    ErrorCode.SHUTTING_DOWN: errors.ShuttingDown,
    ErrorCode.FORBIDDEN: errors.Forbidden,
    ErrorCode.VERSION: errors.ProtocolMismatch,
    ErrorCode.TOO_MANY_CLIENTS: errors.ManagerUnavailable,
    ErrorCode.UNKNOWN_LEASE: errors.LeaseLost,
}


class ControlChannel:
    def __init__(
        self,
        socket_path: str,
        connect_timeout: float = 5.0,
        reply_timeout: float | None = 30.0,
        role: str = "",
        on_recall: Callable[[int], None] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.pid = os.getpid()
        self.closed = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            sock.close()
            raise errors.ManagerUnavailable(_connect_problem(socket_path, exc)) from None
        self.sock = sock
        self._reply_timeout = reply_timeout
        # lease id -> why the manager took it back (REVOKED frames)
        self.revoked: dict[int, str] = {}
        self._on_recall = on_recall
        try:
            try:
                hello: dict[str, Any] = {"pid": self.pid, "client": f"sharedpool/{__version__}"}
                if role:
                    hello["role"] = role
                sock.send(protocol.encode_json(FrameType.HELLO, hello))
            except OSError:
                pass  # refused and closed at once: the reason may still be waiting to be read
            frame_type, body, _fd = self._read(expect_fd=False)
        except BaseException:
            self.close()
            raise
        if frame_type != FrameType.WELCOME:
            error = self._unexpected(frame_type, body, "WELCOME")
            self.close()
            raise error
        self.welcome: dict[str, Any] = protocol.decode_json(body)
        self.epoch = str(self.welcome.get("epoch", ""))
        sock.settimeout(reply_timeout)

    def __del__(self) -> None:
        # A thread that ended takes its channel with it; closing our fd is
        # what tells the manager (EOF), and is harmless in a forked child.
        sock = getattr(self, "sock", None)
        if sock is not None and not getattr(self, "closed", True):
            self.closed = True
            sock.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<ControlChannel {self.socket_path} pid={self.pid} {state}>"

    # ----- requests --------------------------------------------------------

    def acquire(self, timeout_ms: int, where: str = "") -> tuple[Grant, int | None]:
        """Ask for a lease; return the grant and the fd it carried, if any."""
        self._send(protocol.encode_acquire(timeout_ms, where))
        frame_type, body, fd = self._read(expect_fd=True)
        if frame_type == FrameType.GRANT:
            grant = protocol.decode_grant(body)
            if grant.has_fd and fd is None:
                raise self._broken("GRANT announced an fd but carried none")
            return grant, fd
        raise self._unexpected(frame_type, body, "GRANT")

    def fetch_fd(self, lease_id: int) -> int:
        self._send(protocol.encode_fetch_fd(lease_id))
        frame_type, body, fd = self._read(expect_fd=True)
        if frame_type == FrameType.GRANT and fd is not None:
            return fd
        raise self._unexpected(frame_type, body, "GRANT with an fd")

    def release(self, lease_id: int, outcome: Outcome) -> None:
        """Fire and forget: a refusal comes back later as an ERROR and is logged."""
        if self.closed:
            return
        frame = protocol.encode_release(lease_id, outcome)
        try:
            self.sock.send(frame)
        except BlockingIOError:
            # The owner thread has the socket non-blocking for a moment
            # (poll_unsolicited): wait until it can take the frame.
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLOUT)
            poller.poll(1000)
            try:
                self.sock.send(frame)
            except OSError:
                pass
        except OSError:
            # The manager is gone; it reclaims the lease when it sees our EOF.
            # Not closed here: this may be the notify thread, and the owner
            # thread may be reading this socket; the owner finds out itself.
            pass

    def request(self, frame: bytes, reply_type: FrameType) -> dict[str, Any]:
        self._send(frame)
        frame_type, body, _fd = self._read(expect_fd=False)
        if frame_type == reply_type:
            return protocol.decode_json(body) if body else {}
        raise self._unexpected(frame_type, body, reply_type.name)

    def listen(self) -> None:
        """Read unsolicited frames until the channel ends (the notify thread's loop)."""
        while True:
            self._read(expect_fd=False)

    def wake_and_close(self) -> None:
        """End a channel another thread is blocked reading (``listen``).

        Only for the notify channel of this very process: ``shutdown()``
        wakes the reader, which ``close()`` alone does not.
        """
        if not self.closed:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.close()

    def ping(self) -> float:
        started = time.monotonic()
        self._send(protocol.encode_empty(FrameType.PING))
        frame_type, body, _fd = self._read(expect_fd=False)
        if frame_type != FrameType.PONG:
            raise self._unexpected(frame_type, body, "PONG")
        return time.monotonic() - started

    def close(self) -> None:
        """Close our end. Only ever called in the process that opened it."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    def abandon(self) -> None:
        """Drop the fd in a forked child without telling the manager anything.

        ``close()`` on an inherited descriptor only drops the child's
        reference; the parent's connection and leases are untouched.
        """
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    # ----- frames ----------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        if self.closed:
            raise errors.ManagerUnavailable(f"control connection to {self.socket_path} is closed")
        try:
            self.sock.send(frame)
        except OSError as exc:
            self.close()
            raise errors.ManagerUnavailable(
                f"manager at {self.socket_path} went away ({exc.strerror or exc})"
            ) from None

    def poll_unsolicited(self) -> None:
        """Read, without waiting, what the manager sent unprompted (REVOKED notices)."""
        if self.closed:
            return
        # A socket with a timeout polls before every recv, MSG_DONTWAIT or
        # not: only non-blocking mode makes this return at once.
        self.sock.setblocking(False)
        try:
            while True:
                self._read(expect_fd=False)
        except (BlockingIOError, errors.SharedPoolError):
            pass
        finally:
            if not self.closed:
                self.sock.settimeout(self._reply_timeout)

    def _read(self, expect_fd: bool) -> tuple[int, bytes, int | None]:
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(protocol.MAX_FRAME, protocol.FD_ANCILLARY_SPACE)
            except BlockingIOError:
                raise
            except socket.timeout:
                self.close()
                raise errors.ManagerUnavailable(
                    f"manager at {self.socket_path} did not answer within {self._reply_timeout} s"
                ) from None
            except OSError as exc:
                self.close()
                raise errors.ManagerUnavailable(
                    f"manager at {self.socket_path} went away ({exc.strerror or exc})"
                ) from None
            fds = protocol.fds_from_ancillary(ancdata)
            if not data:
                _close_fds(fds)
                self.close()
                raise errors.ManagerUnavailable(f"manager at {self.socket_path} closed the control connection")
            try:
                protocol.check_recv_flags(flags)
                version, frame_type, body = protocol.split(data)
            except protocol.ProtocolError as exc:
                _close_fds(fds)
                raise self._broken(str(exc)) from None
            if frame_type in protocol.UNSOLICITED_TYPES:
                _close_fds(fds)
                if frame_type == FrameType.REVOKED:
                    lease_id, message = protocol.decode_revoked(body)
                    self.revoked[lease_id] = message
                    log.warning("%s", message)
                elif frame_type == FrameType.RECALL and self._on_recall is not None:
                    self._on_recall(protocol.decode_recall(body))
                continue  # others: a newer manager's frame we do not know
            if frame_type == FrameType.ERROR:
                error = protocol.decode_error(body)
                if error.code == ErrorCode.RELEASE_REFUSED:
                    log.warning("manager refused release of lease %d: %s", error.lease_id, error.message)
                    _close_fds(fds)
                    continue
            if len(fds) > (1 if expect_fd else 0):
                _close_fds(fds)
                raise self._broken(f"frame type {frame_type} carried {len(fds)} fds")
            return frame_type, body, (fds[0] if fds else None)

    def _broken(self, why: str) -> errors.SharedPoolError:
        self.close()
        return errors.ProtocolMismatch(f"control connection to {self.socket_path} broken: {why}")

    def _unexpected(self, frame_type: int, body: bytes, wanted: str) -> errors.SharedPoolError:
        if frame_type == FrameType.ERROR:
            error = protocol.decode_error(body)
            if error.code in (ErrorCode.MALFORMED, ErrorCode.NOT_READY, ErrorCode.VERSION, ErrorCode.TOO_MANY_CLIENTS, ErrorCode.FORBIDDEN):
                self.close()
            return _ERRORS.get(error.code, errors.SharedPoolError)(error.message)
        return self._broken(f"expected {wanted}, got frame type {frame_type}")


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _connect_problem(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        why = "no socket file there"
    elif exc.errno == errno.ECONNREFUSED:
        why = "socket file exists but no manager is listening (stale)"
    elif exc.errno == errno.EACCES:
        why = "permission denied"
    else:
        why = exc.strerror or str(exc)
    return (
        f"no sharedpool manager at {path}: {why}. Start one with "
        f"'sharedpool serve --socket-path {path}' or set SHAREDPOOL_SOCKET"
    )
