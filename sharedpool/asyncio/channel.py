"""The control connection of an asyncio worker: the sync channel's protocol, driven by the event loop.

The socket is non-blocking and watched by ``loop.add_reader`` for as long
as the channel is open: each frame is matched to the request that waits
for it by its request id, so any number of tasks may have a request out at
once, and a task that is cancelled or times out simply stops waiting. Its
reply is dropped when it comes, and any fd it carries is closed: never read
as the answer to another request (the asyncio form of the sync channel's
rule). The manager's EOF is seen at once and fails every request still
waiting.

Frames that get no reply (``notify``) are sent at once when the socket
takes them and queued for ``add_writer`` when it does not: the attachment
and the lease core call it from sync code. ``ping``, ``close`` and
``abandon`` are sync too, for the same callers (a dying worker's hook, a
forked child).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import select
import socket
import time
from typing import Any

from sharedpool import errors, protocol
from sharedpool.asyncio.waiting import settled_within
from sharedpool.protocol import FrameType
from sharedpool.shell.frames import ChannelReplies, close_fds, explain_connect_error
from sharedpool.shell.links import ConnectRetry
from sharedpool.version import __version__

log = logging.getLogger("sharedpool.client")

# (frame type, body, the fd it carried)
Frame = tuple[int, bytes, "int | None"]


class AsyncControlChannel(ChannelReplies):
    """One control connection on one event loop. ``welcome`` and ``table_fd`` come from the handshake."""

    def __init__(self, socket_path: str, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.socket_path = socket_path
        self.sock = sock
        self.loop = loop
        self.pid = os.getpid()
        self.closed = False
        self.table_fd = -1
        self.welcome: dict[str, Any] = {}
        self._ids = itertools.count(1)
        # request id -> (its future, whether its reply may carry an fd)
        self._waiters: dict[int, tuple[asyncio.Future[Frame], bool]] = {}
        self._backlog: collections.deque[bytes] = collections.deque()
        self._writing = False

    @classmethod
    async def connect(cls, socket_path: str, timeout: float) -> AsyncControlChannel:
        """Connect, say HELLO and wait for the WELCOME (with the table's memfd), within ``timeout``."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, socket_path), max(0.001, timeout))
        except OSError as exc:
            sock.close()
            raise errors.ManagerUnavailable(explain_connect_error(socket_path, exc)) from None
        except BaseException:  # timed out or cancelled
            sock.close()
            raise
        channel = cls(socket_path, sock, loop)
        try:
            # The WELCOME answers the HELLO, whose request id is 0.
            welcome: asyncio.Future[Frame] = loop.create_future()
            channel._waiters[0] = (welcome, True)
            loop.add_reader(sock.fileno(), channel._on_readable)
            hello = protocol.encode_json(FrameType.HELLO, {"pid": channel.pid, "client": f"sharedpool/{__version__}"})
            try:
                sock.send(hello)
            except OSError:
                pass  # refused and closed at once: the reason may still be waiting to be read
            try:
                if not await settled_within(welcome, timeout):
                    raise channel._silent()
            finally:
                channel._waiters.pop(0, None)
            channel._take_welcome(*welcome.result())
        except BaseException:
            channel.close()
            raise
        return channel

    def __repr__(self) -> str:
        return (
            f"<AsyncControlChannel {self.socket_path} pid={self.pid} {'closed' if self.closed else 'open'} "
            f"[{len(self._waiters)} requests waiting]>"
        )

    # ----- requests ----------------------------------------------------------

    async def call(
        self, frame_type: FrameType, body: bytes, reply_type: FrameType, timeout: float, want_fd: bool = False
    ) -> tuple[bytes, int | None]:
        """Send a request and wait for its own reply, at most ``timeout`` seconds."""
        if self.closed:
            raise errors.ManagerUnavailable(f"control connection to {self.socket_path} is closed")
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        future: asyncio.Future[Frame] = self.loop.create_future()
        self._waiters[request_id] = (future, want_fd)
        try:
            await self._send(protocol.header(frame_type, request_id) + body)
            if not await settled_within(future, timeout):
                raise self._silent()
            got_type, got_body, fd = future.result()
        finally:
            # Cancelled or not, we stop waiting: a reply coming later is dropped.
            self._waiters.pop(request_id, None)
        return self._reply(got_type, got_body, fd, reply_type, want_fd)

    async def request(self, frame: bytes, reply_type: FrameType, timeout: float) -> dict[str, Any]:
        """Send an encoded frame (its request id is set here); return the JSON reply."""
        _version, frame_type, _rid, body = protocol.split(frame)
        reply, _fd = await self.call(FrameType(frame_type), body, reply_type, timeout)
        return protocol.decode_json(reply) if reply else {}

    def notify(self, frame: bytes) -> None:
        """Send a frame that gets no reply, now or as soon as the socket takes it.

        A dead manager is not an error here: the next one repairs from the
        table, or the channel's EOF said enough.
        """
        if self.closed:
            return
        if not self._backlog:
            try:
                self.sock.send(frame)
                return
            except BlockingIOError:
                pass
            except OSError:
                return
        self._backlog.append(frame)
        if not self._writing and self.pid == os.getpid():
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self._flush)

    def ping(self, timeout: float) -> float:
        """A blocking PING for a dying worker's hook (``Attachment.abort``), whose loop no longer runs.

        Makes sure the reports sent before were read before our end
        closes. Replies to other requests are dropped: the channel closes next.
        """
        started = time.monotonic()
        deadline = started + timeout
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        try:
            self.sock.send(protocol.header(FrameType.PING, request_id))
            while (remaining := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([self.sock], [], [], remaining)
                if not readable:
                    break
                data, ancdata, _flags, _ = self.sock.recvmsg(protocol.MAX_FRAME, protocol.FD_ANCILLARY_SPACE, protocol.RECV_FLAGS)
                close_fds(protocol.fds_from_ancillary(ancdata))
                if not data:
                    break
                if protocol.split(data)[2] == request_id:
                    return time.monotonic() - started
        except (OSError, ValueError, protocol.ProtocolError):
            pass
        raise errors.ManagerUnavailable(f"manager at {self.socket_path} did not answer a ping")

    def close(self, error: errors.SharedPoolError | None = None) -> None:
        """Close our end and fail every request still waiting with ``error``. Only in the process that opened it."""
        if self.closed:
            return
        self.closed = True
        if self.pid == os.getpid() and not self.loop.is_closed():
            self.loop.remove_reader(self.sock.fileno())
            if self._writing:
                self.loop.remove_writer(self.sock.fileno())
        self._writing = False
        self._backlog.clear()
        self.sock.close()
        if self.table_fd >= 0:
            os.close(self.table_fd)
            self.table_fd = -1
        error = error or errors.ManagerUnavailable(f"control connection to {self.socket_path} is closed")
        for future, _want_fd in self._waiters.values():
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()

    def abandon(self) -> None:
        """Drop the fds in a forked child without telling the manager anything.

        The loop is not touched: an epoll instance inherited across fork is
        the parent's too, and removing our fd from it would stop the
        parent's loop from watching its own channel.
        """
        self.closed = True
        self._waiters = {}
        self._backlog = collections.deque()
        for fd in (self.sock.detach(), self.table_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.table_fd = -1

    # ----- frames --------------------------------------------------------------

    async def _send(self, frame: bytes) -> None:
        try:
            # SEQPACKET sends a frame whole or not at all: sock_sendall only
            # waits for room, it never splits one.
            await self.loop.sock_sendall(self.sock, frame)
        except OSError as exc:
            error = errors.ManagerUnavailable(f"manager at {self.socket_path} went away ({exc.strerror or exc})")
            self.close(error)
            raise error from None

    def _flush(self) -> None:
        while self._backlog:
            try:
                self.sock.send(self._backlog[0])
            except BlockingIOError:
                return
            except OSError:
                self._backlog.clear()
                break
            self._backlog.popleft()
        self._writing = False
        self.loop.remove_writer(self.sock.fileno())

    def _on_readable(self) -> None:
        """Read every frame the socket has and hand each to the request that waits for it."""
        while not self.closed:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(protocol.MAX_FRAME, protocol.FD_ANCILLARY_SPACE, protocol.RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close(errors.ManagerUnavailable(f"manager at {self.socket_path} went away ({exc.strerror or exc})"))
                return
            try:
                frame_type, request_id, body, fds = self._frame(data, ancdata, flags)
            except errors.SharedPoolError:
                return  # the channel is closed, and every request still waiting failed with it
            waiter = None if frame_type in protocol.UNSOLICITED_TYPES else self._waiters.pop(request_id, None)
            if waiter is None or waiter[0].done():
                # A newer manager's notice, or the reply to a request whose
                # asker stopped waiting (cancelled, timed out): drop it.
                close_fds(fds)
                continue
            future, want_fd = waiter
            if len(fds) > (1 if want_fd else 0):
                close_fds(fds)
                future.set_exception(self._broken(f"frame type {frame_type} carried {len(fds)} fds"))
                return
            future.set_result((frame_type, body, fds[0] if fds else None))

    def _fail(self, error: errors.SharedPoolError) -> errors.SharedPoolError:
        self.close(error)
        return error


async def open_channel(socket_path: str, deadline: float) -> AsyncControlChannel:
    """Connect, retrying while no manager answers, until ``deadline`` (the sync ``open_channel``'s rule)."""
    retry = ConnectRetry(deadline)
    while True:
        try:
            return await AsyncControlChannel.connect(socket_path, retry.timeout())
        except errors.ManagerUnavailable as exc:
            await asyncio.sleep(retry.failed(exc))
