"""The scenarios: each runs every system once per round, alternating the order."""

from __future__ import annotations

import subprocess
from array import array
from collections.abc import Callable
from dataclasses import replace

from sharedpool import table as tbl
from sharedpool.bench import instructions
from sharedpool.bench.async_scenario import scenario_async
from sharedpool.bench.e2e import run_wrk
from sharedpool.bench.jobs import Job
from sharedpool.bench.report import E2E_SIZES, PLAIN, SHARED, TWEMPROXY, Results, percentile
from sharedpool.bench.rig import Rig
from sharedpool.bench.rounds import run_rounds, say
from sharedpool.bench.workers import S1_MODES, Run, run_workers


def _us(run: Run, q: float) -> float:
    return percentile(run.sorted_samples(), q) * 1e6


def _add_waits(results: Results, prefix: str, round_no: int, waits: list[int] | None) -> str:
    """Store the lease wait p50/p99 of one window (the manager's histogram); return them as text."""
    if not waits or not sum(waits):
        return ""
    p50, p99 = tbl.percentile(waits, 0.50) * 1e3, tbl.percentile(waits, 0.99) * 1e3
    results.add(prefix + ".wait_p50_ms", round_no, p50)
    results.add(prefix + ".wait_p99_ms", round_no, p99)
    return f", lease wait p50/p99 <= {p50:.2f}/{p99:.2f} ms"


def scenario_s1(rig: Rig, results: Results) -> None:
    s = rig.settings
    address = rig.manager(rig.sizes([s.max_connections])[0])
    job = Job("latency", PLAIN, rig.redis_url, rig.protocol, manager=address, redis_pid=rig.redis_pid,
              manager_pid=rig.manager_pid(address))
    # All modes share one window, so it is as long as the three separate ones would be.
    long_rig = rig.with_duration(s.duration * len(S1_MODES))

    def measure(round_no: int) -> str:
        run = run_workers(long_rig, job, 1)
        figures = []
        for mode in S1_MODES:
            raw, cpu_s = run.results[0].modes[mode]
            samples = array("d")
            samples.frombytes(raw)
            system, part = (PLAIN, "a") if mode == "plain" else (SHARED, mode)
            ordered = sorted(samples)
            results.add(f"s1{part}.{system}.p50", round_no, percentile(ordered, 0.5) * 1e6)
            results.add(f"s1{part}.{system}.p99", round_no, percentile(ordered, 0.99) * 1e6)
            if mode == "plain":
                # (b)'s baseline: the same plain commands timed in consecutive groups of ten.
                groups = sorted(sum(samples[i:i + 10]) / 10 for i in range(0, len(samples) - 9, 10))
                results.add("s1b.plain.p50", round_no, percentile(groups, 0.5) * 1e6)
                results.add("s1b.plain.p99", round_no, percentile(groups, 0.99) * 1e6)
            if mode != "b":
                results.add(f"s1a.{system}.cpu_us", round_no, cpu_s / max(1, len(samples)) * 1e6)
            figures.append(f"{mode} p50 {percentile(ordered, 0.5) * 1e6:.1f} us")
        return ", ".join(figures)

    run_rounds(rig, results, "S1", [("plain, sharedpool (a) and (b) interleaved", measure)])


def _request_job(rig: Rig, io: bool) -> Job:
    s = rig.settings
    return Job("requests", PLAIN, rig.redis_url, rig.protocol, commands=s.commands, cpu_us=s.cpu_us,
               io_ms=s.io_ms if io else 0.0)


def _throughput(rig: Rig, results: Results, job: Job, prefix: str) -> Callable[[int], str]:
    def measure(round_no: int) -> str:
        run = run_workers(rig, job, rig.settings.workers, sample_clients=True)
        p99 = percentile(run.sorted_samples(), 0.99) * 1e3
        results.add(prefix + ".rps", round_no, run.rate)
        results.add(prefix + ".p99_ms", round_no, p99)
        results.add(prefix + ".cpu_ms", round_no, run.cpu_per(run.count) * 1e3)
        if run.peak_clients is not None:
            results.add(prefix + ".peak_clients", round_no, run.peak_clients)
        return (f"{run.rate:,.0f} req/s, p99 {p99:.2f} ms, peak {run.peak_clients} Redis connections, "
                f"CPU {run.cpu_per(run.count) * 1e3:.2f} ms/request" + _add_waits(results, prefix, round_no, run.waits))
    return measure


def scenario_s2(rig: Rig, results: Results) -> None:
    size = rig.sizes([rig.settings.max_connections])[0]
    plain = _request_job(rig, io=True)
    shared = replace(plain, system=SHARED, address=rig.manager(size))
    systems = [("plain", _throughput(rig, results, plain, "s2.plain")),
               (f"sharedpool C={size}", _throughput(rig, results, shared, "s2.shared"))]
    if _twemproxy_ready(rig, results):
        job = replace(plain, system=TWEMPROXY, address=rig.twemproxy(size))
        systems.append((f"twemproxy C={size}", _throughput(rig, results, job, "s2.twemproxy")))
    run_rounds(rig, results, "S2", systems)


def s2x_sizes(rig: Rig) -> list[int]:
    return rig.sizes([2, 4, rig.settings.workers])


def scenario_s2x(rig: Rig, results: Results) -> None:
    plain = _request_job(rig, io=False)
    systems = [("plain", _throughput(rig, results, plain, "s2x.plain"))]
    twemproxy = _twemproxy_ready(rig, results)
    for size in s2x_sizes(rig):
        job = replace(plain, system=SHARED, address=rig.manager(size))
        systems.append((f"sharedpool C={size}", _throughput(rig, results, job, f"s2x.shared.c{size}")))
        if twemproxy:
            job = replace(plain, system=TWEMPROXY, address=rig.twemproxy(size))
            systems.append((f"twemproxy C={size}", _throughput(rig, results, job, f"s2x.twemproxy.c{size}")))
    run_rounds(rig, results, "S2'", systems)


def _twemproxy_ready(rig: Rig, results: Results) -> bool:
    if "s4" not in rig.settings.scenarios:
        return False
    if rig.nutcracker is None:
        note = "S4 skipped: nutcracker (twemproxy) is not on PATH (Debian: apt-get install nutcracker)"
        if note not in results.notes:
            results.notes.append(note)
        return False
    return True


def scenario_s3(rig: Rig, results: Results) -> None:
    s = rig.settings
    size = rig.sizes([s.max_connections])[0]
    plain = replace(_request_job(rig, io=True), life=s.restart_every)

    def churn(job: Job, system: str) -> Callable[[int], str]:
        def measure(round_no: int) -> str:
            run = run_workers(rig, job, s.workers, respawn=True)
            results.add(f"s3.{system}.rps", round_no, run.rate)
            results.add(f"s3.{system}.restarts", round_no, run.restarts)
            if run.restarts and run.new_connections is not None:
                results.add(f"s3.{system}.new_per_restart", round_no, run.new_connections / run.restarts)
            elif not run.restarts and few not in results.notes:
                results.notes.append(few)
            return f"{run.rate:,.0f} req/s, {run.restarts} restarts, {run.new_connections} new Redis connections"
        return measure

    few = (f"S3: no worker served its {s.restart_every} requests within a {s.duration:g} s window, so no restart "
           "was measured: lower --restart-every or raise --duration")
    shared = replace(plain, system=SHARED, address=rig.manager(size))
    run_rounds(rig, results, "S3", [("plain", churn(plain, "plain")), (f"sharedpool C={size}", churn(shared, "shared"))])


def scenario_s5(rig: Rig, results: Results) -> None:
    """Lease operations: (a) one process alone, (b) W processes on C connections."""
    size = rig.sizes([rig.settings.max_connections])[0]
    address = rig.manager(size)
    alone, contended = Job("leases", SHARED, address, rig.protocol), Job("handoffs", SHARED, address, rig.protocol)

    def uncontended_on(job: Job, prefix: str) -> Callable[[int], str]:
        def measure(round_no: int) -> str:
            run = run_workers(rig, job, 1)
            results.add(f"{prefix}.leases_per_s", round_no, run.rate)
            results.add(f"{prefix}.us_per_lease", round_no, 1e6 / run.rate if run.rate else float("nan"))
            results.add(f"{prefix}.cpu_us", round_no, run.cpu_per(run.count) * 1e6)
            return f"{run.rate:,.0f} get_connection+release pairs/s ({1e6 / max(run.rate, 1):.2f} us each)"
        return measure

    uncontended = uncontended_on(alone, "s5a.shared")

    def handoffs(round_no: int) -> str:
        run = run_workers(rig, contended, rig.settings.workers)
        results.add("s5b.shared.handoffs_per_s", round_no, run.rate)
        results.add("s5b.shared.p99_us", round_no, _us(run, 0.99))
        results.add("s5b.shared.cpu_us", round_no, run.cpu_per(run.count) * 1e6)
        return (f"{run.rate:,.0f} hand-offs/s, get_connection p99 {_us(run, 0.99):.0f} us"
                + _add_waits(results, "s5b.shared", round_no, run.waits))

    # The same pairs on the pure-Python table core (the path without a
    # compiler), in the same rounds: the accelerator's gain as a ratio.
    pure = uncontended_on(replace(alone, pure_python=True), "s5a.pure")
    run_rounds(rig, results, "S5", [("(a) 1 process", uncontended), ("(a) 1 process, pure-Python core", pure),
                                 (f"(b) W={rig.settings.workers} on C={size}", handoffs)])
    _count_instructions(rig, results, address)


def _count_instructions(rig: Rig, results: Results, address: str) -> None:
    """S5(a) by callgrind, once per core: instructions per lease, which the machine's load does not move."""
    if instructions.available() is None:
        results.notes.append("S5(a) instructions not counted: valgrind is not on PATH")
        return
    rig.check_time(runs=2, seconds=60.0)
    for label, pure in (("shared", False), ("pure", True)):
        try:
            count, path = instructions.per_lease(address, rig.protocol, pure)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            results.errors.append(f"S5(a) callgrind, {label}: {exc}")
            continue
        results.add(f"s5a.{label}.instructions", 1, count)
        say(f"S5(a) callgrind, table core {path}: {count:,.0f} instructions per get_connection+release")


def scenario_e2e(rig: Rig, results: Results) -> None:
    """gunicorn sync workers serving 3 Redis commands per request, loaded by wrk: plain, then sharedpool per C."""
    if rig.e2e_missing is not None or rig.wrk is None:
        results.notes.append(f"E2E skipped: {rig.e2e_missing}")
        return
    s, wrk = rig.settings, rig.wrk
    seconds = s.wrk_seconds
    systems = [(PLAIN, rig.redis_url, "e2e.plain", "plain")]
    systems += [(SHARED, rig.manager(c), f"e2e.shared.c{c}", f"sharedpool C={c}") for c in e2e_sizes(rig)]
    rig.check_time(2 * len(systems), seconds)  # room for the warm-up and one round
    servers = []
    try:
        try:
            for system, address, _key, _label in systems:
                servers.append(rig.gunicorn(system, address))
            for server in servers:
                server.wait_ready()
            for server in servers:  # warm up: every worker past its first requests, caches and TCP state filled
                run_wrk(wrk, server.url, s.wrk_connections, 1)
        except Exception as exc:
            results.errors.append(f"E2E setup: {exc}")
            say(f"E2E setup: ERROR {exc}")
            return

        def load(server_index: int) -> Callable[[int], str]:
            system, address, key, _label = systems[server_index]

            def measure(round_no: int) -> str:
                rig.check_time(1, seconds)
                before = rig.wait_histogram(address) if system == SHARED else None
                result = run_wrk(wrk, servers[server_index].url, s.wrk_connections, seconds)
                if result.errors:
                    raise RuntimeError(f"wrk reported errors: {result.errors}")
                results.add(key + ".rps", round_no, result.requests_per_s)
                results.add(key + ".p50_ms", round_no, result.p50_ms)
                results.add(key + ".p99_ms", round_no, result.p99_ms)
                waits = None
                if before is not None:
                    waits = [after - earlier for after, earlier in zip(rig.wait_histogram(address), before, strict=False)]
                return (f"{result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
                        + _add_waits(results, key, round_no, waits))
            return measure

        run_rounds(rig, results, "E2E", [(label, load(i)) for i, (_s, _a, _k, label) in enumerate(systems)])
    finally:
        for server in servers:
            server.stop()


def e2e_sizes(rig: Rig) -> list[int]:
    return sorted(rig.sizes(list(E2E_SIZES)), reverse=True)


SCENARIO_RUNNERS: dict[str, Callable[[Rig, Results], None]] = {
    "s1": scenario_s1, "s2": scenario_s2, "s2x": scenario_s2x, "s3": scenario_s3, "s5": scenario_s5, "e2e": scenario_e2e,
    "async": scenario_async, "tls": lambda rig, results: _tls(rig, results),
    "cluster": lambda rig, results: _cluster(rig, results),
}


def _cluster(rig: Rig, results: Results) -> None:
    from sharedpool.bench.cluster_scenario import scenario_cluster  # takes run_rounds

    scenario_cluster(rig, results, run_rounds)


def _tls(rig: Rig, results: Results) -> None:
    from sharedpool.bench.tls_scenario import scenario_tls  # takes run_rounds

    scenario_tls(rig, results, run_rounds)
