"""TLS rows: S1 and E2E against a TLS-only Redis, sharedpool beside redis-py's own ``ssl=True``.

A second redis-server is started listening only on ``--tls-port`` with
certificates made for the run (``sharedpool.dev.tls_server``), a manager on
``rediss://`` in front of it. Plain redis-py connects with the same URL, so
it pays its own handshake per worker and its own TLS per command; the
pool's handshake is paid once per connection, by the manager. Skipped with
a note where no redis-server has TLS or ``cryptography`` is missing.
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Callable
from pathlib import Path

from sharedpool.bench.e2e import run_wrk
from sharedpool.bench.jobs import KEY_PREFIX, Job
from sharedpool.bench.report import PLAIN, SHARED, Results, percentile
from sharedpool.bench.rig import Rig
from sharedpool.bench.workers import S1_MODES, run_workers
from sharedpool.dev.launch import ManagerProcess

Rounds = Callable[[Rig, Results, str, list[tuple[str, Callable[[int], str]]]], None]  # rounds.run_rounds


def scenario_tls(rig: Rig, results: Results, rounds: Rounds) -> None:
    from sharedpool import tls

    if not tls.available():
        results.notes.append(f"TLS skipped: {tls.INSTALL_HINT}")
        return
    from sharedpool.dev.tls_server import Certs, NoTLSServer, TLSRedis

    s = rig.settings
    directory = Path(rig.workdir) / "tls"
    try:
        server = TLSRedis(directory / "redis", Certs.make(directory / "certs"))
        rig.stack.callback(server.stop)
        server.start()
    except NoTLSServer as exc:
        results.notes.append(f"TLS skipped: {exc}")
        return
    url = server.url()
    admin = server.client()
    rig.stack.callback(admin.close)
    admin.set(KEY_PREFIX + "small", b"v" * 16)
    for i in range(16):
        admin.set(f"{KEY_PREFIX}k{i}", b"v" * 16)
    redis_pid = int(admin.info("server").get("process_id", 0))
    size = s.max_connections
    path = os.path.join(rig.workdir, f"manager-tls-c{size}.sock")
    manager = ManagerProcess(path, url, log_path=path + ".log", max_connections=size, min_idle=size,
                             pool_name=f"bench-tls-c{size}", log_level="WARNING")
    rig.stack.callback(manager.stop, 5.0)
    manager.start(timeout=15.0)
    deadline = time.monotonic() + 10.0
    while rig.manager_open(path) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"TLS manager with max_connections={size} did not open them within 10 s")
        time.sleep(0.02)

    job = Job("latency", PLAIN, url, rig.protocol, manager=path, redis_pid=redis_pid, manager_pid=manager.pid)
    long_rig = rig.with_duration(s.duration * len(S1_MODES))

    def s1(round_no: int) -> str:
        run = run_workers(long_rig, job, 1)
        figures = []
        for mode in S1_MODES:
            raw, _cpu_s = run.results[0].modes[mode]
            samples = array("d")
            samples.frombytes(raw)
            system, part = (PLAIN, "a") if mode == "plain" else (SHARED, mode)
            ordered = sorted(samples)
            results.add(f"tls.s1{part}.{system}.p50", round_no, percentile(ordered, 0.5) * 1e6)
            results.add(f"tls.s1{part}.{system}.p99", round_no, percentile(ordered, 0.99) * 1e6)
            if mode == "plain":
                groups = sorted(sum(samples[i:i + 10]) / 10 for i in range(0, len(samples) - 9, 10))
                results.add("tls.s1b.plain.p50", round_no, percentile(groups, 0.5) * 1e6)
            figures.append(f"{mode} p50 {percentile(ordered, 0.5) * 1e6:.1f} us")
        return ", ".join(figures)

    rounds(rig, results, "TLS S1", [("plain ssl=True, sharedpool (a) and (b) interleaved", s1)])
    if rig.e2e_missing is not None or rig.wrk is None:
        results.notes.append(f"TLS E2E skipped: {rig.e2e_missing or 'e2e not selected'}")
        return
    wrk, seconds = rig.wrk, s.wrk_seconds
    systems = [(PLAIN, url, "tls.e2e.plain", "plain ssl=True"), (SHARED, path, f"tls.e2e.shared.c{size}", f"sharedpool C={size}")]
    servers = [rig.gunicorn(system, address) for system, address, _k, _l in systems]
    for http in servers:
        http.wait_ready()
    for http in servers:
        run_wrk(wrk, http.url, s.wrk_connections, 1)

    def load(index: int) -> Callable[[int], str]:
        key = systems[index][2]

        def measure(round_no: int) -> str:
            rig.check_time(1, seconds)
            result = run_wrk(wrk, servers[index].url, s.wrk_connections, seconds)
            if result.errors:
                raise RuntimeError(f"wrk reported errors: {result.errors}")
            results.add(key + ".rps", round_no, result.requests_per_s)
            results.add(key + ".p99_ms", round_no, result.p99_ms)
            return f"{result.requests_per_s:,.0f} req/s, p99 {result.p99_ms:.2f} ms"
        return measure

    try:
        rounds(rig, results, "TLS E2E", [(label, load(i)) for i, (_s, _a, _k, label) in enumerate(systems)])
    finally:
        for http in servers:
            http.stop()
