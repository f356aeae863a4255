"""The manager's event loop: control socket, workers' frames, Redis I/O off the loop.

One thread runs the loop. It reads frames, asks the pool (``pool.py``)
what to do, and does it. Connecting to Redis and resetting a connection
block, so they run in a small thread pool whose results come back through
a queue and a wake-up pipe. Signal handlers only enqueue.
"""

from __future__ import annotations

import array
import enum
import errno
import fcntl
import itertools
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
from sharedpool.config import ManagerConfig, mask_url, socket_gid
from sharedpool.manager.backend import Backend, RedisTarget, open_backend
from sharedpool.manager.pool import (
    Action,
    CloseConnection,
    Holder,
    Limits,
    NotifyRevoked,
    OpenConnection,
    Pool,
    ReapCause,
    ResetConnection,
    SendError,
    SendGrant,
    SendRecall,
    SlotState,
)
from sharedpool.metrics import MetricsServer
from sharedpool.protocol import ErrorCode, FrameType

log = logging.getLogger("sharedpool.manager")

_PEERCRED = struct.Struct("3i")
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
    """One accepted control connection."""

    __slots__ = ("sock", "pid", "uid", "state", "holder", "accepted_at", "label")

    def __init__(self, sock: socket.socket, pid: int, uid: int, now: float) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.state = ClientState.HANDSHAKE
        self.holder: Holder | None = None
        self.accepted_at = now
        self.label = f"pid {pid} uid {uid}"


class Manager:
    def __init__(self, config: ManagerConfig, reload: Callable[[], ManagerConfig] | None = None) -> None:
        self.config = config
        self._reload = reload
        self.target = RedisTarget.from_config(config)
        self.pool = Pool(self._limits(config))
        self.epoch = secrets.token_hex(8)
        self.state = State.STARTING
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        # epoll directly, fd -> handler: the selectors layer costs more per
        # wake-up than the rest of a grant's bookkeeping.
        self._epoll = select.epoll()
        self._handlers_by_fd: dict[int, Callable[[], None]] = {}
        self._clients: dict[int, ControlClient] = {}  # holder id -> client
        self._handshaking: set[ControlClient] = set()
        self._holder_ids = itertools.count(1)
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, min(8, config.max_connections)), thread_name_prefix="sharedpool-redis"
        )
        self._completions: queue.SimpleQueue[Callable[[float], list[Action]]] = queue.SimpleQueue()
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._listener: socket.socket | None = None
        self._lock_fd = -1
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

    @staticmethod
    def _limits(config: ManagerConfig) -> Limits:
        return Limits(
            max_connections=config.max_connections,
            min_idle=config.min_idle,
            acquire_timeout=config.acquire_timeout,
            max_waiting=config.max_waiting,
            redis_label=RedisTarget.from_config(config).label,
            pool_name=config.pool_name,
            max_leases_per_worker=config.max_leases_per_worker,
            max_lifetime=config.max_lifetime,
            idle_timeout=config.idle_timeout,
            leak_threshold=config.leak_threshold,
            max_lease_time=config.max_lease_time,
            sticky=config.sticky,
            sticky_max_age=config.sticky_max_age,
        )

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
        self._perform(self.pool._dispatch(time.monotonic()))

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        if self.state is State.RUNNING:
            now = time.monotonic()
            self.state = State.DRAINING
            self._drain_deadline = now + self.config.shutdown_grace
            log.info(
                "stopping: no more grants; waiting up to %.1f s for %d leases",
                self.config.shutdown_grace, len(self.pool.leases),
            )
            self._perform(self.pool.begin_shutdown(now))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        now = time.monotonic()
        if self.pool.leases:
            log.warning("grace period over: closing %d leased connections", len(self.pool.leases))
        self._perform(self.pool.close_all(now))
        for client in list(self._clients.values()) + list(self._handshaking):
            self._drop(client, "manager stopping", reap=False)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._listener is not None:
            self._unwatch(self._listener.fileno())
            self._listener.close()
            self._listener = None
            self._remove_socket_file()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
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
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise ManagerAlreadyRunning(
                f"another manager (pid {owner}) already serves {path}; stop it or choose another --socket-path"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
            log.info("replacing stale socket file %s", path)
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        if gid >= 0:
            os.chown(path, -1, gid)
        os.chmod(path, self.config.socket_mode)
        listener.listen(min(socket.SOMAXCONN, 4096))
        listener.setblocking(False)
        self._listener = listener
        self._socket_inode = os.stat(path).st_ino

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
        deadline = min(self.pool.next_deadline(), now + max_wait, self._next_sweep or now + max_wait)
        if self._handshaking:
            deadline = min(deadline, min(c.accepted_at for c in self._handshaking) + self.config.handshake_timeout)
        if self.state is State.DRAINING:
            deadline = min(deadline, self._drain_deadline)
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
        self._perform(self.pool.expire(now))
        self._expire_handshakes(now)
        if now >= self._next_sweep:
            self._sweep(now)
            self._perform(self.pool.maintain(now))
            self._next_sweep = now + self.config.reap_interval
        if self.config.health_check_interval and now >= self._next_health_check:
            self._health_check(now)
            self._next_health_check = now + self.config.health_check_interval
        while self._signals:
            self._on_signal(self._signals.popleft())
        if self._metrics is not None and now >= self._next_snapshot:
            self._snapshot_cache = self.snapshot()
            self._next_snapshot = now + 0.5
        if self.state is State.DRAINING and (not self.pool.leases or now >= self._drain_deadline):
            self.state = State.STOPPED

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
        actions = self.pool.apply_limits(self._limits(new), now)
        if new.redis_url != old.redis_url or new.protocol != old.protocol:
            self.target = RedisTarget.from_config(new)
            log.info("Redis target changed to %s: replacing every connection", mask_url(new.redis_url))
            actions += self.pool.retire_all(now)
        self._perform(actions)
        log.info("configuration reloaded: %s", new)
        return "reloaded"

    def _health_check(self, now: float) -> None:
        """An idle connection with EOF or bytes nobody asked for is dead or dirty."""
        for slot in list(self.pool._idle):
            if not slot.backend.is_quiet():
                self.counters[keys.HEALTH_CHECK_FAILED] += 1
                log.warning("health check: idle slot %d closed by Redis or holding stray data; replaced", slot.index)
                self._perform(self.pool.discard_idle(slot.index, "health check failed", now))

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
        pending = deque(actions)
        while pending:
            action = pending.popleft()
            if isinstance(action, SendGrant):
                pending.extend(self._send_grant(action))
            elif isinstance(action, SendError):
                client = self._clients.get(action.holder.id)
                if client is not None:
                    self._send(client, protocol.encode_error(action.code, action.message, action.lease_id))
            elif isinstance(action, OpenConnection):
                self._open(action)
            elif isinstance(action, ResetConnection):
                self._reset(action)
            elif isinstance(action, SendRecall):
                client = self._clients.get(action.notify.id)
                if client is not None:
                    self._send(client, protocol.encode_recall(action.lease_id))
            elif isinstance(action, NotifyRevoked):
                client = self._clients.get(action.holder.id)
                if client is not None:
                    self._send(client, protocol.encode_revoked(action.lease_id, action.message))
            elif isinstance(action, CloseConnection):
                log.debug("closing slot %s: %s", getattr(action.backend, "slot", "?"), action.reason)
                action.backend.close()

    def _send_grant(self, action: SendGrant) -> list[Action]:
        lease = action.lease
        now = time.monotonic()
        client = self._clients.get(lease.holder.id)
        if client is None:
            return self.pool.undeliverable(lease, now)
        backend: Backend = lease.slot.backend
        # A re-send (FETCH_FD) is of a lease in use: its data is the holder's.
        if not action.redelivery and not backend.is_quiet():
            log.warning("slot %d found closed or holding stray data at grant: replaced", lease.slot.index)
            return self.pool.stale_at_grant(lease, now)
        frame = protocol.encode_grant(lease.id, lease.slot.index, lease.slot.generation, action.with_fd, lease.sticky)
        try:
            if action.with_fd:
                client.sock.sendmsg(
                    [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [backend.fileno]))]
                )
                self.counters[keys.FDS_SENT] += 1
            else:
                client.sock.send(frame)
        except OSError as exc:
            if action.redelivery:
                self._drop(client, f"fd re-send undeliverable ({exc.strerror or exc})")
                return []
            actions = self.pool.undeliverable(lease, now)
            self._drop(client, f"grant undeliverable ({exc.strerror or exc})")
            return actions
        return []

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
            return self.pool.connected(action.slot, action.generation, backend, now)

        self._submit(lambda: open_backend(target, name, action.slot), done)

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

    def _drop(self, client: ControlClient, reason: str, reap: bool = True) -> None:
        if client.state is ClientState.CLOSED:
            return
        client.state = ClientState.CLOSED
        self._handshaking.discard(client)
        self._unwatch(client.sock.fileno())
        client.sock.close()
        holder = client.holder
        if holder is not None:
            self._clients.pop(holder.id, None)
            if holder.leases:
                log.warning("control connection of %s closed while holding %d leases (%s)", client.label, len(holder.leases), reason)
            else:
                log.debug("control connection of %s closed (%s)", client.label, reason)
            if reap:
                self._perform(self.pool.holder_gone(holder, time.monotonic()))
        else:
            log.debug("control connection of %s closed before HELLO (%s)", client.label, reason)

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
        try:
            protocol.check_recv_flags(flags)
            version, frame_type, body = protocol.split(data)
            if version not in protocol.SUPPORTED_VERSIONS:
                self._send(client, protocol.encode_error(
                    ErrorCode.VERSION, f"protocol version {version} not supported; this manager speaks {list(protocol.SUPPORTED_VERSIONS)}"))
                self._drop(client, f"unsupported protocol version {version}")
                return
            handler = self._handlers.get(frame_type)
            if handler is None:
                self._send(client, protocol.encode_error(ErrorCode.UNSUPPORTED, f"frame type {frame_type} is not supported"))
                return
            if client.state is ClientState.HANDSHAKE and frame_type != FrameType.HELLO:
                self._send(client, protocol.encode_error(ErrorCode.NOT_READY, "the first frame must be HELLO"))
                self._drop(client, f"frame type {frame_type} before HELLO")
                return
            handler(self, client, body)
        except protocol.ProtocolError as exc:
            self.counters[keys.PROTOCOL_ERRORS] += 1
            log.warning("malformed frame from %s: %s; closing its connection", client.label, exc)
            self._send(client, protocol.encode_error(ErrorCode.MALFORMED, str(exc)))
            self._drop(client, "malformed frame")
        except Exception:
            # One worker's frame must never take the manager down: whatever
            # it triggered, only that worker's connection pays.
            self.counters[keys.PROTOCOL_ERRORS] += 1
            log.exception("internal error handling a frame from %s; closing its connection", client.label)
            if client.state is not ClientState.CLOSED:
                self._send(client, protocol.encode_error(ErrorCode.INTERNAL, "internal error; see the manager log"))
                self._drop(client, "internal error")

    def _on_hello(self, client: ControlClient, body: bytes) -> None:
        if client.state is not ClientState.HANDSHAKE:
            raise protocol.ProtocolError("HELLO sent twice")
        hello = protocol.decode_json(body)
        claimed = hello.get("pid")
        if claimed != client.pid:
            log.debug("HELLO claims pid %r, peer credentials say %d; using the latter", claimed, client.pid)
        now = time.monotonic()
        holder = self.pool.add_holder(next(self._holder_ids), client.pid, now, _create_time(client.pid))
        holder.name = str(hello.get("client", ""))[:100]
        if hello.get("role") == "notify":
            self.pool.set_notify(holder)
        client.holder = holder
        client.state = ClientState.READY
        self._handshaking.discard(client)
        self._clients[holder.id] = client
        self._send(client, protocol.encode_json(FrameType.WELCOME, self.welcome()))

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
            "sticky": self.config.sticky,
        }

    def _on_acquire(self, client: ControlClient, body: bytes) -> None:
        timeout_ms, where = protocol.decode_acquire(body)
        timeout = None if timeout_ms == protocol.DEFAULT_TIMEOUT else timeout_ms / 1000.0
        assert client.holder is not None
        self._perform(self.pool.acquire(client.holder, timeout, time.monotonic(), where))

    def _on_release(self, client: ControlClient, body: bytes) -> None:
        lease_id, outcome = protocol.decode_release(body)
        assert client.holder is not None
        self._perform(self.pool.release(client.holder, lease_id, outcome, time.monotonic()))

    def _on_fetch_fd(self, client: ControlClient, body: bytes) -> None:
        lease_id = protocol.decode_fetch_fd(body)
        assert client.holder is not None
        lease = self.pool.lease_for_fetch(client.holder, lease_id)
        if lease is None:
            self._send(client, protocol.encode_error(ErrorCode.UNKNOWN_LEASE, f"lease {lease_id} is not held by this connection", lease_id))
            return
        self._perform([SendGrant(lease, True, redelivery=True)])

    def _on_stats(self, client: ControlClient, body: bytes) -> None:
        self._send(client, protocol.encode_json(FrameType.STATS_REPLY, self.snapshot(max_workers=_STATS_WORKER_ROWS)))

    def _on_ping(self, client: ControlClient, body: bytes) -> None:
        self._send(client, protocol.encode_empty(FrameType.PONG))

    def _on_admin(self, client: ControlClient, body: bytes) -> None:
        request = protocol.decode_json(body)
        command = request.get("command")
        if client.uid not in (os.getuid(), 0):
            log.warning("refused admin command %r from pid %d uid %d: not the manager's uid or root", command, client.pid, client.uid)
            self._send(client, protocol.encode_error(ErrorCode.FORBIDDEN, f"admin commands are for uid {os.getuid()} and root, not uid {client.uid}"))
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
            log.info("paused by pid %d: no grants until resume", client.pid)
        elif command == "resume":
            log.info("resumed by pid %d", client.pid)
            self._perform(self.pool.resume(now))
        elif command == "reconnect":
            log.info("reconnect requested by pid %d: replacing every connection", client.pid)
            self._perform(self.pool.retire_all(now))
        elif command == "reload":
            reply["result"] = self.reload()
        elif command == "shutdown":
            log.info("shutdown requested by pid %d", client.pid)
            self.stop()
        else:
            self._send(client, protocol.encode_error(ErrorCode.UNSUPPORTED, f"unknown admin command {command!r}"))
            return
        self._send(client, protocol.encode_json(FrameType.ADMIN_REPLY, reply))

    _handlers: dict[int, Callable[[Manager, ControlClient, bytes], None]] = {
        FrameType.ADMIN: _on_admin,
        FrameType.HELLO: _on_hello,
        FrameType.ACQUIRE: _on_acquire,
        FrameType.RELEASE: _on_release,
        FrameType.FETCH_FD: _on_fetch_fd,
        FrameType.STATS: _on_stats,
        FrameType.PING: _on_ping,
    }

    # ----- reaping ------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """Reap leases whose holder process died while its socket stays open elsewhere."""
        # pid 0: the peer lives in another pid namespace; we cannot see it, so
        # only its socket closing (EOF) can reap it.
        dead = [
            p.pid for p in self.pool.processes.values()
            if p.pid > 0 and p.leases_held and not _alive(p.pid, p.create_time)
        ]
        for pid in dead:
            self.reap_pid(pid, now)

    def reap_pid(self, pid: int, now: float | None = None) -> int:
        """Reap every lease of a dead pid and close its control connections.

        A pid that is still alive is left alone: the integration may be
        wrong, or the pid already reused.
        """
        now = time.monotonic() if now is None else now
        reaped = 0
        if pid <= 0:
            return 0
        clients = [c for c in self._clients.values() if c.pid == pid]
        if clients and clients[0].holder is not None and _alive(pid, clients[0].holder.process.create_time):
            log.info("asked to reap pid %d, which is alive: left alone", pid)
            return 0
        for client in clients:
            holder = client.holder
            assert holder is not None
            reaped += len(holder.leases)
            client.state = ClientState.CLOSED
            self._unwatch(client.sock.fileno())
            client.sock.close()
            self._clients.pop(holder.id, None)
            self._perform(self.pool.holder_gone(holder, now, ReapCause.HOLDER_DEAD))
        return reaped

    # ----- stats ----------------------------------------------------------------

    def snapshot(self, max_workers: int | None = None) -> dict[str, Any]:
        """The stats. ``max_workers`` caps the per-worker rows (busiest first) so a
        host with thousands of workers still fits one frame."""
        pool = self.pool
        now = time.monotonic()
        workers = []
        for process in pool.processes.values():
            workers.append({
                "pid": process.pid, "leases_held": process.leases_held, "leases_total": process.leases_total,
                "control_connections": process.holders, "last_seen_s_ago": round(now - process.last_seen, 3),
            })
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
                "idle": pool.count(SlotState.IDLE),
                "leased": pool.count(SlotState.LEASED),
                "connecting": pool.count(SlotState.CONNECTING),
                "resetting": pool.count(SlotState.RESETTING),
                "max": self.config.max_connections,
            },
            "leases": {"held": len(pool.leases), "waiting": pool.waiting},
            "paused": pool.paused,
            "control_connections": len(self._clients) + len(self._handshaking),
            "counters": dict(pool.counters),
            "wait_time": keys.percentiles(pool.wait_times),
            "hold_time": keys.percentiles(pool.hold_times),
            "workers": _top_workers(workers, max_workers),
            "workers_total": len(workers),
            "config": self.config.safe_dict(),
        }


def _top_workers(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is not None and len(rows) > limit:
        rows = sorted(rows, key=lambda w: (-w["leases_held"], -w["leases_total"]))[:limit]
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


def _create_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return 0.0


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
