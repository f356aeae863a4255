"""``SharedConnectionPool`` for ``redis.asyncio``: the lease table's leases, taken without blocking the loop.

The asyncio driver of the sans-I/O lease core (``sharedpool.lease``):

* taking a READY slot is a try-lock on the table, never a wait; before
  queueing, a task yields to the loop a few times (``_SPINS``), so that
  tasks of this process that hold slots can give them back;
* a task that finds none joins the table's FIFO queue and waits on its wake
  socket with ``loop.add_reader``, at most ``RESCAN_S`` at a time, until
  ``acquire_timeout``. At most ``_QUEUE_SEATS`` tasks of a process queue in
  the table at once; the others wait their turn in this process (FIFO), so
  that hundreds of tasks per worker do not fill the manager's
  ``max_waiting``;
* the control channel is ``AsyncControlChannel``: no request blocks the loop;
* each lease holds a ``Taker`` (its own open file description of the
  table: DESIGN fact 11) from a free list, given back with the lease.

A pool serves one event loop at a time: used from another loop, it drops
what it held in the old one and attaches afresh.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Coroutine
from typing import Any, cast

import redis.asyncio

from sharedpool import errors, protocol
from sharedpool.asyncio import process
from sharedpool.asyncio.channel import AsyncControlChannel, open_channel
from sharedpool.asyncio.connection import AsyncLeasedConnection, SlotEntry
from sharedpool.asyncio.handoff import LocalLine
from sharedpool.asyncio.parking import Parking
from sharedpool.asyncio.waiting import Seats, wait_in_queue
from sharedpool.lease import core as lease_core
from sharedpool.lease import state as lease_state
from sharedpool.lease.core import Lease, Taken, Taker, give_back
from sharedpool.lease.state import LeaseState
from sharedpool.protocol import FrameType
from sharedpool.shell import clone, links
from sharedpool.shell.attachment import LIVENESS_S, Attachment
from sharedpool.shell.callsite import caller
from sharedpool.shell.pool_base import STATS_FRAME, PoolBase, demand_body, fetch_fd_body, waited
from sharedpool.table import Outcome

_SPINS = 4  # turns of the loop given away before queueing (holders in this process may give back meanwhile)
_QUEUE_SEATS = 4  # tasks of one process queued in the table at once


class SharedConnectionPool(PoolBase, redis.asyncio.ConnectionPool):
    """A ``redis.asyncio`` pool whose connections are leases from a sharedpool manager.

    The sync ``SharedConnectionPool``'s arguments and bounds: no call waits
    longer than ``manager_timeout + acquire_timeout`` in all. ``db`` is the
    database asked for (None: the manager's). ``autopipeline``: whether a
    ``SharedRedis`` over this pool batches its simple commands (a plain
    ``redis.asyncio.Redis`` over it never does).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        acquire_timeout: float | None = None,
        manager_timeout: float | None = None,
        autopipeline: bool = True,
        **connection_kwargs: Any,
    ) -> None:
        self._take_options(socket_path, acquire_timeout, manager_timeout, connection_kwargs, AsyncLeasedConnection)
        connection_kwargs.pop("connection_class", None)  # its own class or a subclass: connections are made by the pool
        super().__init__(connection_class=AsyncLeasedConnection, **connection_kwargs)
        self._record_for_clones(acquire_timeout, manager_timeout)
        self.autopipeline = bool(autopipeline)
        if not self.autopipeline:
            # Kept for copies only when it differs from the default, so that a
            # default pool's options stay those a sync pool takes too.
            self.connection_kwargs["autopipeline"] = False
        self._start_afresh()
        process.register(self)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SharedConnectionPool:  # type: ignore[override]
        """A pool for the database and client options of a ``redis://`` or ``unix://`` URL,
        by the sync ``SharedConnectionPool.from_url``'s rules (the manager owns where Redis is)."""
        return cls._from_url(url, kwargs)

    def _start_afresh(self) -> None:
        self.pid = os.getpid()
        self._attachment: Attachment | None = None
        self._channel: AsyncControlChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._attach_lock: asyncio.Lock | None = None
        self._free_takers: list[Taker] = []
        self._seats: Seats | None = None
        self._line = LocalLine()
        # Clean leases nobody waited for, kept for this loop turn's next commands.
        self._parking = Parking(end=self._end_parked, give_back=lambda lease: self._give_back(lease, Outcome.CLEAN))

    def __repr__(self) -> str:
        waiting = self._seats.waiting if self._seats is not None else 0
        return f"<asyncio SharedConnectionPool {self._counts()}, {waiting} tasks waiting]>"

    # ----- per-process, per-loop state --------------------------------------------

    def after_fork_in_child(self) -> None:
        """In a forked child: close our copies of the parent's fds, unlock nothing, tell no one (DESIGN facts 5, 12)."""
        if self.pid == os.getpid():
            return
        att = self._attachment
        for taker in self._free_takers:
            taker.close()
        self._start_afresh()
        if att is not None:
            att.abandon()

    async def _attach(self, deadline: float) -> Attachment:
        if self.pid != os.getpid():
            self.after_fork_in_child()
        loop = asyncio.get_running_loop()
        att = self._attachment
        if att is not None and not att.detached:
            if self._loop is loop and att.still_serves():
                return att
            self._detach(att)
        if self._loop is not loop:
            # Locks, seats and streams belong to one loop: start this one's afresh.
            self._loop, self._attach_lock, self._seats = loop, asyncio.Lock(), Seats(_QUEUE_SEATS)
            self._line = LocalLine()
        assert self._attach_lock is not None
        try:
            await asyncio.wait_for(self._attach_lock.acquire(), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise errors.ManagerUnavailable(
                f"no sharedpool manager at {self.config.socket_path}: another task is still connecting"
            ) from None
        try:
            att = self._attachment
            if att is not None and not att.detached:
                return att
            # One control connection per process, manager and event loop, shared by
            # the asyncio pools on that loop (``shell.links``: why not the sync one).
            link = links.find(self.config.socket_path, loop)
            if link is None:
                link = links.add(self.config.socket_path, await open_channel(self.config.socket_path, deadline), loop)
            # The attachment uses only the channel's sync surface (notify, ping,
            # close, abandon, welcome, table_fd, closed), which the asyncio channel has too.
            att = self._attachment_on(link)
            self._attachment, self._channel = att, cast(AsyncControlChannel, link.channel)
            return att
        finally:
            self._attach_lock.release()

    def _detach(self, att: Attachment) -> None:
        self._parking.give_back_if_of(att)
        if self._attachment is att:
            self._attachment = self._channel = None
            for taker in self._free_takers:
                taker.close()
            self._free_takers = []
        att.detach()

    # ----- taking a lease ---------------------------------------------------------

    def get_connection(  # type: ignore[override]
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> Coroutine[Any, Any, AsyncLeasedConnection]:
        # The lease's own coroutine, returned: one frame fewer per command (caller() looks the same).
        return self._lease(caller())

    async def _lease(
        self, site_text: str, conn: AsyncLeasedConnection | None = None, budget: float = 0.0
    ) -> AsyncLeasedConnection:
        """Take a lease and return the connection bound to it (``conn``: rebind that object, for redis-py's retry)."""
        started = time.monotonic()
        manager_timeout = self.config.manager_timeout
        att = self._attachment
        if att is None or att.detached or self._loop is not asyncio.get_running_loop() or started - att.checked_at >= LIVENESS_S:
            att = await self._attach(min(started + manager_timeout, budget or float("inf")))
        site = att.site_id(site_text) if site_text else 0
        if self._parking.leases and conn is None:
            # Before the WorkerLimit check: parked leases are counted in att.held already.
            reused = self._parking.take_back(att, site, started)
            if reused is not None:
                return reused
        acquire_timeout = self._acquire_timeout(att)
        final, deadline = lease_core.call_bounds(att, started, manager_timeout, acquire_timeout, budget)
        taker = self._free_takers.pop() if self._free_takers else Taker(att)
        taker.avoid.clear()
        try:
            while True:
                got = await self._take(att, taker, site, started, deadline, final)
                if isinstance(got, Lease):
                    # Handed over by a task of this process, with the taker
                    # whose description holds the slot's lock.
                    lease = got
                else:
                    slot, generation, seq, taken_at = got
                    lease = Lease(att, slot, generation, seq, taker.lock_fd, taken_at, att.db, taker)
                    att.held += 1
                try:
                    bound = await self._bind(att, lease, conn, final, started, kept=lease is got)
                except errors.StaleSlot:
                    self._give_back(lease, Outcome.CLEAN, used=False, recycle=lease.taker is not taker)
                    lease_core.skip_stale(taker, lease, deadline, acquire_timeout)
                    continue
                except BaseException:
                    self._give_back(lease, Outcome.CLEAN, used=False, recycle=lease.taker is not taker)
                    raise
                if lease.taker is not taker:
                    self._recycle(taker)
                return bound
        except BaseException:
            self._recycle(taker)  # ours: any lease it held was given back above, without recycling it
            raise

    async def _take(
        self, att: Attachment, taker: Taker, site: int, started: float, deadline: float, final: float
    ) -> Taken | Lease:
        flags = att.table.hot()[0]
        if flags & lease_core.STOPPING:
            raise errors.ShuttingDown(f"pool {att.pool_name!r} is shutting down")
        assert self._seats is not None
        if self._seats.anyone_waiting():
            # Tasks of this process are in line already: first come, first
            # served, and no scan of locks the line will get first anyway.
            taken, spins = None, 0
        else:
            taken = lease_core.try_slots(att, taker, site, started, att.db) if not flags else None
            spins = _SPINS if not flags else 0
        while taken is None and spins:
            spins -= 1
            await asyncio.sleep(0)
            taken = lease_core.try_slots(att, taker, site, started, att.db)
        if taken is not None:
            return taken
        line = self._line
        handoff = line.join(site, started)
        seats = self._seats
        try:
            # Seats.take_free, then Seats.take: not a context manager, whose
            # generator and frames a contended command would pay each time.
            if not (seats.take_free() or await seats.take(att, deadline, self._acquire_timeout(att), handoff)):
                lease = handoff.claim()
                assert lease is not None
                return lease
            try:
                taken = lease_core.try_slots(att, taker, site, started, att.db) if not att.table.hot()[0] else None
                if taken is not None:
                    return taken
                got = await wait_in_queue(att, taker, handoff, line, deadline, self._acquire_timeout(att), self._demand)
                if isinstance(got, Lease):
                    handoff.claim()
                return got
            finally:
                seats.pass_on()
        finally:
            unclaimed = line.leave(handoff)
            if unclaimed is not None:
                # Handed to us as we gave up (cancelled, timed out): the next one gets it.
                self.give_back_or_hand_over(unclaimed, Outcome.CLEAN, used=False)

    async def _demand(self, att: Attachment, deadline: float, db: int) -> None:
        channel = self._channel_of(att)
        body = demand_body(db)
        try:
            await channel.call(FrameType.DEMAND, body, FrameType.ACK, max(0.05, deadline - time.monotonic()))
        except errors.ManagerUnavailable:
            if not att.manager_alive():
                self._detach(att)
                raise
        # RedisUnavailable and ShuttingDown reach the caller as they are.

    def _channel_of(self, att: Attachment) -> AsyncControlChannel:
        return cast(AsyncControlChannel, att.channel)

    # ----- binding the fd -------------------------------------------------------------

    async def _bind(
        self, att: Attachment, lease: Lease, conn: AsyncLeasedConnection | None, final: float, started: float,
        kept: bool = False,
    ) -> AsyncLeasedConnection:
        """``kept``: ``lease`` was handed over by a task of this process, its slot's lock never let go."""
        entry = cast("SlotEntry | None", att.conns.get(lease.slot))
        cached = entry.conn if entry is not None else None
        usable = cached is not None and cached.generation == lease.generation and cached._transport is not None
        if conn is None and usable:
            assert cached is not None
            cached.begin(lease, kept)
            return cached
        tls = None
        if usable:
            assert cached is not None and cached._raw is not None
            fd = os.dup(cached._raw.fileno())
            tls = cached.tls.fresh() if cached.tls is not None else None
        else:
            fd, tls = await self._fetch_fd(att, lease, final, started)
        sock = socket.socket(fileno=fd)
        if conn is None:
            conn = self._make(att, lease.slot, lease.generation)
        await conn.open_stream(sock, lease.slot, lease.generation, tls)
        conn.begin(lease)
        stale = cached if cached is not conn else None
        att.conns[lease.slot] = cast(Any, SlotEntry(conn))
        if stale is not None:
            stale.shared_pool = None
            stale.drop()  # an older generation, or the copy we dup'd from: only our fd
        return conn

    async def _fetch_fd(self, att: Attachment, lease: Lease, final: float, started: float) -> tuple[int, Any]:
        body = fetch_fd_body(lease)
        try:
            timeout = max(0.05, final - time.monotonic())
            reply, fd = await self._channel_of(att).call(FrameType.FETCH_FD, body, FrameType.FD, timeout, want_fd=True)
        except errors.ManagerUnavailable as exc:
            raise waited(exc, started) from None
        assert fd is not None
        if len(reply) <= protocol.SLOT_BODY_SIZE:
            return fd, None
        # rediss://: the connection's traffic keys follow the slot and generation.
        from sharedpool.tls.aio import TLSState
        from sharedpool.tls.keys import Handover
        from sharedpool.tls.row import RowSeqs

        try:
            return fd, TLSState(Handover.decode(reply[protocol.SLOT_BODY_SIZE :]), RowSeqs(att.table.map, lease.slot))
        except BaseException:
            os.close(fd)
            raise

    def _make(self, att: Attachment, slot: int, generation: int) -> AsyncLeasedConnection:
        kwargs = {
            key: value for key, value in self.connection_kwargs.items()
            if key not in clone.NOT_FOR_CONNECTIONS and key != "autopipeline"
        }
        kwargs["protocol"] = int(att.welcome.get("protocol", 3))
        kwargs["db"] = att.db
        return AsyncLeasedConnection(
            shared_pool=self, slot=slot, generation=generation, redis_label=str(att.welcome.get("redis", "")), **kwargs
        )

    def make_connection(self) -> AsyncLeasedConnection:
        raise errors.LeaseError("SharedConnectionPool makes no connections of its own; use get_connection()")

    # ----- giving it back ---------------------------------------------------------------

    async def release(self, connection: Any) -> None:
        # No await in here: a cancellation cannot cut a release in half.
        self.release_now(connection)

    def release_now(self, connection: Any) -> None:
        """``release``, sync: the lease's end is written before anything else can run."""
        lease_state.release(self, connection, AsyncLeasedConnection, self.give_back_or_hand_over)

    def give_back_or_hand_over(self, lease: Lease, outcome: Outcome, used: bool = True) -> None:
        """End ``lease``: hand its slot to the next task of this process if fair, else give it back to the table
        (or, clean with nobody waiting, at the loop's next turn: ``Parking``)."""
        if outcome is not Outcome.CLEAN:
            self._give_back(lease, outcome, used)
        elif self._line:
            if not self._hand_over(lease, used):
                self._give_back(lease, outcome, used)
        elif not (used and self._parking.park(lease, self._loop, self._attachment)):
            self._give_back(lease, outcome, used)

    def _end_parked(self, lease: Lease) -> None:
        """To a waiter of this process if fair, else to the table: never parked again."""
        if not self._line or not self._hand_over(lease, True):
            self._give_back(lease, Outcome.CLEAN)

    def _hand_over(self, lease: Lease, used: bool) -> bool:
        return self._line.offer(lease, self._attachment, used)

    def _give_back(self, lease: Lease, outcome: Outcome, used: bool = True, recycle: bool = True) -> None:
        # The slot's connection has read until now (``AsyncLeasedConnection.end``):
        # once the lock is given back, its replies are another holder's.
        entry = cast("SlotEntry | None", lease.attachment.conns.get(lease.slot))
        if entry is not None:
            entry.conn.stop_reading()
        report, drop = give_back(lease, outcome, used)
        if drop is not None:
            drop.disconnect()
        if report:
            lease.attachment.channel.notify(report)
        if lease.taker is not None and recycle:
            self._recycle(lease.taker)

    def _recycle(self, taker: Taker) -> None:
        att = self._attachment
        if taker.held or taker.lock_fd < 0 or taker.attachment is not att or taker.pid != os.getpid():
            if not taker.held:
                taker.close()
            return
        self._free_takers.append(taker)

    # ----- redis-py's retry after a lost connection -----------------------------------

    def connection_lost(self, conn: AsyncLeasedConnection) -> None:
        """``conn`` closed its fd: it no longer serves its slot in this process."""
        att = self._attachment
        entry = cast("SlotEntry | None", att.conns.get(conn.slot)) if att is not None else None
        if att is not None and entry is not None and entry.conn is conn:
            del att.conns[conn.slot]

    def raise_if_revoked(self, conn: AsyncLeasedConnection) -> None:
        """A command of ``conn`` failed: ``LeaseLost`` now if the manager revoked its lease."""
        lease_state.raise_if_revoked(conn, self._give_back)

    async def replace_lost_lease(self, conn: AsyncLeasedConnection) -> None:
        """Give a lost lease back broken and bind ``conn`` to a fresh one, for redis-py's retry."""
        lease_state.end_lost_lease(conn, self._give_back, self.call_bound())
        await self._lease(caller(), conn, budget=conn.retry_until)

    # ----- redis-py pool interface, the rest ------------------------------------------

    def owns_connection(self, connection: Any) -> bool:
        return (
            isinstance(connection, AsyncLeasedConnection) and connection.shared_pool is self and connection.owner_pid == self.pid
        )

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Drop this process's cached fds (never the manager's connections) and its channel."""
        self.release_process_state(inuse_connections)

    def release_process_state(self, inuse_connections: bool = False) -> None:
        if self.pid != os.getpid():
            self.after_fork_in_child()
            return
        att = self._attachment
        if att is None:
            return
        self._end_process_state(att, inuse_connections)

    def _connection_of(self, entry: SlotEntry) -> AsyncLeasedConnection:
        return entry.conn

    def end_in_use(self, conn: AsyncLeasedConnection) -> None:
        """End ``conn``'s lease now, broken, as the sync pool's ``end_in_use``: what redis.asyncio's
        ``disconnect(inuse_connections=True)`` does to a connection in use. Its holder's next
        command takes a fresh lease; one that never comes back (a PubSub a test dropped
        unclosed, whose pool's disconnect() is all the cleanup there is) leaves nothing held."""
        if conn.shared_pool is not self or conn.state is not LeaseState.IN_USE:
            return
        lease = conn.lose()
        conn.drop()
        self.connection_lost(conn)
        if lease is not None:
            self._give_back(lease, Outcome.BROKEN)

    async def aclose(self) -> None:
        await self.disconnect()

    def get_connection_count(self) -> list[tuple[int, dict[Any, Any]]]:
        return []

    def abort(self) -> int:
        if self.pid == os.getpid() and self._attachment is not None:
            self._parking.give_back()  # clean, and in no one's hands: given back, not reported
        return super().abort()

    # ----- sharedpool extras -----------------------------------------------------------

    async def manager_info(self) -> dict[str, Any]:
        """What the manager said in its WELCOME (pool, epoch, db, protocol, redis)."""
        att = await self._attach(time.monotonic() + self.config.manager_timeout)
        return dict(att.welcome)

    async def stats(self) -> dict[str, Any]:
        """The manager's stats snapshot."""
        att = await self._attach(time.monotonic() + self.config.manager_timeout)
        return await self._channel_of(att).request(STATS_FRAME, FrameType.STATS_REPLY, timeout=10.0)
