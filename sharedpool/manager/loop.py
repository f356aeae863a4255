"""The manager's event loop, and the ``Manager`` that wires its parts.

One thread runs the loop. Workers take and give back leases in the lease
table without it; the loop answers the rare frames (``control.py``,
``handlers.py``), sweeps the table every ``reap_interval`` (``reaper.py``),
asks the pool core (``pool.py``) what to do, and does it. Connecting to
Redis and resetting a connection block, so they run in a small thread
pool whose results come back through a queue and a wake-up pipe. Signal
handlers only enqueue.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import resource
import secrets
import select
import signal
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sharedpool.config import ManagerConfig, mask_url
from sharedpool.errors import TLSRefused
from sharedpool.manager import actions as act
from sharedpool.manager import handlers
from sharedpool.manager.actions import Action, Limits
from sharedpool.manager.backend import Backend, RedisTarget, describe_error, open_backend, server_databases
from sharedpool.manager.cluster import ClusterKeeper
from sharedpool.manager.control import ControlServer
from sharedpool.manager.pool_state import Pool
from sharedpool.manager.reaper import Reaper
from sharedpool.manager.sentinel import NotMaster, SentinelMonitor, SentinelSettings, check_role, unresolved
from sharedpool.manager.snapshot import LeaseTally, snapshot
from sharedpool.manager.socket_path import ManagerAlreadyRunning, SocketPath
from sharedpool.manager.table_keeper import TableKeeper
from sharedpool.metrics import MetricsServer
from sharedpool.table import RowError, RowState

log = logging.getLogger("sharedpool.manager")

# How often the metrics thread's copy of the stats is refreshed.
_SNAPSHOT_EVERY = 0.5


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Manager:
    def __init__(self, config: ManagerConfig, reload: Callable[[], ManagerConfig] | None = None) -> None:
        self.config = config
        self._reload = reload
        self.target = RedisTarget.from_config(config)
        if config.sentinels:
            self.target = unresolved(self.target, config.sentinel_service)
        self.epoch = secrets.token_hex(8)
        self.keeper = TableKeeper(config, self.epoch)
        self.pool = Pool(Limits.from_config(config, self.target.label), self.keeper.table.capacity)
        self.counters = self.pool.counters
        self.reaper = Reaper(self.pool, self.keeper, self.perform, self.redispatch, config.max_waiting)
        self.control = ControlServer(self, handlers.HANDLERS)
        self.cluster: ClusterKeeper | None = ClusterKeeper(self) if config.cluster else None
        self.socket_path = SocketPath(config)
        self.state = State.STARTING
        self.started_at = time.monotonic()
        self.lease_tally = LeaseTally(self.started_at)
        # epoll directly, fd -> handler: the selectors layer costs more per
        # wake-up than the rest of the loop's work.
        self._epoll = select.epoll()
        self._handlers_by_fd: dict[int, Callable[[], None]] = {}
        self._peer_watch: dict[int, tuple[int, int]] = {}  # backend fd -> (slot, generation)
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, min(8, config.max_connections)), thread_name_prefix="sharedpool-redis"
        )
        self._completions: queue.SimpleQueue[Callable[[float], list[Action]]] = queue.SimpleQueue()
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._drain_deadline = 0.0
        self._next_sweep = 0.0
        self._accept_paused_until = 0.0
        self._next_health_check = time.monotonic() + config.health_check_interval
        # The metrics thread only reads this reference; the loop replaces it.
        self._snapshot_cache: dict[str, Any] = {}
        self._next_snapshot = 0.0
        self._metrics: MetricsServer | None = None
        self._connected_once = False
        self.exit_code = 0
        self.sentinel = SentinelMonitor(self, SentinelSettings.from_config(config)) if config.sentinels else None

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
        return self.exit_code

    def start(self) -> None:
        _raise_fd_limit()
        if self.cluster is not None:
            self.cluster.start()  # before the socket is claimed: a seed that is no cluster stops us here
        self.socket_path.claim()
        if not self.keeper.take_alive_lock():
            raise ManagerAlreadyRunning("the new lease table's liveness lock is taken: this cannot happen")
        self._watch_listener()
        self.watch(self._wake_r, self._on_wake)
        self.state = State.RUNNING
        if self.config.metrics_port:
            self._start_metrics()
        if self.sentinel is not None:
            self.sentinel.start()
        log.info(
            "manager %r started: pid %d, socket %s, redis %s, max_connections %d, min_idle %d, epoch %s",
            self.config.pool_name, os.getpid(), self.config.socket_path, mask_url(self.config.redis_url),
            self.config.max_connections, self.config.min_idle, self.epoch,
        )
        self.perform(self.pool.dispatch(time.monotonic(), {}, {}))

    def _start_metrics(self) -> None:
        host, port = self.config.metrics_host, self.config.metrics_port
        self._snapshot_cache = self.snapshot()
        try:
            self._metrics = MetricsServer(host, port, lambda: self._snapshot_cache).start()
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        log.info("metrics on http://%s:%d/metrics", host, self._metrics.port)

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
            self.perform(self.pool.begin_shutdown())
            self.reaper.sweep(now)

    def close(self) -> None:
        if self.sentinel is not None:
            self.sentinel.stop()
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        now = time.monotonic()
        held = self._held_count()
        if held:
            log.warning("grace period over: closing %d leased connections", held)
        self.pool.shutting_down = True
        self.keeper.sync_flags(self.pool)
        self.perform(self.pool.close_all(now))
        self.control.close_all("manager stopping")
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.socket_path.listener is not None:
            self.unwatch(self.socket_path.listener.fileno())
            self.socket_path.close_listener()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.keeper.close()
        self.socket_path.release()
        self.state = State.STOPPED
        log.info("manager %r stopped", self.config.pool_name)

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._handlers_by_fd[fd] = handler

    def unwatch(self, fd: int) -> None:
        if self._handlers_by_fd.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def _watch_listener(self) -> None:
        listener = self.socket_path.listener
        assert listener is not None
        self.watch(listener.fileno(), lambda: self.control.on_accept(listener))

    def pause_accepts(self, seconds: float) -> None:
        listener = self.socket_path.listener
        if listener is not None:
            self.unwatch(listener.fileno())
        self._accept_paused_until = time.monotonic() + seconds

    def _check_socket_file(self) -> None:
        """Someone deleted or replaced our socket file (a tmp cleaner, a stray rm): bind it again."""
        why = self.socket_path.lost()
        if not why:
            return
        log.error("control socket %s was %s: creating it again", self.socket_path.path, why)
        if self.socket_path.listener is not None:
            self.unwatch(self.socket_path.listener.fileno())
        if self.socket_path.rebind() is not None:
            self._watch_listener()

    def _install_signal_handlers(self) -> None:
        def enqueue(signum: int, frame: Any) -> None:
            self._signals.append(signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, enqueue)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    # ----- the loop --------------------------------------------------------

    def step(self, max_wait: float = 1.0) -> None:
        now = time.monotonic()
        deadline = min(now + max_wait, self._next_sweep or now + max_wait)
        if self.pool.next_connect_at and self.pool.next_connect_at > now:
            deadline = min(deadline, self.pool.next_connect_at)
        handshake_deadline = self.control.handshake_deadline()
        if handshake_deadline is not None:
            deadline = min(deadline, handshake_deadline)
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
        if self._accept_paused_until and now >= self._accept_paused_until and self.socket_path.listener is not None:
            self._accept_paused_until = 0.0
            self._watch_listener()
        self.control.expire_handshakes(now)
        if self.pool.next_connect_at and now >= self.pool.next_connect_at:
            self.redispatch(now)
        if self.cluster is not None and self.state is State.RUNNING:
            self.cluster.tick(now)
        if now >= self._next_sweep:
            self.reaper.sweep(now)
            if self.sentinel is not None:
                self.sentinel.tick(now)
            self._check_socket_file()
            self._next_sweep = now + self.config.reap_interval
        if self.config.health_check_interval and now >= self._next_health_check:
            self.reaper.health_check(now)
            self._next_health_check = now + self.config.health_check_interval
        while self._signals:
            self._on_signal(self._signals.popleft())
        if self._metrics is not None and now >= self._next_snapshot:
            self._snapshot_cache = self.snapshot()
            self._next_snapshot = now + _SNAPSHOT_EVERY
        if self.state is State.DRAINING:
            if self._held_count() == 0 or now >= self._drain_deadline:
                self.state = State.STOPPED
            else:
                self.reaper.sweep(now)

    def sweep_soon(self, at: float) -> None:
        self._next_sweep = min(self._next_sweep, at)

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
        if self.sentinel is not None and (new.sentinels, new.sentinel_service) != (old.sentinels, old.sentinel_service):
            log.warning("sentinels and sentinel_service change only on restart; still asking %s", self.sentinel.settings)
            for name in ("sentinels", "sentinel_service"):
                object.__setattr__(new, name, getattr(old, name))
        if new.socket_path != old.socket_path:
            log.warning("socket_path changes only on restart; still serving %s", old.socket_path)
            object.__setattr__(new, "socket_path", old.socket_path)
        now = time.monotonic()
        actions = self.pool.apply_limits(Limits.from_config(new, RedisTarget.from_config(new).label))
        if self.cluster is not None:
            self.cluster.apply_limits()
        table = self.keeper.table
        table.set_slots_in_use(self.pool.limits.max_connections)
        table.set_max_waiting(new.max_waiting)
        self.reaper.max_waiting = new.max_waiting
        if new.redis_url != old.redis_url or new.protocol != old.protocol:
            self.target = RedisTarget.from_config(new)
            if self.sentinel is not None:
                self.target = self.sentinel.rebase(self.target)
            log.info("Redis target changed to %s: replacing every connection", mask_url(new.redis_url))
            actions += self.pool.retire_all()
        self.perform(actions)
        self.reaper.sweep(now)
        log.info("configuration reloaded: %s", new)
        return "reloaded"

    def snapshot(self, max_workers: int | None = None) -> dict[str, Any]:
        return snapshot(self, max_workers)

    def reap_pid(self, pid: int, now: float | None = None) -> int:
        """A server reports a worker dead: sweep its rows now; return how many leases were reaped."""
        now = time.monotonic() if now is None else now
        return self.reaper.reap_pid(pid, now, lambda dead: self.control.drop_pid(dead, "reported dead"))

    def _held_count(self) -> int:
        return self.keeper.count_rows(self.pool, RowState.HELD)

    # ----- performing decisions -------------------------------------------

    def redispatch(self, now: float) -> None:
        """Open what the idle count and the waiters call for now."""
        self.perform(self.pool.dispatch(now, self.keeper.idle_by_db(self.pool), self.keeper.table.waiters_by_db()))

    def perform(self, actions: list[Action]) -> None:
        keeper = self.keeper
        for action in actions:
            if isinstance(action, act.Publish):
                keeper.publish(action, self.pool.slots[action.slot].seen_seq)
            elif isinstance(action, act.Wake):
                keeper.sync_flags(self.pool)  # what they wake up to read must be there first
                keeper.wake(action.count, action.db)
            elif isinstance(action, act.Expire):
                keeper.table.set_expiry(action.slot, action.expires_at)
            elif isinstance(action, act.Release):
                if keeper.holds(action.slot, action.generation):
                    keeper.unlock(action.slot)
                    if keeper.table.waiters > 0:
                        # Someone of its database may have found it locked by us a moment ago.
                        keeper.wake(1, self.pool.slots[action.slot].db)
            elif isinstance(action, act.OpenConnection):
                self._open(action)
            elif isinstance(action, act.ResetConnection):
                self._reset(action)
            elif isinstance(action, act.RequestRevoke):
                # The request and the read that checks it are one step: a lease
                # that ended since the sweep's read is never shut down.
                try:
                    still_held = keeper.table.request_revoke(action.slot, action.generation, action.seq)
                except RowError:
                    still_held = False
                if not still_held:
                    self.pool.revoke_missed(action.slot, action.generation)
                elif action.backend is not None:
                    action.backend.shut_down()
            elif isinstance(action, act.ShutDown):
                if action.backend is not None:
                    action.backend.shut_down()
            elif isinstance(action, act.CloseConnection):
                log.debug("closing slot %s: %s", getattr(action.backend, "slot", "?"), action.reason)
                fd = getattr(action.backend, "fileno", -1)
                if self._peer_watch.pop(fd, None) is not None:
                    self.unwatch(fd)
                action.backend.close()
        keeper.sync_flags(self.pool)

    # ----- Redis I/O, off the loop ---------------------------------------------

    def call_soon(self, callback: Callable[[float], list[Action]]) -> None:
        """Run ``callback(now)`` in the loop (from any thread); it returns actions to perform."""
        self._completions.put(callback)
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already means "wake up"; a closed one means we stopped

    def submit(self, work: Callable[[], Any], done: Callable[[float, Future[Any]], list[Action]]) -> None:
        """Run ``work`` in the thread pool; ``done`` runs in the loop and returns actions to perform."""

        def finished(future: Future[Any]) -> None:
            self.call_soon(lambda now: done(now, future))

        try:
            self._executor.submit(work).add_done_callback(finished)
        except RuntimeError:
            pass  # executor shut down: we are stopping

    def _on_wake(self) -> None:
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
            self.perform(completion(time.monotonic()))

    def _open(self, action: act.OpenConnection) -> None:
        target, name, db = self.target, self.config.pool_name, self.pool.slots[action.slot].db
        ask_databases = self.pool.redis_databases is None
        # Sentinel: where the master is (asked of the Sentinels if not known yet), and a ROLE
        # check before the connection is lent, so that none goes to a demoted master.
        where = self.sentinel.opening() if self.sentinel is not None else None
        if self.cluster is not None:
            node = self.cluster.target_of(db)
            if node is None:  # the node left between dispatch and now: nothing to open
                self.perform(self.pool.connect_failed(action.slot, action.generation, f"node {db} left", time.monotonic()))
                return
            target, ask_databases = node, False

        def work() -> tuple[Backend, int | None, Any]:
            opened_target, address = where() if where is not None else (target, None)
            backend = open_backend(opened_target, name, action.slot, db)
            if address is not None:
                try:
                    check_role(backend.connection)
                except BaseException:
                    backend.close()
                    raise
            return backend, (server_databases(backend) if ask_databases else None), address

        def done(now: float, future: Future[tuple[Backend, int | None, Any]]) -> list[Action]:
            try:
                backend, databases, address = future.result()
                if self.sentinel is not None:
                    try:
                        self.sentinel.opened(address, now)
                    except NotMaster:
                        backend.close()
                        raise
            except Exception as exc:  # any failure to connect is reported, never raised
                if self.sentinel is not None:
                    self.sentinel.recheck(f"connecting failed: {describe_error(exc)}", now)
                if isinstance(exc, TLSRefused) and not self._connected_once and not self.exit_code:
                    # Verification or protocol: no retry can fix it, so say it once (whichever
                    # slot was first) and stop.
                    log.error("%s", exc)
                    self.exit_code = 2
                    self.stop()
                if self.cluster is not None:
                    self.cluster.connect_failed(now, db, describe_error(exc))
                return self.pool.connect_failed(action.slot, action.generation, describe_error(exc), now)
            self._connected_once = True
            if self.cluster is not None:
                self.cluster.connected(db)
            backend.publish_tls(self.keeper.table.map)
            if databases is not None and self.pool.redis_databases is None:
                self.pool.limit_databases(databases)
            log.info("connected slot %d (generation %d, db %d) to %s", action.slot, action.generation, db, target.label)
            actions = self.pool.connected(action.slot, action.generation, backend, now)
            if self.pool.slot(action.slot, action.generation) is not None and backend.fileno >= 0:
                self._watch_peer(backend.fileno, action.slot, action.generation)
            return actions

        self.submit(work, done)

    def _reset(self, action: act.ResetConnection) -> None:
        backend: Backend = action.backend

        def done(now: float, future: Future[None]) -> list[Action]:
            try:
                future.result()
            except Exception as exc:
                return self.pool.reset_done(action.slot, action.generation, False, now, describe_error(exc))
            if backend.fileno in self._peer_watch:
                self._peer_watch[backend.fileno] = (action.slot, action.generation)  # a rebind's new generation
            return self.pool.reset_done(action.slot, action.generation, True, now)

        self.submit(lambda: backend.reset(action.db), done)

    def _watch_peer(self, fd: int, slot: int, generation: int) -> None:
        # EPOLLRDHUP only: replies to workers must not wake us, Redis
        # closing the connection must.
        try:
            self._epoll.register(fd, select.EPOLLRDHUP)
        except OSError:
            return
        self._handlers_by_fd[fd] = lambda: self._on_peer_closed(fd)
        self._peer_watch[fd] = (slot, generation)

    def _on_peer_closed(self, fd: int) -> None:
        """Redis closed one of our connections (restart, its ``timeout``): replace it now."""
        slot_gen = self._peer_watch.pop(fd, None)
        self.unwatch(fd)
        if slot_gen is None:
            return
        index, generation = slot_gen
        now = time.monotonic()
        keeper = self.keeper
        locked = keeper.table.state_of(index) == RowState.READY and keeper.try_lock(index, generation)
        if locked and keeper.table.state_of(index) != RowState.READY:
            keeper.unlock(index)
            locked = False
        if locked:
            log.warning("slot %d closed by Redis while idle: replaced", index)
        if self.sentinel is not None:
            self.sentinel.recheck("Redis closed a connection", now)
        self.perform(self.pool.peer_closed(index, generation, locked, now))
        self.redispatch(now)


def _raise_fd_limit() -> None:
    """Each control connection is an fd: take the hard limit, not the usual 1024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
