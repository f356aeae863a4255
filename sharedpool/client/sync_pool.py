"""``SharedConnectionPool``: redis-py's pool interface over the manager's lease table.

A lease is a lock on one byte of the shared table plus a row written
(``sharedpool.table``): ``get_connection`` takes one through the lease core
(``sharedpool.lease``) and returns this process's connection object for its
slot; ``release`` gives it back. This module is the sync pool itself:
redis-py's pool interface, the options a worker may set, taking a lease
(spinning, then blocking waits on the thread's wake socket) and giving it
back, and the control channel's blocking requests. Attaching to a manager
and each thread's taker are ``process_state.py``'s; binding a lease to a
connection object and ending one redis-py lost are ``binding.py``'s.
The manager hears of a lease only when it has work to do: a first fd for a
(slot, generation), a slot to open, a reset, a broken connection.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from sharedpool import errors
from sharedpool import table as tbl
from sharedpool.client import process
from sharedpool.client.binding import bind, end_lost_lease, give_back_reporting
from sharedpool.client.channel import sync_channel
from sharedpool.client.connection import LeasedConnection
from sharedpool.client.process_state import Attaching, ThreadState
from sharedpool.lease import core as lease_core
from sharedpool.lease import queue as lease_queue
from sharedpool.lease import state as lease_state
from sharedpool.lease.core import Lease, Taken
from sharedpool.lease.state import LeaseState
from sharedpool.protocol import FrameType
from sharedpool.shell.attachment import LIVENESS_S, Attachment
from sharedpool.shell.callsite import caller
from sharedpool.shell.pool_base import STATS_FRAME, demand_body
from sharedpool.table import Outcome, RowFlag, RowState


class SharedConnectionPool(Attaching, redis.ConnectionPool):
    """A redis-py ``ConnectionPool`` whose connections are leases from a sharedpool manager.

    ``socket_path`` (or ``SHAREDPOOL_SOCKET``) names the manager;
    ``acquire_timeout`` bounds the wait for a lease (default: the manager's);
    ``manager_timeout`` is how long to keep trying while no manager answers
    (0: raise ``ManagerUnavailable`` at once). No call waits longer than
    ``acquire_timeout + manager_timeout`` in all. Other keyword arguments
    are redis-py connection options (``decode_responses``,
    ``socket_timeout``, ``retry``, ``protocol``, ``db``...). Options the
    manager owns (host, password, ssl, ...) are refused.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        acquire_timeout: float | None = None,
        manager_timeout: float | None = None,
        **connection_kwargs: Any,
    ) -> None:
        self._take_options(socket_path, acquire_timeout, manager_timeout, connection_kwargs, LeasedConnection)
        connection_class = connection_kwargs.pop("connection_class", LeasedConnection)
        super().__init__(connection_class=connection_class, **connection_kwargs)
        self._record_for_clones(acquire_timeout, manager_timeout)
        process.register(self)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SharedConnectionPool:  # type: ignore[override]
        """A pool for the database and client options of a ``redis://`` or ``unix://`` URL
        (``PoolBase._from_url``: the manager owns where Redis is and how to log in)."""
        return cls._from_url(url, kwargs)

    def __repr__(self) -> str:
        return f"<SharedConnectionPool {self._counts()}]>"

    # ----- timeouts (attaching, detaching, threads' takers: Attaching) -------

    # ----- taking a lease ------------------------------------------------------

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> LeasedConnection:
        self._checkpid()
        return self._lease(caller())

    def _lease(self, site_text: str, conn: LeasedConnection | None = None, budget: float = 0.0) -> LeasedConnection:
        """Take a lease and return the connection bound to it (``conn`` rebinds that object).

        The whole call is bounded by ``manager_timeout + acquire_timeout``:
        finding a manager may use the first, waiting for a lease the second,
        and whatever asks the manager something uses what is left.
        """
        started = time.monotonic()
        manager_timeout = self.config.manager_timeout
        att = self._attachment
        if att is None or att.detached or started - att.checked_at >= LIVENESS_S:
            att = self._attach(min(started + manager_timeout, budget or float("inf")))
        acquire_timeout = self.config.acquire_timeout or att.acquire_timeout
        final, deadline = lease_core.call_bounds(att, started, manager_timeout, acquire_timeout, budget)
        state = getattr(self._local, "state", None)
        if state is None or state.attachment is not att or state.lock_fd < 0:
            state = self._thread_state(att)
        if state.avoid:
            state.avoid.clear()  # the manager has had time to repair what we skipped
        site = att.site_id(site_text) if site_text else 0
        while True:
            taken = None
            flags = att.table.hot()[0]
            if flags & lease_core.STOPPING:
                if not att.manager_alive():
                    self._detach(att)
                    att = self._attach(max(final - acquire_timeout, time.monotonic() + 0.5))
                    state = self._thread_state(att)
                    continue
                raise errors.ShuttingDown(f"pool {att.pool_name!r} is shutting down")
            if not flags:
                # A free slot at the first look is the common case: the table
                # core's one call (lease_core.try_slots, inlined), no spin loop.
                taken = att.table.core.take(
                    state.lock_fd, state.last_slot, att.conns, state.avoid, att.db, att.pid, att.start, site, started
                )
                if taken is not None:
                    state.held.add(taken[0])
                    state.last_slot = taken[0]
                else:
                    taken = lease_core.take_spinning(att, state, site, started, att.db)
            if taken is None:
                taken = self._wait(att, state, site, started, deadline)
            slot, generation, seq, taken_at = taken
            lease = Lease(att, slot, generation, seq, state.lock_fd, taken_at, att.db, state)
            att.held += 1
            try:
                bound = bind(self, att, lease, conn, final, started)
            except errors.StaleSlot:
                give_back_reporting(lease, Outcome.CLEAN, used=False)
                lease_core.skip_stale(state, lease, deadline, acquire_timeout)
                continue
            except BaseException:
                give_back_reporting(lease, Outcome.CLEAN, used=False)
                raise
            if bound.closed_while_idle():
                # As redis-py's pool reconnects a connection Redis closed while
                # it sat in the pool: the command goes out on another one, and
                # this one goes back broken for the manager to replace.
                self.end_in_use(bound)
                if time.monotonic() >= deadline:
                    raise errors.PoolTimeout(
                        f"no lease from pool {att.pool_name!r} within {acquire_timeout:.2f} s: "
                        "every connection taken had been closed by Redis"
                    )
                continue
            return bound

    def _wait(self, att: Attachment, state: ThreadState, site: int, started: float, deadline: float) -> Taken:
        """Every open slot is taken: queue, and do what the lease core asks, blocking."""
        wait = lease_queue.QueueWait(att, state, site, started, deadline, self._acquire_timeout(att), att.db)
        poller = state.poller
        try:
            while True:
                step = wait.next_wait()
                if isinstance(step, lease_queue.Sleep):
                    if poller.poll(step.seconds * 1000):
                        wait.on_wake()
                elif isinstance(step, lease_queue.Demand):
                    self._demand(att, step.deadline, step.db)
                else:
                    return step
        finally:
            wait.leave()

    def _demand(self, att: Attachment, deadline: float, db: int) -> None:
        body = demand_body(db)
        try:
            sync_channel(att).call(FrameType.DEMAND, body, FrameType.ACK, max(0.05, deadline - time.monotonic()))
        except errors.ManagerUnavailable:
            if not att.manager_alive():
                self._detach(att)
                raise
        # RedisUnavailable and ShuttingDown reach the caller as they are.

    def make_connection(self) -> LeasedConnection:
        raise errors.LeaseError("SharedConnectionPool makes no connections of its own; use get_connection()")

    # ----- giving it back -------------------------------------------------------------

    def release(self, connection: Any) -> None:
        lease_state.release(self, connection, LeasedConnection, give_back_reporting)

    # ----- redis-py's retry after a lost connection ---------------------------------

    def connection_lost(self, conn: LeasedConnection) -> None:
        """``conn`` closed its fd: it no longer serves its slot in this process."""
        att = self._attachment
        if att is not None and att.conns.get(conn.slot) is conn:
            del att.conns[conn.slot]

    def raise_if_revoked(self, conn: LeasedConnection) -> None:
        """A command of ``conn`` failed: ``LeaseLost`` now if the manager revoked its lease."""
        lease_state.raise_if_revoked(conn, give_back_reporting)

    def replace_lost_lease(self, conn: LeasedConnection) -> socket.socket:
        """Give a lost lease back broken and bind ``conn`` to a fresh one, for redis-py's retry."""
        end_lost_lease(self, conn)
        self._lease(caller(), conn, budget=conn.retry_until)
        sock = conn._sock
        assert sock is not None
        return sock  # type: ignore[return-value]

    # ----- redis-py pool interface, the rest ------------------------------------------

    def owns_connection(self, connection: Any) -> bool:
        return isinstance(connection, LeasedConnection) and connection.shared_pool is self and connection.pid == self.pid

    def reset(self) -> None:
        # Called in the same process, redis-py's reset() forgets every
        # connection, and their sockets close when collected; Celery's result
        # consumer resets its pool this way to reconnect after a connection
        # error, dropping the old PubSub still holding its lease. Forgotten
        # here, the attachment's leases would stay held until collection
        # (and under a cap, starve the host): they end now, as disconnect()
        # ends them, and a holder's next command takes a fresh lease.
        if getattr(self, "pid", None) == os.getpid() and getattr(self, "_attachment", None) is not None:
            self.disconnect()
        super().reset()

    def disconnect(self, inuse_connections: bool = True) -> None:
        """As redis-py's: drop this process's cached fds (never the manager's connections)
        and its channel; with ``inuse_connections`` (the default) also end the leases in use.

        An ended lease goes back broken at once, so the manager shuts its connection
        down (which wakes a holder blocked reading from it) and replaces it; the
        holder's next command takes a fresh lease, as plain redis-py reconnects.
        A holder that never uses its connection again (kombu's, after an error)
        leaves nothing held. ``False`` leaves leases in use as they are.
        """
        self._checkpid()
        att = self._attachment
        if att is None:
            return
        busy = [c for c in att.conns.values() if c.state is LeaseState.IN_USE]
        if busy and not inuse_connections:
            for conn in list(att.conns.values()):
                if conn.state is not LeaseState.IN_USE:
                    del att.conns[conn.slot]
                    conn.disconnect()
            return
        for conn in busy:
            self.end_in_use(conn)
        self._detach(att)

    def end_in_use(self, conn: LeasedConnection) -> None:
        """End ``conn``'s lease now, broken (the manager replaces the connection), wherever its
        holder is; the holder's next command on it takes a fresh lease, as plain redis-py
        reconnects a connection it was told to disconnect."""
        if conn.shared_pool is not self or conn.state is not LeaseState.IN_USE:
            return
        lease = conn.lose()
        conn.disconnect()
        if lease is not None:
            give_back_reporting(lease, Outcome.BROKEN)

    def close(self) -> None:
        self.disconnect()

    def get_connection_count(self) -> list[tuple[int, dict[Any, Any]]]:
        return []

    # ----- sharedpool extras -------------------------------------------------

    def mark_long_lived(self, connection: LeasedConnection, flag: RowFlag = RowFlag.BLOCKING, limit: int | None = None) -> None:
        """Mark ``connection``'s lease long-lived (``flag``: BLOCKING for a connection pinned for
        blocking polls, SUBSCRIBER as pub/sub marks itself): the manager then neither warns about
        it as a leak nor revokes it, and stats count it.

        ``limit``, when given, bounds the long-lived leases of the whole host: ``PoolFull``,
        and nothing marked, when this lease would pass it after waiting up to the acquire
        timeout for others to end. Counted without a lock, so two processes marking at the
        same instant may pass it by one."""
        lease = connection.lease
        if connection.shared_pool is not self or lease is None:
            raise errors.LeaseError(f"{connection!r} is not leased from {self!r}")
        att = lease.attachment
        table = att.table
        if limit is None:
            table.mark_subscriber(lease.slot, lease.generation, lease.seq, flag)
            return
        # Long-lived leases a reconnecting consumer left behind end when their old
        # channel closes, just after the new one asks: wait for that, within the
        # acquire timeout, rather than fail a reconnect that would then succeed.
        deadline = time.monotonic() + self._acquire_timeout(att)
        while True:
            holders = self._long_lived_holders(table, lease.slot)
            already = table.row(lease.slot).flags & (RowFlag.SUBSCRIBER | RowFlag.BLOCKING)
            if already or len(holders) < limit:
                break
            if time.monotonic() >= deadline:
                raise errors.PoolFull(
                    f"pool {att.pool_name!r} has {len(holders)} long-lived leases (bound {limit}; held by pids "
                    f"{', '.join(str(pid) for pid in sorted(holders))}): no more may pin a connection"
                )
            time.sleep(0.02)
        table.mark_subscriber(lease.slot, lease.generation, lease.seq, flag)

    @staticmethod
    def _long_lived_holders(table: tbl.Table, other_than: int) -> list[int]:
        holders: list[int] = []
        for slot in range(table.capacity):
            if slot == other_than:
                continue
            try:
                row = table.row(slot)
            except tbl.RowError:
                continue
            if row.state is RowState.HELD and row.flags & (RowFlag.SUBSCRIBER | RowFlag.BLOCKING):
                holders.append(row.holder_pid)
        return holders

    @contextmanager
    def leased(self) -> Iterator[LeasedConnection]:
        conn = self.get_connection()
        try:
            yield conn
        finally:
            self.release(conn)

    def manager_info(self) -> dict[str, Any]:
        """What the manager said in its WELCOME (pool, epoch, db, protocol, redis)."""
        self._checkpid()
        att = self._attach(time.monotonic() + self.config.manager_timeout)
        return dict(att.welcome)

    def stats(self) -> dict[str, Any]:
        """The manager's stats snapshot."""
        self._checkpid()
        att = self._attach(time.monotonic() + self.config.manager_timeout)
        return sync_channel(att).request(STATS_FRAME, FrameType.STATS_REPLY, timeout=10.0)

    # ----- hooks for servers -----------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """Drop the parent's state in a forked child (``os.fork`` runs this by itself)."""
        # A lock held by a parent thread at fork time would never be
        # released in the child: start with fresh ones.
        self._fork_lock = threading.RLock()
        self._lock = threading.RLock()
        self._checkpid()
