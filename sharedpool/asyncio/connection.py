"""A ``redis.asyncio`` connection over a socket the manager lent us.

As the sync ``LeasedConnection``: no handshake (the manager did it), never a
``shutdown()`` (DESIGN fact 1), and the session watched so that the release
says CLEAN, NEEDS_RESET or BROKEN (``client.session``). What is asyncio's:

* the lent fd is wrapped once in this loop's stream (``open_connection(sock=)``)
  and kept for the next leases of its (slot, generation); while the slot's
  lock is not this process's, the transport does not read (``pause_reading``),
  or it would take replies meant for whichever process holds the slot then;
* each lease puts the fd back in non-blocking mode: O_NONBLOCK lives on the
  description shared with every holder, and a sync holder may have cleared
  it (DESIGN fact 9);
* a task cancelled mid-command leaves a reply or a partial write in flight:
  redis-py then disconnects (``read_response`` / ``send_packed_command``
  close on any ``BaseException``), and a pending reply or unsent bytes make
  the outcome BROKEN anyway, so no later task reads that reply.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.exceptions import ConnectionError as RedisConnectionError

from sharedpool import errors
from sharedpool.errors import LeaseLost
from sharedpool.lease.budget import BoundedRetryAttribute, CallBudget, SpentBudgetBackoff
from sharedpool.lease.state import LeaseHolder, LeaseState

if TYPE_CHECKING:
    from sharedpool.lease.core import Lease
    from sharedpool.tls.aio import TLSState

# StreamReader's buffer limit: a reply larger than this is still read, in pieces.
_STREAM_LIMIT = 2**20

T = TypeVar("T")

# How long a closing subscriber waits for the rest of a pushed message already begun.
_DRAIN_S = 0.05


class AsyncLeasingPool(Protocol):
    """What a leased connection asks of its pool (``asyncio.async_pool``'s ``SharedConnectionPool``)."""

    def call_bound(self) -> float: ...
    def connection_lost(self, conn: AsyncLeasedConnection) -> None: ...
    def raise_if_revoked(self, conn: AsyncLeasedConnection) -> None: ...
    async def replace_lost_lease(self, conn: AsyncLeasedConnection) -> None: ...


class _BoundedRetry(Retry):
    """The caller's ``redis.asyncio`` retry policy, stopped when one call's time budget is spent (``lease.budget``)."""

    def __init__(self, policy: Retry, conn: AsyncLeasedConnection) -> None:
        super().__init__(SpentBudgetBackoff(policy._backoff, conn), policy._retries, tuple(policy._supported_errors))
        self.policy = policy
        self._budget = CallBudget(conn)

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None, with_failure_count: bool = False,
    ) -> T:
        budget = self._budget
        budget.enter()
        try:
            return await super().call_with_retry(do, fail, budget.judge(is_retryable), with_failure_count)
        finally:
            budget.leave()


class AsyncLeasedConnection(LeaseHolder, Connection):
    """One slot's connection as seen by a task; reused across leases of that slot in this loop."""

    retry = BoundedRetryAttribute(_BoundedRetry)

    def __init__(
        self, *, shared_pool: AsyncLeasingPool | None = None, slot: int = -1, generation: int = 0, redis_label: str = "",
        **kwargs: Any,
    ) -> None:
        if shared_pool is None:
            # A plain redis.asyncio.ConnectionPool given our class: it would open nothing we could share.
            raise errors.Misconfigured(
                "an AsyncLeasedConnection is made only by sharedpool.asyncio.SharedConnectionPool, not by another pool: "
                "rebuild the pool as type(pool)(**pool.connection_kwargs), or use sharedpool.asyncio.Redis(...)"
            )
        super().__init__(**kwargs)
        self.shared_pool: AsyncLeasingPool | None = shared_pool
        self._raw: socket.socket | None = None  # our dup of the slot's fd, inside the transport
        self._transport: asyncio.Transport | None = None
        self._stream_loop: asyncio.AbstractEventLoop | None = None
        self.tls: TLSState | None = None  # rediss://: keys, record layer, row
        self._hold_init(slot, generation, redis_label)

    # ----- the stream over the lent fd -------------------------------------------

    async def open_stream(self, sock: socket.socket, slot: int, generation: int, tls: TLSState | None = None) -> None:
        """Wrap ``sock`` (our dup of a slot's fd) in this loop's stream; we hold the slot's lease.
        ``tls`` (rediss://): the record layer goes under the stream."""
        self.drop()
        try:
            if tls is None:
                reader, writer = await asyncio.open_connection(sock=sock, limit=_STREAM_LIMIT)
            else:
                from sharedpool.tls.aio import open_stream

                reader, writer = await open_stream(sock, tls, _STREAM_LIMIT)
        except BaseException:
            sock.close()
            raise
        self.tls = tls
        self._raw = sock
        self._reader, self._writer = reader, writer
        self._transport = cast(asyncio.Transport, writer.transport)
        self._stream_loop = asyncio.get_running_loop()
        self.slot, self.generation = slot, generation
        self._parser.on_connect(self)

    def drop(self) -> None:
        """Close our copy of the fd now (sync: the attachment and the lease core call it)."""
        self._parser.on_disconnect()
        self.reset_should_reconnect()
        # The writer is held until the transport is closing: a StreamWriter
        # collected before that warns and closes it its own way.
        raw, transport, loop, writer = self._raw, self._transport, self._stream_loop, self._writer
        self._raw = self._reader = self._writer = self._transport = None
        if raw is None:
            return
        if transport is not None and loop is not None and (
            self.owner_pid == os.getpid() or loop.is_closed() or not transport.is_reading()
        ):
            # abort(): no flush, never shutdown(). In a forked child only
            # when it touches no epoll instance (the parent's too, after
            # fork): a closed loop's or a paused transport's.
            try:
                transport.abort()
            except RuntimeError:
                # A closed loop cannot schedule the rest of the close, and
                # asyncio has no other way to finish it: the socket is closed
                # here, and the transport told so (else it warns when collected).
                if getattr(transport, "_sock", None) is not None:
                    transport._sock = None  # type: ignore[attr-defined]
        raw.close()
        del writer
        pool = self.shared_pool
        if pool is not None and self.owner_pid == os.getpid():
            pool.connection_lost(self)

    # ----- lease lifecycle (called by the pool) -----------------------------------

    def begin(self, lease: Lease, kept: bool = False) -> None:
        """``kept``: the slot's lock never left this process since our last lease (handed
        over by a task of it), so no other holder can have touched the fd's flags."""
        raw, transport = self._raw, self._transport
        assert raw is not None and transport is not None
        if not kept:
            os.set_blocking(raw.fileno(), False)
        if self.tls is not None:
            self.tls.take_up()  # rediss://: the row's record sequence numbers
        transport.resume_reading()  # a no-op while it still reads (a hand-over within this process)
        self._begin_lease(lease)

    def end(self) -> Lease | None:
        """The lease is over for this object.

        A plain transport goes on reading until the slot's lock leaves this
        process (``stop_reading``, called by the pool's give-back): a lease
        handed to the next task of this process then costs no selector
        unregister and register (two ``epoll_ctl``), and a clean lease has no
        reply in flight to read meanwhile. rediss:// stops now: its record
        sequence numbers go back to the row in this step.
        """
        if self.tls is not None and self._transport is not None:
            self._transport.pause_reading()
            self.tls.write_back()  # rediss://: in its own step, before the give-back
        return super().end()

    def stop_reading(self) -> None:
        """The slot's lock is about to leave this process: from now on the fd is another holder's to read."""
        transport = self._transport
        if transport is not None and transport.is_reading():
            transport.pause_reading()

    def _transport_gone(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def _has_unread_bytes(self) -> bool:
        reader, transport = self._reader, self._transport
        if transport is not None and transport.get_write_buffer_size():
            return True  # part of a command never went out
        if self.tls is not None and self.tls.layer.pending():
            return True  # rediss://: record bytes no reply has taken
        # StreamReader has no public peek; redis-py's own parser reads this too.
        return reader is not None and bool(getattr(reader, "_buffer", b""))

    # ----- redis-py overrides ----------------------------------------------------

    async def _connect(self) -> None:
        """redis-py reconnects after a failure mid-lease: swap in a fresh lease."""
        pool = self.shared_pool
        if pool is None or self.owner_pid != os.getpid():
            raise LeaseLost(f"{self!r} was inherited across fork: take a lease from the pool in this process")
        await pool.replace_lost_lease(self)

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        try:
            await super().connect_check_health(check_health, retry_socket_connect)
        except RedisConnectionError as exc:
            # redis.asyncio wraps whatever _connect raised in a plain ConnectionError; ours says
            # more and is what callers catch (PoolTimeout is a TimeoutError, not a ConnectionError).
            if type(exc) is RedisConnectionError and isinstance(exc.__cause__, errors.SharedPoolError):
                raise exc.__cause__ from None
            raise

    async def on_connect(self) -> None:
        self._parser.on_connect(self)

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        self._parser.on_connect(self)

    async def disconnect(
        self, nowait: bool = False, error: Exception | None = None, failure_count: int | None = None,
        health_check_failed: bool = False,
    ) -> None:
        if not (error or health_check_failed) and self.state is LeaseState.IN_USE and self.may_close_clean():
            # A failed command sets _broken (below) whichever way redis-py
            # disconnects; PubSub.aclose() comes with nothing in flight
            # (nowait=True): NEEDS_RESET then, once the messages already in
            # our buffer are read to their end (as the sync connection does).
            try:
                while self._reader is not None and self._has_unread_bytes():
                    await self.read_response(disable_decoding=True, timeout=_DRAIN_S, disconnect_on_error=False,
                                             push_request=True)
            except Exception:
                self._broken = True
            self.closing_clean()
        self.drop()

    async def send_command(self, *args: Any, **kwargs: Any) -> None:
        if self._writer is None:
            # Reconnecting binds a fresh lease and resets the counts: do it
            # before counting this command, or its reply would go unseen.
            await self.connect_check_health(check_health=False)
        self.watch_command(args)
        await self.send_packed_command(self.pack_command(*args), check_health=kwargs.get("check_health", True))

    def pack_commands(self, commands: Any) -> Any:
        commands = list(commands)
        self.watch_commands(commands)
        return super().pack_commands(commands)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except BaseException as exc:
            self._lease_failed(exc)
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except BaseException as exc:
            self._reply_failed(exc)
        finally:
            self._pending_replies -= 1


class SlotEntry:
    """What ``Attachment.conns`` keeps per slot for the asyncio pool.

    The attachment and the lease core treat cached connections as sync
    objects (``state``, ``lease``, ``generation``, ``disconnect()``), and a
    ``redis.asyncio`` connection's ``disconnect`` is a coroutine: this
    gives them the sync view of one.
    """

    __slots__ = ("conn",)

    def __init__(self, conn: AsyncLeasedConnection) -> None:
        self.conn = conn

    @property
    def state(self) -> LeaseState:
        return self.conn.state

    @property
    def lease(self) -> Lease | None:
        return self.conn.lease

    @property
    def generation(self) -> int:
        return self.conn.generation

    @property
    def shared_pool(self) -> AsyncLeasingPool | None:
        return self.conn.shared_pool

    @shared_pool.setter
    def shared_pool(self, pool: AsyncLeasingPool | None) -> None:
        self.conn.shared_pool = pool

    def disconnect(self) -> None:
        self.conn.drop()
