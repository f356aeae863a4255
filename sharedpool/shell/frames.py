"""The control channel's frames and replies, as both shells' channels read them.

``ChannelReplies`` is what the sync ``client.channel.ControlChannel`` and
the asyncio ``asyncio.channel.AsyncControlChannel`` make of what the
manager sends: a received datagram checked into a frame, the WELCOME, a
request's reply, or the error to raise, closing the channel first when
nothing more can come of it. How they wait for a frame (a blocking
``recvmsg``, a loop's reader) is theirs.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from sharedpool import errors, protocol
from sharedpool.protocol import ErrorCode, FrameType

_ERRORS: dict[int, type[errors.SharedPoolError]] = {
    ErrorCode.REDIS_UNAVAILABLE: errors.RedisUnavailable,
    ErrorCode.SHUTTING_DOWN: errors.ShuttingDown,
    ErrorCode.FORBIDDEN: errors.Forbidden,
    ErrorCode.VERSION: errors.ProtocolMismatch,
    ErrorCode.TOO_MANY_CLIENTS: errors.ManagerUnavailable,
    ErrorCode.STALE: errors.StaleSlot,
}
# Errors after which the manager closes its end: so do we.
_FATAL = frozenset({ErrorCode.MALFORMED, ErrorCode.NOT_READY, ErrorCode.VERSION, ErrorCode.TOO_MANY_CLIENTS, ErrorCode.FORBIDDEN})


class ChannelReplies:
    """What a channel makes of the manager's answers, sync and asyncio alike: the reply, or
    the error to raise (closing the channel first when nothing more can come of it).

    The class supplies ``_fail``: close, failing whatever still waits with the error.
    """

    socket_path: str
    table_fd: int
    welcome: dict[str, Any]

    def _fail(self, error: errors.SharedPoolError) -> errors.SharedPoolError:
        raise NotImplementedError

    def _frame(self, data: bytes, ancdata: Any, flags: int) -> Received:
        """What ``recvmsg`` got, checked into a frame. Raises (the channel closed) at the
        manager's EOF, on a malformed frame and on a version-1 manager."""
        fds = protocol.fds_from_ancillary(ancdata)
        if not data:
            close_fds(fds)
            raise self._fail(errors.ManagerUnavailable(f"manager at {self.socket_path} closed the control connection"))
        try:
            protocol.check_recv_flags(flags)
            version, frame_type, request_id, body = protocol.split(data)
        except protocol.ProtocolError as exc:
            close_fds(fds)
            raise self._broken(str(exc)) from None
        if version == 1:
            close_fds(fds)
            raise self._old_manager()
        return frame_type, request_id, body, fds

    def _take_welcome(self, frame_type: int, body: bytes, fd: int | None) -> None:
        """The handshake's answer: the WELCOME, with the lease table's memfd."""
        if frame_type != FrameType.WELCOME:
            if fd is not None:
                os.close(fd)
            raise self._unexpected(frame_type, body, "WELCOME")
        if fd is None:
            raise self._broken("WELCOME carried no lease table")
        self.table_fd = fd
        self.welcome = protocol.decode_json(body)

    def _reply(
        self, frame_type: int, body: bytes, fd: int | None, reply_type: FrameType, want_fd: bool
    ) -> tuple[bytes, int | None]:
        """A request's answer: its body and fd if it is ``reply_type``."""
        if frame_type == reply_type:
            if want_fd and fd is None:
                raise self._broken(f"{reply_type.name} carried no fd")
            return body, fd
        if fd is not None:
            os.close(fd)
        raise self._unexpected(frame_type, body, reply_type.name)

    def _old_manager(self) -> errors.SharedPoolError:
        return self._fail(errors.ProtocolMismatch(
            f"manager at {self.socket_path} speaks protocol version 1; this client speaks "
            f"{protocol.VERSION}: run the same sharedpool version in the manager and the workers"
        ))

    def _silent(self) -> errors.SharedPoolError:
        return self._fail(errors.ManagerUnavailable(f"manager at {self.socket_path} did not answer in time"))

    def _broken(self, why: str) -> errors.SharedPoolError:
        return self._fail(errors.ProtocolMismatch(f"control connection to {self.socket_path} broken: {why}"))

    def _unexpected(self, frame_type: int, body: bytes, wanted: str) -> errors.SharedPoolError:
        if frame_type == FrameType.ERROR:
            error, fatal = error_from(body)
            if fatal:
                self._fail(error)
            return error
        return self._broken(f"expected {wanted}, got frame type {frame_type}")


# (frame type, request id, body, the fds it carried)
Received = tuple[int, int, bytes, list[int]]


def error_from(body: bytes) -> tuple[errors.SharedPoolError, bool]:
    """The exception an ERROR frame's body stands for, and whether the manager closes the channel after it."""
    error = protocol.decode_error(body)
    return _ERRORS.get(error.code, errors.SharedPoolError)(error.message), error.code in _FATAL


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def explain_connect_error(path: str, exc: OSError) -> str:
    """Why connecting to a manager at ``path`` failed, and what to do about it."""
    if exc.errno == errno.ENOENT:
        why = "no socket file there"
    elif exc.errno == errno.ECONNREFUSED:
        why = "socket file exists but no manager is listening (stale)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"sharedpool manager at {path}: permission denied for uid {os.getuid()}. The socket exists; "
            f"run this process as the manager's uid, or share the socket through 'sharedpool serve "
            f"--socket-group GROUP --socket-mode 660' and --allowed-uids"
        )
    else:
        why = exc.strerror or str(exc)
    return (
        f"no sharedpool manager at {path}: {why}. Start one with "
        f"'sharedpool serve --socket-path {path}' or set SHAREDPOOL_SOCKET"
    )
