"""The manager's event loop: control socket, the lease table, Redis I/O off the loop.

One thread runs the loop. Workers take and give back leases in the lease
table without it; the loop answers the rare frames (a first fd, a demand
for a connection, a report of a connection to reset or replace), sweeps
the table every ``reap_interval``, asks the pool core (``pool.py``) what
to do, and does it. Connecting to Redis and resetting a connection block,
so they run in a small thread pool whose results come back through a
queue and a wake-up pipe. Signal handlers only enqueue.
"""

from __future__ import annotations

import array
import enum
import errno
import fcntl
import logging
import os
import queue
import resource
import secrets
import select
import signal
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psutil

from sharedpool import __version__, protocol
from sharedpool import stats as keys
from sharedpool import table as tbl
from sharedpool.config import ManagerConfig, mask_url, socket_gid
from sharedpool.manager.backend import Backend, RedisTarget, open_backend, probe
from sharedpool.manager.pool import (
    Action,
    ReapCause,
    CloseConnection,
    Expire,
    Limits,
    OpenConnection,
    Pool,
    Publish,
    Release,
    ResetConnection,
    RowView,
    SlotState,
    Wake,
)
from sharedpool.metrics import MetricsServer
from sharedpool.protocol import ErrorCode, FrameType
from sharedpool.table import Flag, Outcome, RowState

log = logging.getLogger("sharedpool.manager")

_PEERCRED = struct.Struct("3i")
# The table has at least this many rows, so a reload can raise
# max_connections that far without a restart.
_MIN_TABLE_ROWS = 64
_MAX_WAITER_ROWS = 65536
_MAX_SITES = 100_000
_FRAMES_PER_WAKEUP = 16
# Per-worker rows in a STATS reply: ~100 bytes each, well inside MAX_FRAME.
_STATS_WORKER_ROWS = 300
# After EMFILE, stop watching the listener this long (else: a busy loop).
_ACCEPT_BACKOFF = 0.5


class ManagerAlreadyRunning(RuntimeError):
    pass


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class ClientState(enum.Enum):
    HANDSHAKE = "handshake"
    READY = "ready"
    CLOSED = "closed"


class ControlClient:
    """One accepted control connection (one per worker process, plus one-shot admin ones)."""

    __slots__ = ("sock", "pid", "uid", "state", "accepted_at", "label")

    def __init__(self, sock: socket.socket, pid: int, uid: int, now: float) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.state = ClientState.HANDSHAKE
        self.accepted_at = now
        self.label = f"pid {pid} uid {uid}"


class Manager:
    def __init__(self, config: ManagerConfig, reload: Callable[[], ManagerConfig] | None = None) -> None:
        self.config = config
        self._reload = reload
        self.target = RedisTarget.from_config(config)
        self.epoch = secrets.token_hex(8)
        capacity = max(_MIN_TABLE_ROWS, config.max_connections)
        self.table = tbl.Table.create(
            capacity, min(max(config.max_waiting, 1), _MAX_WAITER_ROWS), config.max_waiting, self.epoch.encode()
        )
        self.table.set_slots_in_use(config.max_connections)
        # Our own description of the table: the one we pass to workers is
        # shared with them, and a lock on it would live on in them.
        self._lock_fd = tbl.own_description(self.table.fd)
        self._held_locks: dict[int, int] = {}  # slot -> generation whose lock we hold
        self.pool = Pool(Limits.from_config(config, self.target.label), capacity)
        self.state = State.STARTING
        self._started_monotonic = time.monotonic()
        # epoll directly, fd -> handler: the selectors layer costs more per
        # wake-up than the rest of the loop's work.
        self._epoll = select.epoll()
        self._handlers_by_fd: dict[int, Callable[[], None]] = {}
        self._clients: dict[int, ControlClient] = {}  # socket fd -> client
        self._handshaking: set[ControlClient] = set()
        self._peer_watch: dict[int, tuple[int, int]] = {}  # backend fd -> (slot, generation)
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, min(8, config.max_connections)), thread_name_prefix="sharedpool-redis"
        )
        self._completions: queue.SimpleQueue[Callable[[float], list[Action]]] = queue.SimpleQueue()
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._waker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._listener: socket.socket | None = None
        self._lock_file_fd = -1
        self._socket_inode = -1
        self._drain_deadline = 0.0
        self._next_sweep = 0.0
        self._accept_paused_until = 0.0
        self._next_health_check = time.monotonic() + config.health_check_interval
        self.counters = self.pool.counters
        # The metrics thread only reads this reference; the loop replaces it.
        self._snapshot_cache: dict[str, Any] = {}
        self._next_snapshot = 0.0
        self._metrics: MetricsServer | None = None
        self._alive_cache: dict[tuple[int, float], bool] = {}

    def __repr__(self) -> str:
        return f"<Manager {self.config.pool_name!r} {self.state.value} {self.pool!r}>"

    # ----- lifecycle -------------------------------------------------------

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; return the process exit code."""
        self.start()
        self._install_signal_handlers()
        try:
            while self.state is not State.STOPPED:
                self.step()
        finally:
            self.close()
        return 0

    def start(self) -> None:
        _raise_fd_limit()
        self._claim_socket_path()
        # Held for our whole life: a worker that can read-lock this byte
        # knows we died, even if nobody closed anything.
        if not tbl.try_lock(self._lock_fd, tbl.ALIVE_LOCK):
            raise ManagerAlreadyRunning("the new lease table's liveness lock is taken: this cannot happen")
        listener = self._listener
        assert listener is not None
        self._watch(listener.fileno(), lambda: self._on_accept(listener))
        self._watch(self._wake_r, lambda: self._on_wake(None))
        self.state = State.RUNNING
        if self.config.metrics_port:
            self._snapshot_cache = self.snapshot()
            try:
                self._metrics = MetricsServer(
                    self.config.metrics_host, self.config.metrics_port, lambda: self._snapshot_cache
                ).start()
            except OSError as exc:
                self.close()
                raise OSError(
                    exc.errno,
                    f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port}: {exc.strerror}",
                ) from None
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self._metrics.port)
        log.info(
            "manager %r started: pid %d, socket %s, redis %s, max_connections %d, min_idle %d, epoch %s",
            self.config.pool_name, os.getpid(), self.config.socket_path, mask_url(self.config.redis_url),
            self.config.max_connections, self.config.min_idle, self.epoch,
        )
        self._perform(self.pool.dispatch(time.monotonic(), 0, 0))

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        if self.state is State.RUNNING:
            now = time.monotonic()
            self.state = State.DRAINING
            self._drain_deadline = now + self.config.shutdown_grace
            log.info(
                "stopping: no more leases; waiting up to %.1f s for %d held leases",
                self.config.shutdown_grace, self._held_count(),
            )
            self._perform(self.pool.begin_shutdown())
            self._sweep(now)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        now = time.monotonic()
        held = self._held_count()
        if held:
            log.warning("grace period over: closing %d leased connections", held)
        self.pool.shutting_down = True
        self._sync_flags()
        self._perform(self.pool.close_all(now))
        for client in list(self._clients.values()) + list(self._handshaking):
            self._drop(client, "manager stopping", sweep=False)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._listener is not None:
            self._unwatch(self._listener.fileno())
            self._listener.close()
            self._listener = None
            self._remove_socket_file()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._waker.close()
        os.close(self._lock_fd)  # drops ALIVE_LOCK: workers see we are gone
        self.table.close()
        if self._lock_file_fd >= 0:
            os.close(self._lock_file_fd)
            self._lock_file_fd = -1
        self.state = State.STOPPED
        log.info("manager %r stopped", self.config.pool_name)

    def _watch(self, fd: int, handler: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._handlers_by_fd[fd] = handler

    def _unwatch(self, fd: int) -> None:
        if self._handlers_by_fd.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def _install_signal_handlers(self) -> None:
        def enqueue(signum: int, frame: Any) -> None:
            self._signals.append(signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, enqueue)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _claim_socket_path(self) -> None:
        path = self.config.socket_path
        parent = os.path.dirname(os.path.abspath(path))
        gid = socket_gid(self.config.socket_group) if self.config.socket_group else -1
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
            if gid >= 0:
                # Members of the group may traverse to the socket, nobody else.
                os.chown(parent, -1, gid)
                os.chmod(parent, 0o750)
            else:
                os.chmod(parent, 0o700)
        info = os.stat(parent)
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise PermissionError(f"socket directory {parent} is writable by everyone; refusing to use it")
        # The lock file, held for the manager's life, decides who owns the
        # path: the kernel drops it when we die, so a stale socket file is
        # one whose lock is free.
        self._lock_file_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_file_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(self._lock_file_fd)
            os.close(self._lock_file_fd)
            self._lock_file_fd = -1
            raise ManagerAlreadyRunning(
                f"another manager (pid {owner}) already serves {path}; stop it or choose another --socket-path"
            ) from None
        os.ftruncate(self._lock_file_fd, 0)
        os.write(self._lock_file_fd, f"{os.getpid()}\n".encode())
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
            log.info("replacing stale socket file %s", path)
            os.unlink(path)
        self._bind_listener(path)

    def _bind_listener(self, path: str) -> None:
        gid = socket_gid(self.config.socket_group) if self.config.socket_group else -1
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        if gid >= 0:
            os.chown(path, -1, gid)
        os.chmod(path, self.config.socket_mode)
        listener.listen(min(socket.SOMAXCONN, 4096))
        listener.setblocking(False)
        self._listener = listener
        self._socket_inode = os.stat(path).st_ino

    def _check_socket_file(self) -> None:
        """Someone deleted or replaced our socket file (a tmp cleaner, a stray rm):
        bind a new one, so new workers find us; connected workers never noticed."""
        path = self.config.socket_path
        try:
            if os.stat(path).st_ino == self._socket_inode:
                return
            why = "replaced by another file"
        except FileNotFoundError:
            why = "deleted"
        except OSError:
            return
        log.error("control socket %s was %s: creating it again", path, why)
        old = self._listener
        if old is not None:
            self._unwatch(old.fileno())
            old.close()
            self._listener = None
        try:
            if os.path.lexists(path):
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    log.error("%s is now a file that is not a socket; not touching it: new workers cannot connect", path)
                    return
                os.unlink(path)
            self._bind_listener(path)
        except OSError as exc:
            log.error("cannot create the control socket %s again: %s", path, exc)
            return
        listener = self._listener
        assert listener is not None
        self._watch(listener.fileno(), lambda: self._on_accept(listener))

    def _remove_socket_file(self) -> None:
        path = self.config.socket_path
        try:
            if os.stat(path).st_ino == self._socket_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass

    # ----- the loop --------------------------------------------------------

    def step(self, max_wait: float = 1.0) -> None:
        now = time.monotonic()
        deadline = min(now + max_wait, self._next_sweep or now + max_wait)
        if self.pool.next_connect_at and self.pool.next_connect_at > now:
            deadline = min(deadline, self.pool.next_connect_at)
        if self._handshaking:
            deadline = min(deadline, min(c.accepted_at for c in self._handshaking) + self.config.handshake_timeout)
        if self.state is State.DRAINING:
            deadline = min(deadline, self._drain_deadline, now + 0.05)
        if self._accept_paused_until:
            deadline = min(deadline, self._accept_paused_until)
        try:
            events = self._epoll.poll(max(0.0, deadline - now))
        except InterruptedError:
            events = []
        for fd, _mask in events:
            handler = self._handlers_by_fd.get(fd)
            if handler is not None:  # an earlier handler of this batch may have closed it
                handler()
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until and self._listener is not None:
            self._accept_paused_until = 0.0
            listener = self._listener
            self._watch(listener.fileno(), lambda: self._on_accept(listener))
        self._expire_handshakes(now)
        if self.pool.next_connect_at and now >= self.pool.next_connect_at:
            self._perform(self.pool.dispatch(now, self._ready_count(), self.table.waiters))
        if now >= self._next_sweep:
            self._sweep(now)
            self._check_socket_file()
            self._next_sweep = now + self.config.reap_interval
        if self.config.health_check_interval and now >= self._next_health_check:
            self._health_check(now)
            self._next_health_check = now + self.config.health_check_interval
        while self._signals:
            self._on_signal(self._signals.popleft())
        if self._metrics is not None and now >= self._next_snapshot:
            self._snapshot_cache = self.snapshot()
            self._next_snapshot = now + 0.5
        if self.state is State.DRAINING:
            if self._held_count() == 0 or now >= self._drain_deadline:
                self.state = State.STOPPED
            else:
                self._sweep(now)

    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("received %s", signal.Signals(signum).name)
            self.stop()
        elif signum == signal.SIGHUP:
            log.info("received SIGHUP: reloading the configuration")
            self.reload()

    def reload(self) -> str:
        """Re-read the config; limits apply at once, a new Redis URL drains and replaces."""
        if self._reload is None:
            return "nothing to reload from"
        try:
            new = self._reload()
        except Exception as exc:  # a bad file must not take the manager down
            log.error("reload refused, keeping the running configuration: %s", exc)
            return f"refused: {exc}"
        old, self.config = self.config, new
        if new.socket_path != old.socket_path:
            log.warning("socket_path changes only on restart; still serving %s", old.socket_path)
            object.__setattr__(new, "socket_path", old.socket_path)
        now = time.monotonic()
        actions = self.pool.apply_limits(Limits.from_config(new, RedisTarget.from_config(new).label))
        self.table.set_slots_in_use(self.pool.limits.max_connections)
        self.table.set_max_waiting(new.max_waiting)
        if new.redis_url != old.redis_url or new.protocol != old.protocol:
            self.target = RedisTarget.from_config(new)
            log.info("Redis target changed to %s: replacing every connection", mask_url(new.redis_url))
            actions += self.pool.retire_all(now)
        self._perform(actions)
        self._sweep(now)
        log.info("configuration reloaded: %s", new)
        return "reloaded"

    # ----- the table ----------------------------------------------------------

    def _ready_count(self) -> int:
        table = self.table
        return sum(
            1 for slot in self.pool.in_state(SlotState.SHARED)
            if table.state_of(slot.index) == RowState.READY
        )

    def _held_count(self) -> int:
        table = self.table
        return sum(
            1 for slot in self.pool.in_state(SlotState.SHARED)
            if table.state_of(slot.index) == RowState.HELD
        )

    def _try_lock(self, slot: int, generation: int) -> bool:
        if self._held_locks.get(slot) == generation:
            return True
        if tbl.try_lock(self._lock_fd, tbl.slot_lock(slot, generation)):
            self._held_locks[slot] = generation
            return True
        return False

    def _unlock(self, slot: int) -> None:
        generation = self._held_locks.pop(slot, None)
        if generation is not None:
            tbl.unlock(self._lock_fd, tbl.slot_lock(slot, generation))

    def _alive(self, pid: int, start: float) -> bool:
        key = (pid, start)
        alive = self._alive_cache.get(key)
        if alive is None:
            alive = pid <= 0 or _alive(pid, start)
            self._alive_cache[key] = alive
        return alive

    def _sweep(self, now: float, only_pid: int = 0) -> None:
        """Read every shared row (untrusted), lock what can be locked, let the core decide.

        ``only_pid``: just the rows that process holds (its channel closed).
        """
        table = self.table
        self._alive_cache.clear()
        views: list[RowView] = []
        if not only_pid:
            self._repair_unshared_rows()
        for slot in self.pool.in_state(SlotState.SHARED):
            index, generation = slot.index, slot.generation
            try:
                row = table.row(index)
            except tbl.RowError:
                if not only_pid:
                    views.append(RowView(index, None, generation))
                continue
            if only_pid and (row.state is not RowState.HELD or row.holder_pid != only_pid):
                continue
            lock_free = False
            if row.generation == generation and row.state in _LOCKABLE:
                lock_free = self._try_lock(index, generation)
                if lock_free:
                    # Read again under the lock: a holder may have given it back
                    # between our read and our lock, and HELD would look abandoned.
                    try:
                        row = table.row(index)
                    except tbl.RowError:
                        self._unlock(index)
                        views.append(RowView(index, None, generation))
                        continue
            alive = True
            if row.state is RowState.HELD and not lock_free and row.generation == generation:
                alive = self._alive(row.holder_pid, row.holder_start)
            views.append(RowView(
                index, row.state, row.generation, row.lease_seq, row.holder_pid,
                row.acquired_at, row.call_site, lock_free, alive,
            ))
        if only_pid:
            self._perform(self.pool.sweep(views, now, table.waiters, idle_elsewhere=self._ready_count()))
            return
        self._perform(self.pool.sweep(views, now, table.waiters))
        self._sweep_waiters()
        # The header's limits are ours: put them back if a worker scribbled.
        if table.slots_in_use != self.pool.limits.max_connections:
            table.set_slots_in_use(self.pool.limits.max_connections)
        if table.max_waiting != min(self.config.max_waiting, table.waiter_capacity):
            table.set_max_waiting(self.config.max_waiting)

    def _repair_unshared_rows(self) -> None:
        """Rows of slots the workers do not own right now say what we last wrote, or are rewritten."""
        table = self.table
        for slot in self.pool.slots:
            if slot.state is SlotState.SHARED:
                continue
            expected = RowState.CLOSED if slot.state is SlotState.EMPTY else RowState.MANAGER
            try:
                row = table.row(slot.index)
                intact = row.state is expected and row.generation == slot.generation
            except tbl.RowError:
                intact = False
            if not intact:
                self.counters[keys.TABLE_REPAIRS] += 1
                log.warning("slot %d: row scribbled while the slot is %s: rewritten", slot.index, slot.state.value)
                self._publish(Publish(slot.index, slot.generation, expected))

    def _sweep_waiters(self) -> None:
        table = self.table
        if not table.waiters and not table.hwm():
            return
        # Never a blocking wait in the loop: a worker frozen inside the
        # queue's lock would freeze the manager with it. Next sweep, then.
        if not tbl.lock_within(self._lock_fd, tbl.HEADER_LOCK, 0.01):
            return
        try:
            table.repair_waiters()
            dead = {pid for pid in set(table.waiter_pids()) if not self._alive(pid, 0.0)}
            if dead:
                table.drop_waiters_of(dead)
        finally:
            tbl.unlock(self._lock_fd, tbl.HEADER_LOCK)
        if table.waiters and self._ready_count():
            # A wake lost to a waker that died mid-way: hand the turn on.
            self._wake(1)

    def _wake(self, count: int) -> None:
        """Wake ``count`` waiters (-1: all), oldest first."""
        table = self.table
        woken = 0
        while count < 0 or woken < count:
            if not tbl.lock_within(self._lock_fd, tbl.HEADER_LOCK, 0.01):
                return  # the waiters rescan on their own every few tens of ms
            try:
                picked = table.pick_waiter()
            finally:
                tbl.unlock(self._lock_fd, tbl.HEADER_LOCK)
            if picked is None:
                return
            _index, pid, token = picked
            try:
                self._waker.sendto(b"\1", tbl.wake_address(self.epoch, pid, token))
                woken += 1
            except BlockingIOError:
                woken += 1
            except OSError:
                continue  # gone: the sweep removes its entry

    def _publish(self, action: Publish) -> None:
        table = self.table
        index = action.slot
        try:
            old = table.row(index)
            seq, revoked_generation, revoked_seq = old.lease_seq, old.revoked_generation, old.revoked_seq
        except tbl.RowError:
            seq, revoked_generation, revoked_seq = self.pool.slots[index].seen_seq, 0, 0
        if action.revoked_seq:
            revoked_generation, revoked_seq = action.revoked_generation, action.revoked_seq
        table.write_row(index, tbl.Row(
            action.state, action.generation, lease_seq=seq,
            revoked_generation=revoked_generation, revoked_seq=revoked_seq, expires_at=action.expires_at,
        ))
        if action.state is not RowState.MANAGER:
            self._unlock(index)

    def _sync_flags(self) -> None:
        flags = Flag(0)
        if self.pool.paused:
            flags |= Flag.PAUSED
        if self.pool.shutting_down:
            flags |= Flag.STOPPING
        if self.pool.redis_down_since is not None:
            flags |= Flag.REDIS_DOWN
        if self.table.flags != flags:
            self.table.set_flags(flags)
        failed = self.pool.counters[keys.REDIS_ERRORS]
        if self.table.failed_connects != failed & 0xFFFFFFFF:
            self.table.set_outage(self.pool.redis_down_since or 0.0, self.pool.last_connect_error)
            self.table.set_failed_connects(failed)

    def _health_check(self, now: float) -> None:
        """An idle connection with EOF or bytes nobody asked for is dead or dirty."""
        for slot in self.pool.in_state(SlotState.SHARED):
            index, generation = slot.index, slot.generation
            if self.table.state_of(index) != RowState.READY or not self._try_lock(index, generation):
                continue
            if self.table.state_of(index) == RowState.READY and not slot.backend.is_quiet():
                self.counters[keys.HEALTH_CHECK_FAILED] += 1
                log.warning("health check: idle slot %d closed by Redis or holding stray data; replaced", index)
                self._perform(self.pool.discard(index, generation, "health check failed", now))
            else:
                self._unlock(index)
        self._perform(self.pool.dispatch(now, self._ready_count(), self.table.waiters))

    def _on_peer_closed(self, fd: int) -> None:
        """Redis closed one of our connections (restart, its ``timeout``): replace it now."""
        slot_gen = self._peer_watch.pop(fd, None)
        self._unwatch(fd)
        if slot_gen is None:
            return
        index, generation = slot_gen
        now = time.monotonic()
        locked = self.table.state_of(index) == RowState.READY and self._try_lock(index, generation)
        if locked and self.table.state_of(index) != RowState.READY:
            self._unlock(index)
            locked = False
        if locked:
            log.warning("slot %d closed by Redis while idle: replaced", index)
        self._perform(self.pool.peer_closed(index, generation, locked, now))
        self._perform(self.pool.dispatch(now, self._ready_count(), self.table.waiters))

    def _on_wake(self, _fileobj: Any) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                completion = self._completions.get_nowait()
            except queue.Empty:
                break
            self._perform(completion(time.monotonic()))

    def _submit(self, work: Callable[[], Any], done: Callable[[float, Future[Any]], list[Action]]) -> None:
        def finished(future: Future[Any]) -> None:
            self._completions.put(lambda now: done(now, future))
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # a full pipe already means "wake up"; a closed one means we stopped

        try:
            self._executor.submit(work).add_done_callback(finished)
        except RuntimeError:
            pass  # executor shut down: we are stopping

    # ----- performing decisions -------------------------------------------

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Publish):
                self._publish(action)
            elif isinstance(action, Wake):
                self._sync_flags()  # what they wake up to read must be there first
                self._wake(action.count)
            elif isinstance(action, Expire):
                self.table.set_expiry(action.slot, action.expires_at)
            elif isinstance(action, Release):
                if self._held_locks.get(action.slot) == action.generation:
                    self._unlock(action.slot)
                    if self.table.waiters > 0:
                        self._wake(1)  # someone may have found it locked by us a moment ago
            elif isinstance(action, OpenConnection):
                self._open(action)
            elif isinstance(action, ResetConnection):
                self._reset(action)
            elif isinstance(action, CloseConnection):
                log.debug("closing slot %s: %s", getattr(action.backend, "slot", "?"), action.reason)
                fd = getattr(action.backend, "fileno", -1)
                if self._peer_watch.pop(fd, None) is not None:
                    self._unwatch(fd)
                action.backend.close()
        self._sync_flags()

    def _send(self, client: ControlClient, frame: bytes) -> bool:
        try:
            client.sock.send(frame)
            return True
        except BlockingIOError:
            # SEQPACKET send buffers hold hundreds of our frames: a full one
            # means the worker stopped reading. It cannot be served.
            self._drop(client, "not reading its replies")
        except OSError as exc:
            self._drop(client, f"send failed ({exc.strerror or exc})")
        return False

    def _open(self, action: OpenConnection) -> None:
        target, name = self.target, self.config.pool_name

        def done(now: float, future: Future[Backend]) -> list[Action]:
            try:
                backend = future.result()
            except Exception as exc:  # any failure to connect is reported, never raised
                return self.pool.connect_failed(action.slot, action.generation, _describe(exc), now)
            log.info("connected slot %d (generation %d) to %s", action.slot, action.generation, self.target.label)
            actions = self.pool.connected(action.slot, action.generation, backend, now)
            if self.pool.slot(action.slot, action.generation) is not None and backend.fileno >= 0:
                self._watch_peer(backend.fileno, action.slot, action.generation)
            return actions

        self._submit(lambda: open_backend(target, name, action.slot), done)

    def _watch_peer(self, fd: int, slot: int, generation: int) -> None:
        # EPOLLRDHUP only: replies to workers must not wake us, Redis
        # closing the connection must.
        try:
            self._epoll.register(fd, select.EPOLLRDHUP)
        except OSError:
            return
        self._handlers_by_fd[fd] = lambda: self._on_peer_closed(fd)
        self._peer_watch[fd] = (slot, generation)

    def _reset(self, action: ResetConnection) -> None:
        backend: Backend = action.backend

        def done(now: float, future: Future[None]) -> list[Action]:
            try:
                future.result()
            except Exception as exc:
                return self.pool.reset_done(action.slot, action.generation, False, now, _describe(exc))
            return self.pool.reset_done(action.slot, action.generation, True, now)

        self._submit(backend.reset, done)

    # ----- control connections --------------------------------------------

    def _on_accept(self, listener: Any) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The pending connection keeps the listener readable:
                    # stop watching it for a while instead of spinning.
                    log.error("cannot accept control connections (%s); pausing accepts for %.1f s", exc.strerror, _ACCEPT_BACKOFF)
                    self._unwatch(listener.fileno())
                    self._accept_paused_until = time.monotonic() + _ACCEPT_BACKOFF
                    return
                continue
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        now = time.monotonic()
        sock.setblocking(False)
        pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if pid == 0:
            log.warning("control connection from a process outside our pid namespace (uid %d): "
                        "it can be reaped only when its socket closes", uid)
        client = ControlClient(sock, pid, uid, now)
        allowed = {os.getuid(), *self.config.allowed_uids}
        if uid not in allowed:
            self.counters[keys.CLIENTS_REFUSED] += 1
            log.warning("refused control connection from pid %d uid %d: uid not in allowed_uids", pid, uid)
            _refuse(sock, ErrorCode.FORBIDDEN, f"uid {uid} is not allowed to use pool {self.config.pool_name!r}")
            return
        if len(self._clients) + len(self._handshaking) >= self.config.max_clients:
            self.counters[keys.CLIENTS_REFUSED] += 1
            log.warning("refused control connection from pid %d: max_clients (%d) reached", pid, self.config.max_clients)
            _refuse(sock, ErrorCode.TOO_MANY_CLIENTS, f"manager has max_clients={self.config.max_clients} control connections")
            return
        self.counters[keys.CLIENTS_ACCEPTED] += 1
        self._handshaking.add(client)
        self._watch(sock.fileno(), lambda: self._on_readable(client))

    def _expire_handshakes(self, now: float) -> None:
        limit = self.config.handshake_timeout
        for client in [c for c in self._handshaking if now - c.accepted_at >= limit]:
            self._send(client, protocol.encode_error(ErrorCode.NOT_READY, f"no HELLO within {limit:.1f} s"))
            self._drop(client, "handshake timeout")

    def _drop(self, client: ControlClient, reason: str, sweep: bool = True) -> None:
        if client.state is ClientState.CLOSED:
            return
        was_ready = client.state is ClientState.READY
        client.state = ClientState.CLOSED
        self._handshaking.discard(client)
        fd = client.sock.fileno()
        self._clients.pop(fd, None)
        self._unwatch(fd)
        client.sock.close()
        log.debug("control connection of %s closed (%s)", client.label, reason)
        if was_ready and not any(c.pid == client.pid for c in self._clients.values()):
            for key in [k for k in self.pool.sites if k[0] == client.pid]:
                del self.pool.sites[key]
            if sweep:
                # The process may be gone: a lease it held shows as a row
                # HELD with a free lock. Look at its rows now rather than at
                # the next sweep.
                self._sweep(time.monotonic(), only_pid=client.pid)

    def _on_readable(self, client: ControlClient) -> None:
        # A worker's RELEASE and its next ACQUIRE often arrive together:
        # handle what is queued in one wake-up, up to a bound for fairness.
        for _ in range(_FRAMES_PER_WAKEUP):
            if client.state is ClientState.CLOSED:
                return
            try:
                data, _anc, flags, _addr = client.sock.recvmsg(protocol.MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(client, f"read failed ({exc.strerror or exc})")
                return
            if not data:
                self._drop(client, "closed by peer")
                return
            self._on_frame(client, data, flags)

    def _on_frame(self, client: ControlClient, data: bytes, flags: int) -> None:
        request_id = 0
        try:
            protocol.check_recv_flags(flags)
            version, frame_type, request_id, body = protocol.split(data)
            if version not in protocol.SUPPORTED_VERSIONS:
                message = (
                    f"this manager speaks sharedpool protocol {protocol.VERSION}, the client speaks {version}: "
                    f"run the same sharedpool version in the workers as in the manager"
                )
                if version == 1:
                    self._send(client, protocol.encode_v1_refusal(message))
                else:
                    self._send(client, protocol.encode_error(ErrorCode.VERSION, message, request_id))
                self._drop(client, f"unsupported protocol version {version}")
                return
            handler = self._handlers.get(frame_type)
            if handler is None:
                self._send(client, protocol.encode_error(ErrorCode.UNSUPPORTED, f"frame type {frame_type} is not supported", request_id))
                return
            if client.state is ClientState.HANDSHAKE and frame_type != FrameType.HELLO:
                self._send(client, protocol.encode_error(ErrorCode.NOT_READY, "the first frame must be HELLO", request_id))
                self._drop(client, f"frame type {frame_type} before HELLO")
                return
            handler(self, client, request_id, body)
        except protocol.ProtocolError as exc:
            self.counters[keys.PROTOCOL_ERRORS] += 1
            log.warning("malformed frame from %s: %s; closing its connection", client.label, exc)
            self._send(client, protocol.encode_error(ErrorCode.MALFORMED, str(exc), request_id))
            self._drop(client, "malformed frame")
        except Exception:
            # One worker's frame must never take the manager down: whatever
            # it triggered, only that worker's connection pays.
            self.counters[keys.PROTOCOL_ERRORS] += 1
            log.exception("internal error handling a frame from %s; closing its connection", client.label)
            if client.state is not ClientState.CLOSED:
                self._send(client, protocol.encode_error(ErrorCode.INTERNAL, "internal error; see the manager log", request_id))
                self._drop(client, "internal error")

    def _on_hello(self, client: ControlClient, request_id: int, body: bytes) -> None:
        if client.state is not ClientState.HANDSHAKE:
            raise protocol.ProtocolError("HELLO sent twice")
        hello = protocol.decode_json(body)
        claimed = hello.get("pid")
        if claimed != client.pid:
            log.debug("HELLO claims pid %r, peer credentials say %d; using the latter", claimed, client.pid)
        client.state = ClientState.READY
        self._handshaking.discard(client)
        self._clients[client.sock.fileno()] = client
        frame = protocol.encode_json(FrameType.WELCOME, self.welcome(), request_id)
        try:
            client.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.table.fd]))])
        except OSError as exc:
            self._drop(client, f"WELCOME undeliverable ({exc.strerror or exc})", sweep=False)

    def welcome(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "pool": self.config.pool_name,
            "db": self.target.db,
            "protocol": self.target.protocol,
            "redis": self.target.label,
            "manager_pid": os.getpid(),
            "max_connections": self.config.max_connections,
            "versions": list(protocol.SUPPORTED_VERSIONS),
            "server": f"sharedpool/{__version__}",
            "table": {"capacity": self.table.capacity, "waiter_capacity": self.table.waiter_capacity, "layout": tbl.LAYOUT_VERSION},
            "acquire_timeout": self.config.acquire_timeout,
            "max_lease_time": self.config.max_lease_time,
            "max_leases_per_worker": self.config.max_leases_per_worker,
        }

    def _on_fetch_fd(self, client: ControlClient, request_id: int, body: bytes) -> None:
        index, generation = protocol.decode_slot(body)
        slot = self.pool.slot(index, generation)
        if slot is None or slot.state is not SlotState.SHARED or slot.backend is None:
            self.counters[keys.STALE_FETCHES] += 1
            self._send(client, protocol.encode_error(
                ErrorCode.STALE, f"slot {index} generation {generation} is not open (replaced or closed)", request_id))
            return
        frame = protocol.encode_slot(FrameType.FD, index, generation, request_id)
        try:
            client.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [slot.backend.fileno]))])
            self.counters[keys.FDS_SENT] += 1
        except OSError as exc:
            self._drop(client, f"fd undeliverable ({exc.strerror or exc})")

    def _on_report(self, client: ControlClient, request_id: int, body: bytes) -> None:
        report = protocol.decode_report(body)
        slot = self.pool.slot(report.slot, report.generation)
        if slot is None or slot.state is not SlotState.SHARED:
            return  # already repaired (the sweep was first), or a stale report
        now = time.monotonic()
        if report.cause is protocol.ReportCause.ABORTED:
            # Its holder still has the lock and may be blocked on the socket:
            # shutting the connection down is what wakes it, and the new
            # generation moves the lock byte (as for an orphan).
            try:
                row = self.table.row(report.slot)
            except tbl.RowError:
                return
            if row.state is RowState.HELD and row.holder_pid == client.pid and row.generation == report.generation:
                self._perform(self.pool.given_back(report.slot, report.generation, Outcome.BROKEN, now, ReapCause.HOLDER_CLOSED))
                self._perform(self.pool.dispatch(now, self._ready_count(), self.table.waiters))
            return
        if not self._try_lock(report.slot, report.generation):
            # Someone is on it right now (a taker checking it): look again soon.
            self._next_sweep = min(self._next_sweep, now + 0.05)
            return
        try:
            found: tbl.Row | None = self.table.row(report.slot)
        except tbl.RowError:
            found = None
        if found is None or found.generation != report.generation or found.state not in (RowState.RESET, RowState.BROKEN):
            self._unlock(report.slot)
            return
        outcome = Outcome.BROKEN if found.state is RowState.BROKEN else Outcome.NEEDS_RESET
        cause = ReapCause.HOLDER_CLOSED if report.cause is protocol.ReportCause.HOLDER_GONE else None
        self._perform(self.pool.given_back(report.slot, report.generation, outcome, now, cause))
        self._perform(self.pool.dispatch(now, self._ready_count(), self.table.waiters))

    def _on_demand(self, client: ControlClient, request_id: int, body: bytes) -> None:
        now = time.monotonic()
        refusal = self.pool.demanded(now)
        if refusal:
            code = ErrorCode.SHUTTING_DOWN if self.pool.shutting_down else ErrorCode.REDIS_UNAVAILABLE
            self._send(client, protocol.encode_error(code, refusal, request_id))
        else:
            self._send(client, protocol.encode_empty(FrameType.ACK, request_id))
        self._perform(self.pool.dispatch(now, self._ready_count(), self.table.waiters))

    def _on_site(self, client: ControlClient, request_id: int, body: bytes) -> None:
        site_id, text = protocol.decode_site(body)
        if len(self.pool.sites) < _MAX_SITES:
            self.pool.sites[(client.pid, site_id)] = text

    def _on_probe(self, client: ControlClient, request_id: int, body: bytes) -> None:
        request = protocol.decode_json(body)
        timeout = request.get("timeout", 2.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
            raise protocol.ProtocolError("PROBE needs a 'timeout' in seconds, above 0 and at most 60")
        target = self.target
        started = time.monotonic()

        def done(now: float, future: Future[str]) -> list[Action]:
            try:
                error = future.result()
            except Exception as exc:  # reported, never raised
                error = _describe(exc)
            if "max number of clients" in error:
                log.warning("Redis at %s refuses new connections: %s", target.label, error)
            if client.state is ClientState.READY:
                self._send(client, protocol.encode_json(FrameType.PROBE_REPLY, {
                    "ok": not error, "error": error, "elapsed_s": round(now - started, 4),
                    "redis": target.label, "pool": self.config.pool_name, "open": self.pool.open_connections,
                }, request_id))
            return []

        self._submit(lambda: probe(target, float(timeout)), done)

    def _on_stats(self, client: ControlClient, request_id: int, body: bytes) -> None:
        self._send(client, protocol.encode_json(FrameType.STATS_REPLY, self.snapshot(max_workers=_STATS_WORKER_ROWS), request_id))

    def _on_ping(self, client: ControlClient, request_id: int, body: bytes) -> None:
        self._send(client, protocol.encode_empty(FrameType.PONG, request_id))

    def _on_admin(self, client: ControlClient, request_id: int, body: bytes) -> None:
        request = protocol.decode_json(body)
        command = request.get("command")
        if client.uid not in (os.getuid(), 0):
            log.warning("refused admin command %r from pid %d uid %d: not the manager's uid or root", command, client.pid, client.uid)
            self._send(client, protocol.encode_error(
                ErrorCode.FORBIDDEN, f"admin commands are for uid {os.getuid()} and root, not uid {client.uid}", request_id))
            return
        now = time.monotonic()
        reply: dict[str, Any] = {"command": command, "ok": True}
        if command == "reap":
            pid = request.get("pid")
            if not isinstance(pid, int):
                raise protocol.ProtocolError("admin reap needs an integer 'pid'")
            reply["reaped"] = self.reap_pid(pid, now)
        elif command == "pause":
            self.pool.pause()
            self._sync_flags()
            log.info("paused by pid %d: no leases until resume", client.pid)
        elif command == "resume":
            log.info("resumed by pid %d", client.pid)
            self._perform(self.pool.resume())
        elif command == "reconnect":
            log.info("reconnect requested by pid %d: replacing every connection", client.pid)
            self._perform(self.pool.retire_all(now))
            self._sweep(now)
        elif command == "reload":
            reply["result"] = self.reload()
        elif command == "shutdown":
            log.info("shutdown requested by pid %d", client.pid)
            self.stop()
        else:
            self._send(client, protocol.encode_error(ErrorCode.UNSUPPORTED, f"unknown admin command {command!r}", request_id))
            return
        self._send(client, protocol.encode_json(FrameType.ADMIN_REPLY, reply, request_id))

    _handlers: dict[int, Callable[[Manager, ControlClient, int, bytes], None]] = {
        FrameType.ADMIN: _on_admin,
        FrameType.HELLO: _on_hello,
        FrameType.FETCH_FD: _on_fetch_fd,
        FrameType.REPORT: _on_report,
        FrameType.DEMAND: _on_demand,
        FrameType.SITE: _on_site,
        FrameType.STATS: _on_stats,
        FrameType.PING: _on_ping,
        FrameType.PROBE: _on_probe,
    }

    # ----- reaping ------------------------------------------------------------

    def reap_pid(self, pid: int, now: float | None = None) -> int:
        """A server reports a worker dead: sweep its rows now; return how many leases were reaped.

        A pid that is still alive is left alone: the integration may be
        wrong, or the pid already reused.
        """
        now = time.monotonic() if now is None else now
        if pid <= 0:
            return 0
        if _alive(pid, 0.0):
            log.info("asked to reap pid %d, which is alive: left alone", pid)
            return 0
        held = self._held_by(pid)
        for client in [c for c in self._clients.values() if c.pid == pid]:
            self._drop(client, "reported dead", sweep=False)
        self._sweep(now)
        return held - self._held_by(pid)

    def _held_by(self, pid: int) -> int:
        count = 0
        for slot in self.pool.in_state(SlotState.SHARED):
            try:
                row = self.table.row(slot.index)
            except tbl.RowError:
                continue
            if row.state is RowState.HELD and row.holder_pid == pid and row.generation == slot.generation:
                count += 1
        return count

    # ----- stats ----------------------------------------------------------------

    def snapshot(self, max_workers: int | None = None) -> dict[str, Any]:
        """The stats. ``max_workers`` caps the per-worker rows (busiest first) so a
        host with thousands of workers still fits one frame."""
        pool, table = self.pool, self.table
        now = time.monotonic()
        held_by: dict[int, int] = {}
        idle = held = granted = 0
        for slot in pool.slots:
            try:
                row = table.row(slot.index)
            except tbl.RowError:
                continue
            granted += row.lease_seq
            if slot.state is not SlotState.SHARED or row.generation != slot.generation:
                continue
            if row.state is RowState.READY:
                idle += 1
            elif row.state is RowState.HELD:
                held += 1
                held_by[row.holder_pid] = held_by.get(row.holder_pid, 0) + 1
        channels: dict[int, int] = {}
        for client in self._clients.values():
            channels[client.pid] = channels.get(client.pid, 0) + 1
        workers = [
            {"pid": pid, "leases_held": held_by.get(pid, 0), "control_connections": channels.get(pid, 0)}
            for pid in sorted(set(held_by) | set(channels))
        ]
        waits, holds = table.histograms(len(pool.slots))
        counters = dict(pool.counters)
        counters[keys.GRANTED] = granted
        counters[keys.RELEASED] = max(0, granted - held)
        return {
            "pool": self.config.pool_name,
            "state": self.state.value,
            "epoch": self.epoch,
            "manager_pid": os.getpid(),
            "version": __version__,
            "uptime_s": round(now - self._started_monotonic, 3),
            "redis": self.target.label,
            "redis_down_for_s": round(now - pool.redis_down_since, 3) if pool.redis_down_since is not None else None,
            "last_redis_error": pool.last_connect_error,
            "connections": {
                "open": pool.open_connections,
                "idle": idle,
                "leased": held,
                "connecting": pool.count(SlotState.CONNECTING),
                "resetting": pool.count(SlotState.MANAGED),
                "max": self.config.max_connections,
            },
            "leases": {"held": held, "waiting": max(0, table.waiters)},
            "paused": pool.paused,
            "control_connections": len(self._clients) + len(self._handshaking),
            "counters": counters,
            "wait_time": keys.from_histogram(waits),
            "hold_time": keys.from_histogram(holds),
            "workers": _top_workers(workers, max_workers),
            "workers_total": len(workers),
            "config": self.config.safe_dict(),
        }


_LOCKABLE = frozenset({RowState.READY, RowState.HELD, RowState.RESET, RowState.BROKEN})


def _top_workers(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is not None and len(rows) > limit:
        rows = sorted(rows, key=lambda w: (-w["leases_held"], -w["control_connections"], w["pid"]))[:limit]
    return sorted(rows, key=lambda w: w["pid"])


def _alive(pid: int, create_time: float) -> bool:
    """psutil's view; a zombie is dead, and a reused pid is somebody else."""
    try:
        process = psutil.Process(pid)
        if create_time and abs(process.create_time() - create_time) > 0.01:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except (psutil.AccessDenied, OSError):
        return True  # cannot tell (no permission, no fds left): never reap on a guess


def _raise_fd_limit() -> None:
    """Each control connection is an fd: take the hard limit, not the usual 1024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def _refuse(sock: socket.socket, code: ErrorCode, message: str) -> None:
    try:
        sock.send(protocol.encode_error(code, message))
        # Closing with the peer's HELLO unread would reset the connection
        # before the peer reads our reason: read what has arrived first.
        for _ in range(4):
            if not sock.recv(protocol.MAX_FRAME):
                break
    except OSError:
        pass
    sock.close()


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    except OSError:
        return "?"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
