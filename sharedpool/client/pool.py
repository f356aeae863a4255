"""``SharedConnectionPool``: redis-py's pool interface over the manager's lease table.

A lease is a lock on one byte of the shared table plus a row written
(``sharedpool.table``): ``get_connection`` takes one through the lease core
(``lease_core``) and returns this process's connection object for its
slot; ``release`` gives it back. This module is the sync pool itself:
redis-py's pool interface, the options a worker may set, taking a lease
(spinning, then blocking waits on the thread's wake socket) and giving it
back, and the control channel's blocking requests. Attaching to a manager
and each thread's taker are ``attaching.py``'s; binding a lease to a
connection object and ending one redis-py lost are ``binding.py``'s.
The manager hears of a lease only when it has work to do: a first fd for a
(slot, generation), a slot to open, a reset, a broken connection.
"""

from __future__ import annotations

import inspect
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from sharedpool import errors, protocol
from sharedpool import table as tbl
from sharedpool.client import clone, lease_core, lease_queue, lease_state, process, retry_budget
from sharedpool.client.attaching import Attaching, ThreadState
from sharedpool.client.attachment import LIVENESS_S, Attachment
from sharedpool.client.binding import bind, end_lost_lease, give_back_reporting
from sharedpool.client.callsite import caller
from sharedpool.client.connection import LeasedConnection
from sharedpool.client.lease_core import Lease, Taken
from sharedpool.client.lease_state import LeaseState
from sharedpool.config import client_config
from sharedpool.protocol import FrameType
from sharedpool.table import Outcome, RowFlag, RowState

# Settings that belong to the manager: a worker cannot change them per lease.
_MANAGER_OWNED = frozenset({
    "host", "port", "path", "unix_socket_path", "password", "username", "credential_provider",
    "client_name", "lib_name", "lib_version", "driver_info", "ssl", "ssl_keyfile", "ssl_certfile",
    "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "socket_keepalive",
    "socket_keepalive_options", "socket_connect_timeout", "redis_connect_func", "connection_class",
    "cache", "cache_config", "maint_notifications_config",
})
# What the manager's handshake tells Redis about the client (CLIENT SETINFO).
# Libraries pass their own (Celery's driver_info and lib_name): labels only,
# so they are dropped whatever they say.
_LABELS = frozenset({"lib_name", "lib_version", "driver_info"})


def _redis_py_defaults() -> dict[str, tuple[Any, ...]]:
    """The values redis-py itself gives the manager-owned options, read from the installed
    redis-py: libraries that build a pool from a full set of options pass them (Celery's
    result backend does), and a default asks nothing of the manager."""
    found: dict[str, list[Any]] = {name: [None] for name in _MANAGER_OWNED}
    for call in (redis.Redis.__init__, redis.Connection.__init__, redis.SSLConnection.__init__,
                 redis.connection.AbstractConnection.__init__):
        for name, parameter in inspect.signature(call).parameters.items():
            if name in found and parameter.default is not inspect.Parameter.empty:
                found[name].append(parameter.default)
    found["ssl"].append(False)
    found["connection_class"].append(redis.Connection)
    return {name: tuple(values) for name, values in found.items()}


_DEFAULTS = _redis_py_defaults()


def refuse_manager_owned(connection_kwargs: dict[str, Any], own_class: type | None = None) -> str | None:
    """Drop from ``connection_kwargs`` (in place) the manager-owned options a worker gave
    redis-py's default values (the asyncio pool's check too), and refuse the others.

    ``host`` and ``port`` (or a socket path) say where the caller thinks Redis is:
    returned as a location, which the pool checks against the manager's Redis at
    attach. ``own_class`` is the pool's connection class, accepted as
    ``connection_class``.
    """
    location = None
    host, port = connection_kwargs.pop("host", None), connection_kwargs.pop("port", None)
    path = connection_kwargs.pop("unix_socket_path", None) or connection_kwargs.pop("path", None)
    connection_kwargs.pop("path", None)
    if path:
        location = str(path)
    elif host is not None or port is not None:
        location = f"{host or 'localhost'}:{port or 6379}"
    for name in sorted(set(connection_kwargs) & _MANAGER_OWNED):
        value = connection_kwargs[name]
        if name in _LABELS or any(value is d or (type(value) is type(d) and value == d) for d in _DEFAULTS[name]):
            del connection_kwargs[name]
        elif name == "connection_class" and own_class is not None and isinstance(value, type) and issubclass(value, own_class):
            pass  # a subclass of the pool's own (kombu's, which tells its event loop of a disconnect): kept
        else:
            raise errors.ConfigError(
                name, "***" if name in ("password", "credential_provider") else value,
                "not settable in a worker: the sharedpool manager owns the Redis connections "
                "(set it on 'sharedpool serve', e.g. in --redis-url)",
            )
    return location


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
        redis_location = clone.pool_options(connection_kwargs)
        redis_location = refuse_manager_owned(connection_kwargs, LeasedConnection) or redis_location
        self.config = client_config(socket_path=socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout)
        self.db: int | None = clone.database(connection_kwargs.pop("db", None))
        self._requested_protocol = connection_kwargs.get("protocol")
        # Where a URL given to from_url said Redis is: checked against the manager's at attach.
        self.redis_location: str | None = redis_location
        connection_class = connection_kwargs.pop("connection_class", LeasedConnection)
        super().__init__(connection_class=connection_class, **connection_kwargs)
        clone.record_for_clones(
            self.connection_kwargs, self.config.socket_path, acquire_timeout, manager_timeout, self.db, redis_location
        )
        process.register(self)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SharedConnectionPool:  # type: ignore[override]
        """A pool for the database and client options of a ``redis://`` or ``unix://`` URL.

        The manager owns where Redis is and how to log in: a password or
        user name in the URL is dropped (never sent anywhere), and the host
        and port (or socket path) must name the manager's own Redis, which
        is checked at the first lease (``Misconfigured`` otherwise). Keyword
        arguments win over the URL's query options, except ``db``, which
        the URL sets when it names one (as in redis-py).
        """
        options, location = clone.parse_redis_url(url)
        return cls(**{**kwargs, **options, "redis_location": location})

    def __reduce__(self) -> tuple[Any, ...]:
        # A spawned process rebuilds the pool from its options; the fds, the
        # table and the channel are this process's and stay here.
        return (_rebuild_pool, (type(self), clone.clone_kwargs(self.connection_kwargs)))

    def __repr__(self) -> str:
        att = self._attachment
        name = att.pool_name if att is not None else "?"
        held = att.held if att is not None else 0
        cached = len(att.conns) if att is not None else 0
        return f"<SharedConnectionPool {self.config.socket_path} pool={name!r} [{held} leased here, {cached} slots cached]>"

    # ----- timeouts (attaching, detaching, threads' takers: Attaching) -------

    def _acquire_timeout(self, att: Attachment) -> float:
        return self.config.acquire_timeout or att.acquire_timeout

    def call_bound(self) -> float:
        """Seconds one call may spend on the pool in all, retries included: manager_timeout + acquire_timeout."""
        return retry_budget.call_bound(self.config, self._attachment)

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
        body = protocol.encode_demand(db)[protocol.HEADER.size :]
        try:
            att.channel.call(FrameType.DEMAND, body, FrameType.ACK, max(0.05, deadline - time.monotonic()))
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
        return att.channel.request(protocol.encode_empty(FrameType.STATS), FrameType.STATS_REPLY, timeout=10.0)

    # ----- hooks for servers -----------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """Drop the parent's state in a forked child (``os.fork`` runs this by itself)."""
        # A lock held by a parent thread at fork time would never be
        # released in the child: start with fresh ones.
        self._fork_lock = threading.RLock()
        self._lock = threading.RLock()
        self._checkpid()

    def abort(self) -> int:
        """A dying worker's hook (gunicorn ``worker_abort``): give up this process's
        leases now, even those a stuck thread is in, and close the channel.

        The manager shuts each such connection down (which wakes a thread
        blocked reading from it) and replaces it. Takes no lock the stuck
        thread may hold. Returns how many leases and channels it ended.
        """
        att = self._attachment
        if self.pid != os.getpid() or att is None:
            return 0
        return att.abort()


def _rebuild_pool(cls: type[SharedConnectionPool], kwargs: dict[str, Any]) -> SharedConnectionPool:
    return cls(**kwargs)
