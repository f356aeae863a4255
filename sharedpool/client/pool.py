"""``SharedConnectionPool``: redis-py's pool interface over leases from the manager.

Per process, the pool keeps one ``LeasedConnection`` per slot it has seen,
bound to this process's dup of that slot's fd for the current generation;
per thread, one control channel. ``get_connection`` asks the manager for a
lease over the thread's channel and returns the slot's connection object;
``release`` tells the manager how the lease ended. No lock is held while
waiting for the manager, so threads of one process never block each other.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from sharedpool import errors, protocol
from sharedpool.client.channel import ControlChannel
from sharedpool.client.connection import LeasedConnection
from sharedpool.config import client_config
from sharedpool.protocol import Outcome

log = logging.getLogger("sharedpool.client")

# Settings that belong to the manager: a worker cannot change them per lease.
_MANAGER_OWNED = frozenset({
    "host", "port", "path", "unix_socket_path", "password", "username", "credential_provider",
    "client_name", "lib_name", "lib_version", "driver_info", "ssl", "ssl_keyfile", "ssl_certfile",
    "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "socket_keepalive",
    "socket_keepalive_options", "socket_connect_timeout", "redis_connect_func", "connection_class",
    "cache", "cache_config", "maint_notifications_config",
})

_POOLS: weakref.WeakSet[SharedConnectionPool] = weakref.WeakSet()

_OUR_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep
    for module in (sys.modules["sharedpool"], redis)
    if module.__file__
)
_LIB_DIRS = _OUR_DIRS + (os.path.dirname(contextmanager.__code__.co_filename) + os.sep + "contextlib",)


_CALLER_TEXT: dict[tuple[Any, int], str] = {}


def _caller() -> str:
    """The first frame outside sharedpool and redis-py: where the lease was asked for.

    Sent with every ACQUIRE so a leak warning can name the line; the text
    of each (code, line) is built once.
    """
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


class SharedConnectionPool(redis.ConnectionPool):
    """A redis-py ``ConnectionPool`` whose connections are leases from a sharedpool manager.

    ``socket_path`` (or ``SHAREDPOOL_SOCKET``) names the manager;
    ``acquire_timeout`` bounds the wait for a lease (default: the manager's);
    ``manager_timeout`` is how long to keep retrying while no manager
    answers (0: raise ``ManagerUnavailable`` at once). ``sticky`` (off by
    default; ``SHAREDPOOL_STICKY=1``) keeps a clean lease parked in the
    thread between uses until the manager recalls it. Other keyword
    arguments are redis-py connection options (``decode_responses``,
    ``socket_timeout``, ``retry``, ``protocol``, ``db``...). Options the
    manager owns (host, password, ssl, ...) are refused.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        acquire_timeout: float | None = None,
        manager_timeout: float | None = None,
        sticky: bool | None = None,
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
        self.config = client_config(
            socket_path=socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout, sticky=sticky
        )
        self._sticky_wanted = self.config.sticky
        self._requested_protocol = connection_kwargs.get("protocol")
        self._requested_db = connection_kwargs.pop("db", None)
        connection_kwargs.setdefault(
            "retry", Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), retries=3)
        )
        self._timeout_ms = (
            protocol.DEFAULT_TIMEOUT if not self.config.acquire_timeout else int(self.config.acquire_timeout * 1000)
        )
        # The longest the manager may make us wait; past it, it is hung.
        self._reply_timeout = (self.config.acquire_timeout or 60.0) + 5.0
        super().__init__(connection_class=LeasedConnection, **connection_kwargs)
        _POOLS.add(self)

    def __repr__(self) -> str:
        welcome = self._welcome or {}
        return (
            f"<SharedConnectionPool {self.config.socket_path} pool={welcome.get('pool', '?')!r} "
            f"[{len(self._in_use_connections)} leased here, {len(self._slots)} slots cached]>"
        )

    # ----- per-process state ---------------------------------------------

    def reset(self) -> None:
        """Start this process's state afresh (also what a forked child does)."""
        old_slots: dict[int, LeasedConnection] = getattr(self, "_slots", {})
        old_channels: list[ControlChannel] = getattr(self, "_channels", [])
        old_notifier: _Notifier | None = getattr(self, "_notifier", None)
        inherited = getattr(self, "pid", os.getpid()) != os.getpid()
        self.pid = os.getpid()
        self._local = threading.local()
        self._slots: dict[int, LeasedConnection] = {}
        self._slots_lock = threading.Lock()
        self._channels: list[ControlChannel] = []
        self._notifier: _Notifier | None = None
        self._park_lock = threading.Lock()
        self._parked: dict[int, LeasedConnection] = {}  # lease id -> parked connection
        self._recalled: set[int] = set()  # recalled while in use: give back at release
        self._epoch: str | None = None
        self._welcome: dict[str, Any] | None = None
        self._connection_kwargs_checked = False
        self._created_connections = 0
        self._available_connections: list[Any] = []
        self._in_use_connections: set[Any] = set()
        if inherited:
            # The parent's fds and channel are the parent's: close our copies,
            # tell no one (DESIGN fact 5).
            for conn in old_slots.values():
                conn.shared_pool = None  # type: ignore[assignment]
                conn.lease_id = 0
                conn.disconnect()
            # Every thread's channel, not only the forking thread's: otherwise
            # the child would keep the parent's other channels open after the
            # parent died, and the manager would not see their EOF.
            for channel in old_channels:
                channel.abandon()
            if old_notifier is not None:
                old_notifier.channel.abandon()  # its thread did not survive the fork

    def _checkpid(self) -> None:
        if self.pid != os.getpid():
            with self._fork_lock:
                if self.pid != os.getpid():
                    self.reset()

    def _channel(self) -> ControlChannel:
        channel: ControlChannel | None = getattr(self._local, "channel", None)
        if channel is not None and not channel.closed:
            return channel
        channel = self._open_channel()
        self._local.channel = channel
        return channel

    def _open_channel(self) -> ControlChannel:
        deadline_wait = self.config.manager_timeout
        waited = 0.0
        delay = 0.05
        while True:
            try:
                channel = ControlChannel(self.config.socket_path, reply_timeout=self._reply_timeout)
                break
            except errors.ManagerUnavailable:
                if waited >= deadline_wait:
                    raise
                threading.Event().wait(delay)
                waited += delay
                delay = min(delay * 2, 0.5)
        try:
            self._adopt(channel.welcome)
        except BaseException:
            channel.close()
            raise
        with self._slots_lock:
            self._channels.append(channel)
        return channel

    def _adopt(self, welcome: dict[str, Any]) -> None:
        epoch = str(welcome.get("epoch"))
        if self._epoch is not None and epoch != self._epoch:
            log.warning("manager restarted (epoch %s -> %s): dropping cached connections", self._epoch, epoch)
            with self._slots_lock:
                slots, self._slots = self._slots, {}
            with self._park_lock:
                # Parked leases were the old manager's: nothing to give back.
                self._parked.clear()
                self._recalled.clear()
            for conn in slots.values():
                if not conn.lease_id:
                    conn.disconnect()
        self._epoch = epoch
        self._welcome = welcome
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

    # ----- redis-py pool interface -----------------------------------------

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> LeasedConnection:
        self._checkpid()
        local = self._local
        parked: tuple[int, LeasedConnection] | None = getattr(local, "parked", None)
        if parked is not None:
            # The steady state of a sticky lease: no frame, no syscall.
            local.parked = None
            lease_id, conn = parked
            with self._park_lock:
                still_parked = self._parked.pop(lease_id, None) is conn
            if still_parked:
                conn.resume_lease()
                self._in_use_connections.add(conn)
                return conn
        channel = self._channel()
        if self._sticky_wanted and self._notifier is None and (self._welcome or {}).get("sticky"):
            self._start_notifier()
        try:
            grant, fd = channel.acquire(self._timeout_ms, _caller())
        except errors.ManagerUnavailable:
            # The channel died with its manager (found on this send, or an
            # EOF instead of a reply): a restarted manager knows nothing of
            # the request, so asking it once on a fresh channel is safe.
            if not channel.closed:
                raise
            channel = self._channel()
            grant, fd = channel.acquire(self._timeout_ms, _caller())
        try:
            conn = self._bind(channel, grant.slot, grant.generation, grant.lease_id, fd)
        except BaseException:
            channel.release(grant.lease_id, Outcome.BROKEN)
            raise
        conn.begin_lease(grant.lease_id, channel)
        conn.sticky = grant.sticky
        self._in_use_connections.add(conn)
        return conn

    def _bind(self, channel: ControlChannel, slot: int, generation: int, lease_id: int, fd: int | None) -> LeasedConnection:
        if fd is None:
            conn = self._slots.get(slot)
            if conn is not None and conn.generation == generation and conn._sock is not None:
                return conn
            fd = channel.fetch_fd(lease_id)
        sock = socket.socket(fileno=fd)
        with self._slots_lock:
            stale = self._slots.get(slot)
            conn = self._make(slot, generation, sock)
            self._slots[slot] = conn
        if stale is not None and stale is not conn:
            stale.disconnect()  # an older generation: only our copy of a dead fd
        return conn

    def _make(self, slot: int, generation: int, sock: socket.socket) -> LeasedConnection:
        welcome = self._welcome or {}
        kwargs = dict(self.connection_kwargs)
        kwargs["protocol"] = int(welcome.get("protocol", 3))
        kwargs["db"] = int(welcome.get("db", 0))
        return LeasedConnection(
            shared_pool=self, slot=slot, generation=generation, sock=sock,
            redis_label=str(welcome.get("redis", "")), **kwargs,
        )

    def make_connection(self) -> LeasedConnection:
        raise errors.LeaseError("SharedConnectionPool makes no connections of its own; use get_connection()")

    def release(self, connection: Any) -> None:
        if not isinstance(connection, LeasedConnection) or connection.shared_pool is not self:
            if isinstance(connection, LeasedConnection) and connection.pid != os.getpid():
                return  # inherited across fork: the parent's, not ours to return
            raise errors.LeaseError(f"{connection!r} does not belong to {self!r}")
        if connection.pid != os.getpid():
            return
        lease_id, channel = connection.lease_id, connection.channel
        if connection.revoked or connection.returned_early:
            # Already given back: revoked by the manager, or returned while
            # redis-py's retry looked for a replacement that never came.
            connection.revoked = ""
            connection.returned_early = False
            self._in_use_connections.discard(connection)
            return
        if not lease_id or channel is None or lease_id in self._parked:
            raise errors.LeaseError(f"{connection!r} is not leased: released twice?")
        outcome = connection.outcome()
        if outcome is Outcome.CLEAN and connection.sticky and self._notifier is not None and self._park(connection, lease_id, channel):
            self._in_use_connections.discard(connection)
            return
        connection.lease_id = 0
        connection.channel = None
        self._in_use_connections.discard(connection)
        if channel.revoked:
            channel.revoked.pop(lease_id, None)  # a notice that arrived while the lease went unused
        if outcome is Outcome.BROKEN or channel.closed:
            # A closed channel means the manager that lent it is gone: the
            # connection is no longer anyone's to reuse.
            connection.disconnect()
        channel.release(lease_id, outcome)

    def _park(self, connection: LeasedConnection, lease_id: int, channel: ControlChannel) -> bool:
        """Keep a clean lease in this thread instead of returning it; False if it must go back."""
        local = self._local
        if channel.closed or getattr(local, "channel", None) is not channel or getattr(local, "parked", None) is not None:
            return False  # one parked lease per thread, on the thread's own channel
        with self._park_lock:
            if lease_id in self._recalled:
                self._recalled.discard(lease_id)
                return False  # the manager wants it back
            self._parked[lease_id] = connection
        local.parked = (lease_id, connection)
        return True

    def _on_recall(self, lease_id: int) -> None:
        """Runs on the notify thread: give a parked lease back, or mark an in-use one."""
        with self._park_lock:
            conn = self._parked.pop(lease_id, None)
            if conn is None:
                if len(self._recalled) > 10_000:
                    self._recalled.clear()  # ids of leases that ended before their recall arrived
                self._recalled.add(lease_id)
                return
            channel = conn.channel
            conn.lease_id = 0
            conn.channel = None
        if channel is not None:
            channel.release(lease_id, Outcome.CLEAN)

    def _release_parked(self) -> None:
        """Give every parked lease back (exit, disconnect, lost notify channel)."""
        with self._park_lock:
            parked, self._parked = self._parked, {}
            self._recalled.clear()
        for lease_id, conn in parked.items():
            channel = conn.channel
            conn.lease_id = 0
            conn.channel = None
            if channel is not None and channel.pid == os.getpid():
                channel.release(lease_id, Outcome.CLEAN)

    def _start_notifier(self) -> None:
        try:
            self._notifier = _Notifier(self)
        except errors.SharedPoolError as exc:
            log.warning("no notify channel (%s): leases will not be sticky", exc)
            self._sticky_wanted = False

    def _notifier_gone(self, notifier: _Notifier) -> None:
        if self._notifier is notifier:
            self._notifier = None
            self._release_parked()

    def owns_connection(self, connection: Any) -> bool:
        return isinstance(connection, LeasedConnection) and connection.shared_pool is self and connection.pid == self.pid

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Drop this process's cached fds (never the manager's connections) and channels."""
        self._checkpid()
        # Stop parking first, so no thread parks a lease after the sweep below.
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.stop()
        self._release_parked()
        with self._slots_lock:
            slots = list(self._slots.values())
            channels, self._channels = self._channels, []
        for conn in slots:
            if conn.lease_id and not inuse_connections:
                continue
            conn.disconnect()
        for channel in channels:
            if inuse_connections or not any(c.channel is channel for c in slots if c.lease_id):
                channel.close()

    def close(self) -> None:
        self.disconnect()

    def get_connection_count(self) -> list[tuple[int, dict[Any, Any]]]:
        return []

    # ----- internals used by LeasedConnection ------------------------------

    def _forget_slot(self, conn: LeasedConnection) -> None:
        with self._slots_lock:
            if self._slots.get(conn.slot) is conn:
                del self._slots[conn.slot]

    def _replace_lost_lease(self, conn: LeasedConnection) -> socket.socket:
        """Give back a lost lease and bind ``conn`` to a fresh one, for redis-py's retry."""
        if conn.pid != os.getpid():
            raise errors.LeaseLost("connection inherited across fork cannot reconnect")
        channel = conn.channel
        if conn.revoked:
            raise errors.LeaseLost(conn.revoked)
        if conn.returned_early:
            channel = self._channel()  # an earlier replacement failed; try again
        elif not conn.lease_id or channel is None:
            raise errors.LeaseLost(f"{conn!r} is not leased; get one from the pool")
        else:
            channel.poll_unsolicited()
            message = channel.revoked.pop(conn.lease_id, "")
            if message:
                # Not retried on a new lease: the limit exists to stop this holder.
                conn.revoked = message
                conn.lease_id = 0
                conn.channel = None
                raise errors.LeaseLost(message)
            channel.release(conn.lease_id, Outcome.BROKEN)
        self._in_use_connections.discard(conn)
        conn.lease_id = 0
        conn.channel = None
        conn.returned_early = True
        channel = self._channel()
        grant, fd = channel.acquire(self._timeout_ms, _caller())
        conn.returned_early = False
        try:
            if fd is None:
                cached = self._slots.get(grant.slot)
                if cached is not None and cached.generation == grant.generation and cached._sock is not None:
                    fd = os.dup(cached._sock.fileno())
                else:
                    fd = channel.fetch_fd(grant.lease_id)
            sock = socket.socket(fileno=fd)
        except BaseException:
            channel.release(grant.lease_id, Outcome.BROKEN)
            conn.returned_early = True
            raise
        with self._slots_lock:
            stale = self._slots.get(grant.slot)
            self._slots[grant.slot] = conn
        if stale is not None and stale is not conn:
            stale.shared_pool = None  # type: ignore[assignment]
            stale.disconnect()
        conn.slot, conn.generation = grant.slot, grant.generation
        conn._sock = sock  # type: ignore[assignment]  # redis-py declares it None-typed
        conn.begin_lease(grant.lease_id, channel)
        conn.sticky = grant.sticky
        self._in_use_connections.add(conn)
        return sock

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
        self._channel()
        return dict(self._welcome or {})

    def stats(self) -> dict[str, Any]:
        """The manager's stats snapshot."""
        self._checkpid()
        return self._channel().request(protocol.encode_empty(protocol.FrameType.STATS), protocol.FrameType.STATS_REPLY)


class _Notifier:
    """The process's notify channel and the daemon thread that reads RECALLs on it."""

    def __init__(self, pool: SharedConnectionPool) -> None:
        self.pool = pool
        self.channel = ControlChannel(pool.config.socket_path, reply_timeout=None, role="notify", on_recall=pool._on_recall)
        self.thread = threading.Thread(target=self._run, name="sharedpool-notify", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.channel.listen()
        except Exception as exc:  # EOF, manager gone: sticky leases end with it
            log.debug("notify channel ended: %s", exc)
        finally:
            self.channel.close()
            self.pool._notifier_gone(self)

    def stop(self) -> None:
        self.channel.wake_and_close()


class _PinnedPool:
    """Hands out one already-leased connection, for ``SharedRedis.lease()``."""

    def __init__(self, pool: SharedConnectionPool, connection: LeasedConnection) -> None:
        self._pool = pool
        self._connection = connection

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> LeasedConnection:
        if self._connection is None:
            raise errors.LeaseError("this lease() block has ended; use the client it came from")
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
            pinned._connection = None  # type: ignore[assignment]
            pool.release(conn)


def Redis(
    socket_path: str | None = None,
    *,
    acquire_timeout: float | None = None,
    manager_timeout: float | None = None,
    sticky: bool | None = None,
    single_connection_client: bool = False,
    **redis_kwargs: Any,
) -> SharedRedis:
    """A ``redis.Redis`` whose connections are leased from the sharedpool manager.

    Keyword arguments are those of ``redis.Redis`` that concern the client
    (``decode_responses``, ``socket_timeout``, ``retry``, ``protocol``...).
    """
    pool = SharedConnectionPool(
        socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout, sticky=sticky, **redis_kwargs
    )
    client = SharedRedis(connection_pool=pool, single_connection_client=single_connection_client)
    client.auto_close_connection_pool = True
    return client


def _reset_pools_in_child() -> None:
    for pool in list(_POOLS):
        try:
            # A lock held by a parent thread at fork time would never be
            # released in the child: start with fresh ones.
            pool._fork_lock = threading.RLock()
            pool._lock = threading.RLock()
            pool._checkpid()
        except Exception:  # never let one pool break a fork
            log.debug("pool reset after fork failed", exc_info=True)


def _release_parked_at_exit() -> None:
    # A worker leaving normally (gunicorn max_requests) gives its parked
    # leases back clean, so its exit costs Redis no new connection.
    for pool in list(_POOLS):
        try:
            if pool.pid == os.getpid():
                pool._release_parked()
        except Exception:
            pass


os.register_at_fork(after_in_child=_reset_pools_in_child)
atexit.register(_release_parked_at_exit)
