"""``SharedConnectionPool``: redis-py's pool interface over the manager's lease table.

A lease is a lock on one byte of the shared table plus a row written
(``sharedpool.table``): ``get_connection`` scans the rows, locks a ready
slot and returns this process's connection object for it; ``release``
writes how the lease ended and unlocks. The manager hears of a lease only
when it has work to do: a first fd for a (slot, generation), a slot to
open, a reset, a broken connection.

Per process (one ``_Attachment`` per manager epoch): the control channel,
the mapped table, and one ``LeasedConnection`` per slot bound to this
process's dup of that slot's fd. Per thread: its own open file description
of the table (DESIGN fact 11: locks of one description do not exclude each
other) and, once it has had to wait, a datagram socket it is woken on.
"""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from sharedpool import errors, protocol
from sharedpool import table as tbl
from sharedpool.client import process
from sharedpool.client.channel import ControlChannel
from sharedpool.client.connection import Lease, LeasedConnection, LeaseState
from sharedpool.config import client_config
from sharedpool.protocol import FrameType, ReportCause
from sharedpool.table import Flag, Outcome, RowState

log = logging.getLogger("sharedpool.client")

# Settings that belong to the manager: a worker cannot change them per lease.
_MANAGER_OWNED = frozenset({
    "host", "port", "path", "unix_socket_path", "password", "username", "credential_provider",
    "client_name", "lib_name", "lib_version", "driver_info", "ssl", "ssl_keyfile", "ssl_certfile",
    "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "socket_keepalive",
    "socket_keepalive_options", "socket_connect_timeout", "redis_connect_func", "connection_class",
    "cache", "cache_config", "maint_notifications_config",
})

# A waiter looks at the table this often even unwoken: a wake lost to a
# waker that died between picking us and sending costs at most this much.
_RESCAN_S = 0.05
# How often a process checks that the manager that lent it the table lives.
_LIVENESS_S = 0.1
# Header flags as plain ints: IntFlag arithmetic is Python code, and the hot path reads them.
_STOPPING = int(Flag.STOPPING)
_PAUSED = int(Flag.PAUSED)
_REDIS_DOWN = int(Flag.REDIS_DOWN)
_READY = int(RowState.READY)
# Yields before queueing when no slot is free. Measured with 8 Redis-bound
# workers on 2 connections (2 cores): 0 spins 0.41x plain throughput, 4
# 0.67x, 16 0.81x, 64 0.80x; the price is fairness (a spinning newcomer
# may take a slot before a queued waiter: p99 wait 10 -> 20 ms there).
_SPINS = 16
_OPEN_STATES = frozenset({int(RowState.READY), int(RowState.HELD)})

_OUR_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep
    for module in (sys.modules["sharedpool"], redis)
    if module.__file__
)
_LIB_DIRS = _OUR_DIRS + (os.path.dirname(contextmanager.__code__.co_filename) + os.sep + "contextlib",)
_CALLER_TEXT: dict[tuple[Any, int], str] = {}


def _caller() -> str:
    """The first frame outside sharedpool and redis-py: where the lease was asked for."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_LIB_DIRS):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return ""
    code = frame.f_code
    key = (code, frame.f_lineno)
    text = _CALLER_TEXT.get(key)
    if text is None:
        text = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        if len(_CALLER_TEXT) < 10_000:
            _CALLER_TEXT[key] = text
    return text


def _process_start(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return 0.0


_WAKER: tuple[int, socket.socket] | None = None


def _process_waker() -> socket.socket:
    """One unbound datagram socket per process to send wakes from (any thread may)."""
    global _WAKER
    waker = _WAKER
    if waker is None or waker[0] != os.getpid():
        waker = (os.getpid(), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK))
        _WAKER = waker
    return waker[1]


class _Attachment:
    """This process's view of one manager (one epoch): channel, table, cached connections."""

    def __init__(self, channel: ControlChannel) -> None:
        welcome = channel.welcome
        geometry = welcome.get("table") or {}
        self.channel = channel
        self.welcome = welcome
        self.epoch = str(welcome.get("epoch", ""))
        self.pool_name = str(welcome.get("pool", "?"))
        self.table = tbl.Table(channel.table_fd, int(geometry["capacity"]), int(geometry["waiter_capacity"]))
        self.pid = os.getpid()
        self.start = _process_start(self.pid)
        self.conns: dict[int, LeasedConnection] = {}
        self.sites: dict[str, int] = {}
        self.held = 0  # leases this process holds on this table
        self.detached = False
        self.checked_at = time.monotonic()
        # Every thread's state, so that detaching closes their descriptions
        # now rather than at garbage collection.
        self.thread_states: weakref.WeakSet[_ThreadState] = weakref.WeakSet()
        self.max_lease_time = float(welcome.get("max_lease_time", 0) or 0)
        self.acquire_timeout = float(welcome.get("acquire_timeout", 5.0) or 5.0)
        self.lease_limit = int(welcome.get("max_leases_per_worker", 0) or 0)

    def manager_alive(self) -> bool:
        try:
            return tbl.is_locked(self.table.fd, tbl.ALIVE_LOCK, exclusive=False)
        except OSError:
            return False

    def site_id(self, text: str) -> int:
        site = self.sites.get(text)
        if site is None:
            if len(self.sites) >= 10_000:
                return 0
            site = len(self.sites) + 1
            self.sites[text] = site
            self.channel.notify(protocol.encode_site(site, text))
        return site


class _ThreadState:
    """One thread's own description of the table, and its wake socket. Closed with the thread."""

    def __init__(self, attachment: _Attachment) -> None:
        self.lock_fd = -1
        self.wake: socket.socket | None = None
        self.poller = select.poll()
        self.token = 0
        self.attachment = attachment
        self.pid = os.getpid()
        self.lock_fd = tbl.own_description(attachment.table.fd)
        attachment.thread_states.add(self)
        # Slots this thread holds: its own description does not exclude
        # itself, so these must never be taken for abandoned rows.
        self.held: set[int] = set()
        self.last_slot = -1
        # (slot, generation) the manager refused an fd for: not to be taken again.
        self.avoid: set[tuple[int, int]] = set()

    def wake_socket(self) -> socket.socket:
        if self.wake is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            for _ in range(8):
                token = random.getrandbits(32) or 1
                try:
                    sock.bind(tbl.wake_address(self.attachment.epoch, self.pid, token))
                    break
                except OSError:
                    continue
            else:
                sock.close()
                raise errors.SharedPoolError("could not bind a wake socket for waiting")
            self.wake, self.token = sock, token
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)
        return self.wake

    def close(self) -> None:
        # In a forked child these are the parent's descriptions too: closing
        # our copy never unlocks what the parent holds (DESIGN fact 12).
        if self.lock_fd >= 0:
            try:
                os.close(self.lock_fd)
            except OSError:
                pass
            self.lock_fd = -1
        if self.wake is not None:
            self.wake.close()
            self.wake = None

    def __del__(self) -> None:
        self.close()


class SharedConnectionPool(redis.ConnectionPool):
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
        refused = sorted(set(connection_kwargs) & _MANAGER_OWNED)
        if refused:
            raise errors.ConfigError(
                refused[0], connection_kwargs[refused[0]],
                "not settable in a worker: the sharedpool manager owns the Redis connections "
                "(set it on 'sharedpool serve', e.g. in --redis-url)",
            )
        connection_kwargs.pop("max_connections", None)
        self.config = client_config(socket_path=socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout)
        self._requested_protocol = connection_kwargs.get("protocol")
        self._requested_db = connection_kwargs.pop("db", None)
        connection_kwargs.setdefault(
            "retry", Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), retries=3)
        )
        super().__init__(connection_class=LeasedConnection, **connection_kwargs)
        process.register(self)

    def __repr__(self) -> str:
        att = self._attachment
        name = att.pool_name if att is not None else "?"
        held = att.held if att is not None else 0
        cached = len(att.conns) if att is not None else 0
        return f"<SharedConnectionPool {self.config.socket_path} pool={name!r} [{held} leased here, {cached} slots cached]>"

    # ----- per-process state ---------------------------------------------

    def reset(self) -> None:
        """Start this process's state afresh (also what a forked child does)."""
        old: _Attachment | None = getattr(self, "_attachment", None)
        old_local: threading.local | None = getattr(self, "_local", None)
        inherited = getattr(self, "pid", os.getpid()) != os.getpid()
        self.pid = os.getpid()
        self._local = threading.local()
        self._attach_lock = threading.Lock()
        self._attachment: _Attachment | None = None
        self._created_connections = 0
        self._available_connections: list[Any] = []
        self._in_use_connections: set[Any] = set()
        if inherited:
            # The parent's fds, table and channel are the parent's: close our
            # copies, unlock nothing, tell no one (DESIGN facts 5 and 12).
            state = getattr(old_local, "state", None) if old_local is not None else None
            if state is not None:
                state.close()
            if old is not None:
                # Every parent thread's description, not only the forking
                # thread's: kept open here, one would keep a parent's lock
                # alive after the parent died (DESIGN fact 12).
                for thread_state in list(old.thread_states):
                    thread_state.close()
                for conn in old.conns.values():
                    conn.shared_pool = None
                    conn.disconnect()
                old.channel.abandon()
                old.table.close()

    def _checkpid(self) -> None:
        if self.pid != os.getpid():
            with self._fork_lock:
                if self.pid != os.getpid():
                    self.reset()

    def _attach(self, deadline: float) -> _Attachment:
        att = self._attachment
        if att is not None and not att.detached:
            now = time.monotonic()
            if now - att.checked_at < _LIVENESS_S:
                return att
            att.checked_at = now
            if att.manager_alive() and not att.channel.closed:
                return att
            log.warning("manager of pool %r (epoch %s) is gone: dropping its table and connections", att.pool_name, att.epoch)
            self._detach(att)
        if not self._attach_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise errors.ManagerUnavailable(f"no sharedpool manager at {self.config.socket_path}: another thread is still connecting")
        try:
            att = self._attachment
            if att is not None and not att.detached:
                return att
            channel = self._open_channel(deadline)
            try:
                self._check_welcome(channel.welcome)
                att = _Attachment(channel)
            except BaseException:
                channel.close()
                raise
            self._attachment = att
            return att
        finally:
            self._attach_lock.release()

    def _detach(self, att: _Attachment) -> None:
        """Forget a manager that died or restarted; leases in use end on their own."""
        att.detached = True
        if self._attachment is att:
            self._attachment = None
        for conn in list(att.conns.values()):
            if conn.state is not LeaseState.IN_USE:
                conn.disconnect()
        for state in list(att.thread_states):
            if not state.held and state.pid == os.getpid():
                state.close()  # a thread holding a lease keeps its lock until it gives it back
        att.channel.close()

    def _open_channel(self, deadline: float) -> ControlChannel:
        """Connect, retrying while no manager answers, until ``deadline``."""
        delay = 0.02
        started = time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            try:
                return ControlChannel(self.config.socket_path, connect_timeout=max(0.05, min(remaining, 5.0)))
            except errors.ManagerUnavailable as exc:
                if time.monotonic() + delay >= deadline:
                    waited = time.monotonic() - started
                    raise errors.ManagerUnavailable(f"{exc} (waited {waited:.2f} s)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _check_welcome(self, welcome: dict[str, Any]) -> None:
        versions = welcome.get("versions") or []
        if protocol.VERSION not in versions:
            raise errors.ProtocolMismatch(f"manager speaks protocol {versions}, this client {protocol.VERSION}")
        manager_protocol = int(welcome.get("protocol", 3))
        manager_db = int(welcome.get("db", 0))
        asked = self._requested_protocol
        if (asked is None and manager_protocol != 3) or (asked is not None and int(asked) != manager_protocol):
            raise errors.ProtocolMismatch(
                f"manager {welcome.get('pool')!r} set its connections up with RESP{manager_protocol}, "
                f"this client expects RESP{asked or 3}: pass protocol={manager_protocol}"
            )
        if self._requested_db is not None and int(self._requested_db) != manager_db:
            raise errors.ProtocolMismatch(
                f"manager {welcome.get('pool')!r} serves db {manager_db}, this client asked for db "
                f"{self._requested_db}: run a manager per db, or drop db="
            )

    def _thread_state(self, att: _Attachment) -> _ThreadState:
        state: _ThreadState | None = getattr(self._local, "state", None)
        if state is not None and state.attachment is att and state.lock_fd >= 0:
            return state
        if state is not None:
            state.close()
        state = _ThreadState(att)
        self._local.state = state
        return state

    def _timeouts(self, att: _Attachment) -> float:
        return self.config.acquire_timeout or att.acquire_timeout

    # ----- taking a lease ------------------------------------------------------

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> LeasedConnection:
        self._checkpid()
        return self._lease(_caller())

    def _lease(self, site_text: str, conn: LeasedConnection | None = None, budget: float = 0.0) -> LeasedConnection:
        """Take a lease and return the connection bound to it (``conn`` rebinds that object).

        The whole call is bounded by ``manager_timeout + acquire_timeout``:
        finding a manager may use the first, waiting for a lease the second,
        and whatever asks the manager something uses what is left.
        """
        started = time.monotonic()
        manager_timeout = self.config.manager_timeout
        att = self._attachment
        if att is None or att.detached or started - att.checked_at >= _LIVENESS_S:
            att = self._attach(min(started + manager_timeout, budget or float("inf")))
        acquire_timeout = self.config.acquire_timeout or att.acquire_timeout
        final = started + manager_timeout + acquire_timeout
        deadline = started + acquire_timeout
        if budget:
            # redis-py's retries re-enter here after each failure: together
            # they get no more than one call's worth of time.
            final, deadline = min(final, budget), min(deadline, budget)
        limit = att.lease_limit
        if limit and att.held >= limit:
            raise errors.WorkerLimit(
                f"pid {att.pid} already holds {limit} leases of pool {att.pool_name!r} (max_leases_per_worker={limit})"
            )
        state = getattr(self._local, "state", None)
        if state is None or state.attachment is not att or state.lock_fd < 0:
            state = self._thread_state(att)
        if state.avoid:
            state.avoid.clear()  # the manager has had time to repair what we skipped
        site = att.site_id(site_text) if site_text else 0
        while True:
            taken = None
            flags = att.table.hot()[0]
            if flags & _STOPPING:
                if not att.manager_alive():
                    self._detach(att)
                    att = self._attach(max(final - acquire_timeout, time.monotonic() + 0.5))
                    state = self._thread_state(att)
                    continue
                raise errors.ShuttingDown(f"pool {att.pool_name!r} is shutting down")
            if not flags:
                # A free slot is taken even while others are queued (they are
                # woken oldest first as slots come back): measured on 8
                # Redis-bound workers on 2 connections, strict hand-off cost
                # a context switch per lease for ~15% less throughput and a
                # worse p99 wait, and acquire_timeout still bounds every wait.
                taken = self._try_slots(att, state, site, started)
                spins = _SPINS
                while taken is None and spins:
                    # Most holds are shorter than a sleep and a wake-up:
                    # give the CPU away (to Redis, to the holder) and look
                    # again before paying for the queue.
                    spins -= 1
                    os.sched_yield()
                    taken = self._try_slots(att, state, site, started)
            if taken is None:
                taken = self._wait(att, state, site, started, deadline)
            slot, generation, seq = taken
            lease = Lease(att, slot, generation, seq, state.lock_fd, time.monotonic(), state)
            att.held += 1
            try:
                return self._bind(att, lease, conn, final, started)
            except errors.StaleSlot:
                # A row that says READY for a generation the manager has not
                # opened (scribbled): skip it until the manager repairs it.
                self._give_back(lease, Outcome.CLEAN, used=False)
                state.avoid.add((slot, generation))
                if time.monotonic() >= deadline:
                    raise errors.PoolTimeout(
                        f"no lease from pool {att.pool_name!r} within {acquire_timeout:.2f} s ({self._pressure(att)})"
                    ) from None
                continue
            except BaseException:
                self._give_back(lease, Outcome.CLEAN, used=False)
                raise

    def _try_slots(self, att: _Attachment, state: _ThreadState, site: int, started: float) -> tuple[int, int, int] | None:
        table = att.table
        state_of = table.state_of
        # The slot this thread had last first (like HikariCP's thread-local
        # list): no collision with other threads' favourites, warm caches.
        last = state.last_slot
        if last >= 0 and last in att.conns and state_of(last) == _READY:
            taken = self._try_slot(att, state, last, site, started)
            if taken is not None:
                return taken
        # Then slots whose fd we have: no frame, and the object redis-py
        # parsed with last time.
        cached = tuple(att.conns)  # other threads may bind slots meanwhile
        for slot in cached:
            if state_of(slot) == _READY:
                taken = self._try_slot(att, state, slot, site, started)
                if taken is not None:
                    return taken
        for slot in range(table.slots_in_use):
            if slot not in cached and state_of(slot) == _READY:
                taken = self._try_slot(att, state, slot, site, started)
                if taken is not None:
                    return taken
        return None

    def _try_slot(self, att: _Attachment, state: _ThreadState, slot: int, site: int, started: float) -> tuple[int, int, int] | None:
        table = att.table
        generation = table.generation_of(slot)
        if state.avoid and (slot, generation) in state.avoid:
            return None
        offset = tbl.slot_lock(slot, generation)
        if not tbl.try_lock(state.lock_fd, offset):
            return None
        seq = 0
        try:
            now = time.monotonic()
            seq = table.take_in_place(slot, generation, att.pid, att.start, now, site)
            if not seq:
                tbl.unlock(state.lock_fd, offset)
                return None
            table.count_wait(slot, now - started)
            state.held.add(slot)
            state.last_slot = slot
            return slot, generation, seq
        except BaseException:
            # Interrupted (a signal handler raised): leave the row as we found it.
            if seq:
                table.give_back_in_place(slot, generation, seq, Outcome.CLEAN, 0.0)
            tbl.unlock(state.lock_fd, offset)
            raise

    def _wait(self, att: _Attachment, state: _ThreadState, site: int, started: float, deadline: float) -> tuple[int, int, int]:
        """Every open slot is taken: queue, ask for a connection if there is room, sleep on our socket.

        Whatever interrupts the wait (a timeout, a signal handler that
        raises) takes us out of the queue, and a wake meant for us is
        passed on: nothing of the wait is left behind.
        """
        table = att.table
        wake = state.wake_socket()
        poller = state.poller
        if not tbl.lock_within(state.lock_fd, tbl.HEADER_LOCK, max(0.0, deadline - time.monotonic())):
            raise errors.PoolTimeout(f"no lease from pool {att.pool_name!r} within {self._timeouts(att):.2f} s (the lease table's queue stayed locked)")
        try:
            index = table.enqueue(att.pid, state.token, time.monotonic())
        finally:
            tbl.unlock(state.lock_fd, tbl.HEADER_LOCK)
        if index < 0:
            raise errors.PoolFull(
                f"pool {att.pool_name!r} refused to queue another waiter "
                f"(max_waiting={table.max_waiting}; {self._pressure(att)})"
            )
        taken: tuple[int, int, int] | None = None
        demanded_at = 0.0
        failed_before_demand = -1
        abandoned_checked = 0.0
        woken = False
        try:
            while True:
                flags = table.hot()[0]
                if flags & _STOPPING:
                    raise errors.ShuttingDown(f"pool {att.pool_name!r} is shutting down")
                if not flags & _PAUSED:
                    taken = self._try_slots(att, state, site, started)
                    if taken is not None:
                        return taken
                if woken:
                    # Woken, but the slot went to someone else: wait again,
                    # keeping our place in line.
                    woken = False
                    if tbl.lock_within(state.lock_fd, tbl.HEADER_LOCK, 0.1):
                        try:
                            table.requeue(index, att.pid, state.token)
                        finally:
                            tbl.unlock(state.lock_fd, tbl.HEADER_LOCK)
                now = time.monotonic()
                if now - abandoned_checked >= _RESCAN_S * 4:
                    abandoned_checked = now
                    self._find_abandoned(att, state)
                if flags & _REDIS_DOWN and failed_before_demand >= 0 and table.failed_connects != failed_before_demand and not self._any_open(att):
                    # We asked for a connection and the manager's attempt
                    # failed too: Redis is down, do not wait it out.
                    since, error = table.outage()
                    down_for = f"{time.monotonic() - since:.1f} s" if since else "a moment"
                    raise errors.RedisUnavailable(
                        f"Redis at {att.welcome.get('redis')} unreachable for {down_for} (last error: {error}); "
                        f"pool {att.pool_name!r} has no open connection (this request waited "
                        f"{time.monotonic() - started:.2f} s for the manager's new attempt)"
                    )
                if not flags & _PAUSED and now - demanded_at >= 0.5 and self._room_to_open(att):
                    demanded_at = now
                    failed_before_demand = table.failed_connects
                    self._demand(att, deadline)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.PoolTimeout(
                        f"no lease from pool {att.pool_name!r} within {self._timeouts(att):.2f} s "
                        f"({self._pressure(att, waiting_self=True)})"
                    )
                if poller.poll(min(remaining, _RESCAN_S) * 1000):
                    # One datagram per wake; any other still queued just
                    # makes the next poll return at once.
                    try:
                        wake.recv(16)
                    except BlockingIOError:
                        pass
                    woken = True
        finally:
            was_woken = False
            # Bounded even here: a frozen holder of the queue's lock must not
            # hold us past our deadline; the manager's sweep drops entries of
            # the dead, and a stale entry of a live process costs a wake.
            if tbl.lock_within(state.lock_fd, tbl.HEADER_LOCK, 0.2):
                try:
                    was_woken = table.dequeue(index, att.pid, state.token)
                finally:
                    tbl.unlock(state.lock_fd, tbl.HEADER_LOCK)
            if was_woken and taken is None:
                self._wake_one(att, state.lock_fd)  # the slot meant for us goes to the next

    def _any_open(self, att: _Attachment) -> bool:
        table = att.table
        return any(table.state_of(slot) in _OPEN_STATES for slot in range(table.slots_in_use))

    def _room_to_open(self, att: _Attachment) -> bool:
        table = att.table
        return any(table.state_of(slot) == RowState.CLOSED for slot in range(table.slots_in_use))

    def _demand(self, att: _Attachment, deadline: float) -> None:
        try:
            att.channel.call(FrameType.DEMAND, b"", FrameType.ACK, max(0.05, deadline - time.monotonic()))
        except errors.ManagerUnavailable:
            if not att.manager_alive():
                self._detach(att)
                raise
        # RedisUnavailable and ShuttingDown reach the caller as they are.

    def _find_abandoned(self, att: _Attachment, state: _ThreadState) -> None:
        """A row HELD whose lock is free lost its holder mid-lease (DESIGN fact 2): report it."""
        table = att.table
        for slot in range(table.slots_in_use):
            if table.state_of(slot) != RowState.HELD or slot in state.held:
                continue
            generation = table.generation_of(slot)
            offset = tbl.slot_lock(slot, generation)
            if not tbl.try_lock(state.lock_fd, offset):
                continue
            report = b""
            try:
                row = table.row(slot)
                if row.state is RowState.HELD and row.generation == generation:
                    table.write_row(slot, tbl.found_abandoned(row))
                    log.warning(
                        "slot %d was left held by pid %d without being given back (the holder died or dropped "
                        "its lock): reported for replacement", slot, row.holder_pid,
                    )
                    report = protocol.encode_report(slot, generation, row.lease_seq, Outcome.BROKEN, ReportCause.HOLDER_GONE)
            except tbl.RowError:
                pass
            finally:
                tbl.unlock(state.lock_fd, offset)
            if report:
                att.channel.notify(report)  # after unlocking: the manager takes the lock to repair

    def _pressure(self, att: _Attachment, waiting_self: bool = False) -> str:
        table = att.table
        states = [table.state_of(slot) for slot in range(table.slots_in_use)]
        held = states.count(RowState.HELD)
        opening = sum(states.count(state) for state in (RowState.CLOSED, RowState.MANAGER, RowState.BROKEN, RowState.RESET))
        others = max(0, table.waiters - (1 if waiting_self else 0))
        words = f"{held} of {len(states)} connections leased, {others} waiting"
        if table.flags & Flag.REDIS_DOWN:
            words += f"; Redis at {att.welcome.get('redis')} is not answering the manager"
        elif table.flags & Flag.PAUSED:
            words += "; the pool is paused"
        elif opening and held < len(states):
            words += f"; {opening} connections not open yet (being opened or replaced)"
        return words

    def _wake_one(self, att: _Attachment, lock_fd: int) -> None:
        """Hand a freed slot's turn to the oldest waiter."""
        table = att.table
        for _ in range(4):
            if not tbl.lock_within(lock_fd, tbl.HEADER_LOCK, 0.05):
                return  # the waiters rescan every _RESCAN_S anyway
            try:
                picked = table.pick_waiter()
            finally:
                tbl.unlock(lock_fd, tbl.HEADER_LOCK)
            if picked is None:
                return
            _index, pid, token = picked
            waker = _process_waker()
            try:
                waker.sendto(b"\1", tbl.wake_address(att.epoch, pid, token))
                return
            except BlockingIOError:
                return  # its queue is full: it is awake already
            except OSError:
                continue  # gone without dequeuing (killed): its rescan is moot, try the next

    # ----- binding the fd ---------------------------------------------------------

    def _bind(self, att: _Attachment, lease: Lease, conn: LeasedConnection | None, final: float, started: float) -> LeasedConnection:
        cached = att.conns.get(lease.slot)
        if conn is None and cached is not None and cached.generation == lease.generation and cached._sock is not None:
            cached.begin(lease)
            return cached
        if conn is not None and cached is not None and cached.generation == lease.generation and cached._sock is not None:
            fd = os.dup(cached._sock.fileno())
        else:
            fd = self._fetch_fd(att, lease, final, started)
        sock = socket.socket(fileno=fd)
        if conn is None:
            conn = self._make(att, lease.slot, lease.generation, sock)
            conn.begin(lease)
        else:
            conn.begin(lease, sock)
        stale = att.conns.get(lease.slot)
        att.conns[lease.slot] = conn
        if stale is not None and stale is not conn:
            stale.shared_pool = None
            stale.disconnect()  # an older generation: only our copy of a dead fd
        return conn

    def _fetch_fd(self, att: _Attachment, lease: Lease, final: float, started: float) -> int:
        body = protocol.encode_slot(FrameType.FETCH_FD, lease.slot, lease.generation)[protocol.HEADER.size :]
        try:
            _body, fd = att.channel.call(FrameType.FETCH_FD, body, FrameType.FD, max(0.05, final - time.monotonic()), want_fd=True)
        except errors.ManagerUnavailable as exc:
            raise errors.ManagerUnavailable(f"{exc} (this call waited {time.monotonic() - started:.2f} s in all)") from None
        assert fd is not None
        return fd

    def _make(self, att: _Attachment, slot: int, generation: int, sock: socket.socket) -> LeasedConnection:
        kwargs = dict(self.connection_kwargs)
        kwargs["protocol"] = int(att.welcome.get("protocol", 3))
        kwargs["db"] = int(att.welcome.get("db", 0))
        return LeasedConnection(
            shared_pool=self, slot=slot, generation=generation, sock=sock,
            redis_label=str(att.welcome.get("redis", "")), **kwargs,
        )

    def make_connection(self) -> LeasedConnection:
        raise errors.LeaseError("SharedConnectionPool makes no connections of its own; use get_connection()")

    # ----- giving it back -------------------------------------------------------------

    def release(self, connection: Any) -> None:
        if not isinstance(connection, LeasedConnection) or connection.shared_pool is not self:
            if isinstance(connection, LeasedConnection) and connection.pid != os.getpid():
                return  # inherited across fork: the parent's, not ours to return
            if isinstance(connection, LeasedConnection) and connection.shared_pool is None:
                connection.settle()
                return  # detached from a manager that is gone
            raise errors.LeaseError(f"{connection!r} does not belong to {self!r}")
        if connection.pid != os.getpid():
            return
        if connection.state is not LeaseState.IN_USE:
            if connection.state in (LeaseState.LOST, LeaseState.REVOKED):
                connection.settle()  # already given back while redis-py retried
                return
            raise errors.LeaseError(f"{connection!r} is not leased: released twice?")
        lease = connection.lease
        assert lease is not None
        outcome = Outcome.BROKEN
        try:
            outcome = connection.outcome()
            if outcome is Outcome.BROKEN:
                connection.disconnect()
        finally:
            # Whatever interrupts the above (a signal handler raising), the
            # lease ends and its lock is given back: broken if we could not tell.
            connection.end()
            self._give_back(lease, outcome)

    def _give_back(self, lease: Lease, outcome: Outcome, used: bool = True) -> None:
        att: _Attachment = lease.attachment
        table = att.table
        offset = tbl.slot_lock(lease.slot, lease.generation)
        report = False
        try:
            att.held -= 1
            now = time.monotonic()
            if used:
                table.count_hold(lease.slot, now - lease.taken_at)
            written = table.give_back_in_place(lease.slot, lease.generation, lease.seq, outcome, now)
            if written is not None and written is not Outcome.CLEAN:
                report = True
                if written is not outcome:
                    # Expired (max_lifetime, reconnect): the manager replaces it.
                    outcome = written
                    conn = att.conns.pop(lease.slot, None)
                    if conn is not None:
                        conn.disconnect()
        except ValueError:
            pass  # the table was unmapped under us (the manager is gone)
        finally:
            try:
                tbl.unlock(lease.lock_fd, offset)
            except OSError:
                pass  # the thread's description is gone (thread ended): so is the lock
            if lease.thread is not None:
                lease.thread.held.discard(lease.slot)
        if att.detached:
            conn = att.conns.pop(lease.slot, None)
            if conn is not None:
                conn.disconnect()
            return
        if report:
            att.channel.notify(protocol.encode_report(lease.slot, lease.generation, lease.seq, outcome, ReportCause.GIVEN_BACK))
        elif table.hot()[1] > 0:
            self._wake_one(att, lease.lock_fd)

    # ----- redis-py's retry after a lost connection ---------------------------------

    def connection_lost(self, conn: LeasedConnection) -> None:
        """``conn`` closed its fd: it no longer serves its slot in this process."""
        att = self._attachment
        if att is not None and att.conns.get(conn.slot) is conn:
            del att.conns[conn.slot]

    def replace_lost_lease(self, conn: LeasedConnection) -> socket.socket:
        """Give a lost lease back broken and bind ``conn`` to a fresh one, for redis-py's retry."""
        if conn.state is LeaseState.REVOKED:
            raise errors.LeaseLost(conn.why)
        lease = conn.lease
        if conn.state is LeaseState.IN_USE and lease is not None:
            att: _Attachment = lease.attachment
            row = None
            try:
                row = att.table.row(lease.slot)
            except tbl.RowError:
                pass
            if row is not None and tbl.was_revoked(row, lease.generation, lease.seq):
                why = (
                    f"lease {lease.id} of pool {att.pool_name!r} was revoked after "
                    f"{time.monotonic() - lease.taken_at:.1f} s (max_lease_time={att.max_lease_time:g} s); "
                    f"its connection was closed"
                )
                conn.end()
                conn.revoked(why)
                self._give_back(lease, Outcome.BROKEN)
                raise errors.LeaseLost(why)
            conn.lose()
            conn.retry_until = time.monotonic() + self.config.manager_timeout + self._timeouts(att)
            self._give_back(lease, Outcome.BROKEN)
        elif conn.state is not LeaseState.LOST:
            raise errors.LeaseLost(f"{conn!r} is not leased; get one from the pool")
        self._lease(_caller(), conn, budget=conn.retry_until)
        sock = conn._sock
        assert sock is not None
        return sock  # type: ignore[return-value]

    # ----- redis-py pool interface, the rest ------------------------------------------

    def owns_connection(self, connection: Any) -> bool:
        return isinstance(connection, LeasedConnection) and connection.shared_pool is self and connection.pid == self.pid

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Drop this process's cached fds (never the manager's connections) and its channel."""
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
        self._detach(att)

    def close(self) -> None:
        self.disconnect()

    def get_connection_count(self) -> list[tuple[int, dict[Any, Any]]]:
        return []

    # ----- sharedpool extras -------------------------------------------------

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
        if self.pid != os.getpid() or att is None or att.channel.closed:
            return 0
        ended = 0
        for conn in list(att.conns.values()):
            lease = conn.lease
            if conn.state is LeaseState.IN_USE and lease is not None:
                att.channel.notify(protocol.encode_report(lease.slot, lease.generation, lease.seq, Outcome.BROKEN, ReportCause.ABORTED))
                ended += 1
        # A ping makes sure the reports were read before our end closes.
        try:
            att.channel.ping(timeout=1.0)
        except errors.SharedPoolError:
            pass
        att.channel.close()
        return ended + 1


class _PinnedPool:
    """Hands out one already-leased connection, for ``SharedRedis.lease()``."""

    def __init__(self, pool: SharedConnectionPool, connection: LeasedConnection) -> None:
        self._pool = pool
        self._connection: LeasedConnection | None = connection

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> LeasedConnection:
        if self._connection is None:
            raise errors.LeaseError("this lease() block has ended; use the client it came from")
        if self._connection.pid != os.getpid():
            raise errors.LeaseLost("a lease() block's connection was inherited across fork: use the client in this process")
        return self._connection

    def release(self, connection: Any) -> None:
        pass  # the lease ends with the block, not with each command

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class SharedRedis(redis.Redis):
    """``redis.Redis`` over a ``SharedConnectionPool``, plus ``lease()``."""

    connection_pool: SharedConnectionPool

    @contextmanager
    def lease(self) -> Iterator[redis.Redis]:
        """Pin one lease for a block: every command and pipeline inside uses it.

        The yielded client is for this thread and this block only.
        """
        pool = self.connection_pool
        conn = pool.get_connection()
        pinned = _PinnedPool(pool, conn)
        client = object.__new__(type(self))
        client.__dict__.update(self.__dict__)
        client.connection_pool = pinned  # type: ignore[assignment]
        client.connection = None
        client._single_connection_client = False
        client.auto_close_connection_pool = False
        try:
            yield client
        finally:
            pinned._connection = None
            pool.release(conn)


def Redis(
    socket_path: str | None = None,
    *,
    acquire_timeout: float | None = None,
    manager_timeout: float | None = None,
    single_connection_client: bool = False,
    **redis_kwargs: Any,
) -> SharedRedis:
    """A ``redis.Redis`` whose connections are leased from the sharedpool manager.

    Keyword arguments are those of ``redis.Redis`` that concern the client
    (``decode_responses``, ``socket_timeout``, ``retry``, ``protocol``...).
    """
    pool = SharedConnectionPool(socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout, **redis_kwargs)
    client = SharedRedis(connection_pool=pool, single_connection_client=single_connection_client)
    client.auto_close_connection_pool = True
    return client
