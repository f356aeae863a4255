"""What a forked worker process runs, and how the parent runs a group of them.

A worker builds its client, warms it up and sends READY; the parent opens
the measurement window for all at once (one shared end time, one Event), so
no worker measures while others are still starting. Every wait has a
deadline and every child is killed in ``finally``."""

from __future__ import annotations

import os
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import multiprocess
import multiprocess.connection
import psutil
import redis

import sharedpool
from sharedpool.bench.jobs import KEY_PREFIX, Job, Systems
from sharedpool.bench.report import SHARED, TWEMPROXY
from sharedpool.table import core as table_core

STARTUP_TIMEOUT = 20.0  # fork, import-free client setup and warm-up of all workers
FINISH_GRACE = 10.0  # past the window's end, for the last request of each worker
SAMPLE_EVERY = 0.05  # seconds between INFO clients samples
READY = "ready"


@dataclass
class WorkerResult:
    count: int = 0  # requests (or leases) completed inside the window
    latencies: bytes = b""  # array("d") of seconds
    lived_out: bool = False  # S3: exited because it served its `life` requests
    cpu_s: float = 0.0  # this process's CPU time inside the window
    modes: dict[str, tuple[bytes, float]] = field(default_factory=dict)  # S1: mode -> (latencies, CPU s)
    error: str = ""


def _client(job: Job) -> redis.Redis:
    if job.system == SHARED:
        return sharedpool.Redis(socket_path=job.address, protocol=job.protocol)
    if job.system == TWEMPROXY:
        # twemproxy speaks RESP2 only and closes a connection on any command
        # it does not proxy, such as the CLIENT SETINFO redis-py sends.
        return redis.Redis(unix_socket_path=job.address, protocol=2, driver_info=None)
    # Its own ConnectionPool per worker process, as every app does today.
    return redis.Redis.from_url(job.address, protocol=job.protocol)


def _busy(seconds: float, clock: Callable[[], float] = time.perf_counter) -> None:
    stop = clock() + seconds
    while clock() < stop:
        pass


# S1 modes: plain redis-py, (a) one lease per command, (b) ten commands per lease().
S1_MODES = ("plain", "a", "b")
S1_SLICE = 100  # commands per slice; slices of the modes alternate for the whole window


def _latency_body(job: Job, sync: Callable[[], float]) -> WorkerResult:
    """S1: the three modes interleaved in short slices, in rotating order.

    On a shared machine the speed drifts over seconds; slices a few tens of
    milliseconds long give every mode the same share of good and bad moments,
    which separate windows cannot. CPU is charged per slice: this process's
    own, plus Redis's and (for sharedpool modes) the manager's.
    """
    plain = redis.Redis.from_url(job.address, protocol=job.protocol)
    shared = sharedpool.Redis(socket_path=job.manager, protocol=job.protocol)
    key, clock = KEY_PREFIX + "small", time.perf_counter
    redis_proc, manager_proc = _process(job.redis_pid), _process(job.manager_pid)

    def one_by_one(client: redis.Redis) -> Callable[[array[float]], None]:
        def run(lat: array[float]) -> None:
            for _ in range(S1_SLICE):
                started = clock()
                client.get(key)
                lat.append(clock() - started)
        return run

    def leased(lat: array[float]) -> None:
        for _ in range(S1_SLICE // 10):
            started = clock()
            with shared.lease() as pinned:
                for _ in range(10):
                    pinned.get(key)
            lat.append((clock() - started) / 10)

    modes = [(one_by_one(plain), [redis_proc]), (one_by_one(shared), [redis_proc, manager_proc]),
             (leased, [redis_proc, manager_proc])]
    lat = {name: array("d") for name in S1_MODES}
    cpu = dict.fromkeys(S1_MODES, 0.0)
    for run, _ in modes * 3:  # warm up: connections, fd cache, command classification
        run(array("d"))
    end = sync()
    cycle = 0
    while clock() < end:
        for i in range(len(modes)):
            index = (cycle + i) % len(modes)
            run, sidecars = modes[index]
            before = time.process_time() + _cpu_of(sidecars)
            run(lat[S1_MODES[index]])
            cpu[S1_MODES[index]] += time.process_time() + _cpu_of(sidecars) - before
        cycle += 1
    return WorkerResult(sum(len(v) for v in lat.values()),
                        modes={name: (lat[name].tobytes(), cpu[name]) for name in S1_MODES})


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid) if pid else None
    except psutil.Error:
        return None


def _cpu_of(processes: list[psutil.Process | None]) -> float:
    total = 0.0
    for proc in processes:
        if proc is not None:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
    return total


def _requests_body(job: Job, sync: Callable[[], float]) -> WorkerResult:
    r, clock = _client(job), time.perf_counter
    keys = [f"{KEY_PREFIX}k{i % 16}" for i in range(job.commands)]
    cpu, io = job.cpu_us / 1e6, job.io_ms / 1e3
    lat = array("d")
    if job.warm:
        for name in keys:
            r.get(name)
    end = sync()
    cpu_started = time.process_time()
    count = 0
    while job.life == 0 or len(lat) < job.life:
        started = clock()
        if started >= end:
            break
        if cpu:
            _busy(cpu)
        for name in keys:
            r.get(name)
        if io:
            time.sleep(io)
        done = clock()
        lat.append(done - started)
        if done <= end:
            count += 1
    return WorkerResult(count, lat.tobytes(), lived_out=job.life > 0 and len(lat) >= job.life,
                        cpu_s=time.process_time() - cpu_started)


# S5(a) times this many lease pairs between two looks at the clock, so the
# clock and the sample list cost nothing next to a pair (~5 µs at target).
S5A_BATCH = 100


def _leases_body(job: Job, sync: Callable[[], float]) -> WorkerResult:
    """S5(a): get_connection + release pairs, one process, nobody to wait for."""
    if job.pure_python:
        table_core.use_pure_python("the bench's pure-Python rounds")
    pool = sharedpool.SharedConnectionPool(socket_path=job.address, protocol=job.protocol)
    get, release, clock = pool.get_connection, pool.release, time.perf_counter
    batch = range(S5A_BATCH)
    for _ in range(10):
        for _ in batch:
            release(get())
    end = sync()
    cpu = time.process_time()
    count = 0
    while clock() < end:
        for _ in batch:
            release(get())
        count += S5A_BATCH
    return WorkerResult(count, cpu_s=time.process_time() - cpu)


def _handoffs_body(job: Job, sync: Callable[[], float]) -> WorkerResult:
    """S5(b): the same pairs in W processes on C < W connections: every lease is a hand-off."""
    pool = sharedpool.SharedConnectionPool(socket_path=job.address, protocol=job.protocol)
    clock = time.perf_counter
    for _ in range(100):
        pool.release(pool.get_connection())
    end = sync()
    cpu = time.process_time()
    lat = array("d")
    count = 0
    while True:
        started = clock()
        conn = pool.get_connection()
        done = clock()
        pool.release(conn)
        lat.append(done - started)
        if done >= end:
            break
        count += 1
    return WorkerResult(count, lat.tobytes(), cpu_s=time.process_time() - cpu)


_BODIES: dict[str, Callable[[Job, Callable[[], float]], WorkerResult]] = {
    "latency": _latency_body, "requests": _requests_body, "leases": _leases_body, "handoffs": _handoffs_body,
}


def _worker_main(job: Job, go: Any, end_at: Any, out: Any) -> None:
    """Entry point of a forked worker: report READY, wait for the window, run, send the result."""
    def sync() -> float:
        if not go.is_set():  # a replacement in S3 starts inside the window: no handshake
            out.send(READY)
            if not go.wait(STARTUP_TIMEOUT + 5):
                raise TimeoutError("the parent never opened the measurement window")
        return float(end_at.value)

    try:
        result = _BODIES[job.kind](job, sync)
    except BaseException as exc:  # reported to the parent, which names the run that failed
        result = WorkerResult(error=f"{job.system} worker pid {os.getpid()}: {type(exc).__name__}: {exc}\n"
                                    + "".join(traceback.format_exc(limit=6)))
    try:
        out.send(result)
    except (OSError, ValueError):
        pass
    out.close()


@dataclass
class Run:
    seconds: float
    count: int = 0
    samples: array[float] = field(default_factory=lambda: array("d"))  # in completion order per worker
    peak_clients: int | None = None
    restarts: int = 0
    new_connections: int | None = None
    cpu_s: float = 0.0  # workers' CPU in the window, plus Redis's and the sidecar's
    results: list[WorkerResult] = field(default_factory=list)
    waits: list[int] | None = None  # sharedpool: the manager's wait-time histogram, this window's part

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def cpu_per(self, items: int) -> float:
        return self.cpu_s / items if items else float("nan")

    def sorted_samples(self) -> list[float]:
        return sorted(self.samples)


def run_workers(rig: Systems, job: Job, processes: int, *, sample_clients: bool = False, respawn: bool = False) -> Run:
    """Fork ``processes`` workers running ``job``; open one window for all; collect.

    With ``respawn``, a worker that served its ``job.life`` requests is
    replaced by a fresh fork while the window is open (S3), and the new Redis
    connections the run caused are counted.
    """
    rig.check_time()
    ctx = multiprocess.get_context("fork")
    go, end_at = ctx.Event(), ctx.Value("d", 0.0, lock=False)
    readers: dict[Any, Any] = {}  # result pipe -> process
    started: list[Any] = []

    def spawn(worker_job: Job) -> None:
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_main, args=(worker_job, go, end_at, writer), daemon=True)
        proc.start()
        writer.close()  # the child's end: EOF on ours then means the child is gone
        readers[reader] = proc
        started.append(proc)

    run = Run(rig.settings.duration)
    baseline = rig.connected_clients() if sample_clients else 0
    own_before = rig.own_connections(job) if sample_clients else 0
    try:
        for _ in range(processes):
            spawn(job)
        _await_ready(readers, processes)
        received = rig.connections_received() if respawn else 0
        waits_before = rig.wait_histogram(job.address) if job.system == SHARED and job.kind != "latency" else None
        sidecars = rig.sidecar_pids(job)
        sidecar_cpu = _cpu_seconds(sidecars)
        end = time.perf_counter() + run.seconds
        end_at.value = end
        go.set()
        peak, next_sample = -1, 0.0
        while readers:
            now = time.perf_counter()
            if now > end + FINISH_GRACE + job.io_ms / 1e3 * max(job.life, 1):
                raise RuntimeError(f"{len(readers)} workers still busy {FINISH_GRACE:.0f} s after the window closed")
            if sample_clients and next_sample <= now <= end:
                peak, next_sample = max(peak, rig.connected_clients()), now + SAMPLE_EVERY
            for reader in multiprocess.connection.wait(list(readers), timeout=SAMPLE_EVERY):
                proc = readers.pop(reader)
                result = _receive(reader, proc)
                reader.close()
                if not isinstance(result, WorkerResult) or result.error:
                    raise RuntimeError(getattr(result, "error", "") or f"unexpected message {result!r}")
                run.results.append(result)
                run.count += result.count
                run.cpu_s += result.cpu_s
                run.samples.frombytes(result.latencies)
                if respawn and result.lived_out and time.perf_counter() < end:
                    proc.join(1.0)  # like a master: reap, then fork the replacement
                    spawn(replace(job, warm=False))
                    run.restarts += 1
        run.cpu_s += _cpu_seconds(sidecars) - sidecar_cpu
        if sample_clients and peak >= 0:
            run.peak_clients = peak - baseline + own_before
        if respawn:
            run.new_connections = rig.connections_received() - received
        if waits_before is not None:
            run.waits = [after - before for after, before in zip(rig.wait_histogram(job.address), waits_before, strict=False)]
        return run
    finally:
        _reap(started)
        for reader in readers:
            reader.close()


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _receive(reader: Any, proc: Any) -> Any:
    try:
        return reader.recv()
    except (EOFError, OSError):
        proc.join(1.0)
        return WorkerResult(error=f"worker pid {proc.pid} exited (code {proc.exitcode}) without a result")


def _await_ready(readers: dict[Any, Any], expected: int) -> None:
    deadline, ready = time.perf_counter() + STARTUP_TIMEOUT, 0
    while ready < expected:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise RuntimeError(f"only {ready} of {expected} workers ready after {STARTUP_TIMEOUT:.0f} s")
        for reader in multiprocess.connection.wait(list(readers), timeout=min(left, 1.0)):
            message = _receive(reader, readers[reader])
            if message != READY:
                raise RuntimeError(getattr(message, "error", "") or f"unexpected message {message!r}")
            ready += 1


def _reap(processes: list[Any], grace: float = 2.0) -> None:
    deadline = time.perf_counter() + grace
    for proc in processes:
        proc.join(max(0.0, deadline - time.perf_counter()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
