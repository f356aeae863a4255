"""What ``sharedpool bench`` measured, judged against the targets, as a table or JSON.

``scenarios`` drives the runs and stores one value per (key, round) in a
``Results``; this module turns those into rows and judges them against
the targets of the lease-table issue. Every figure in the table
is the median over rounds. A ratio is the median of the per-round ratios:
the systems of a round ran back to back, so pairing them cancels most of
the drift of a shared, noisy machine, which a ratio of two medians would not.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import redis

import sharedpool

PLAIN = "plain"
SHARED = "shared"
TWEMPROXY = "twemproxy"

# Targets of the C-accelerator issue (the lease table's before it); every
# ratio is against plain redis-py (or twemproxy) measured in the same run.
S1A_MAX_RATIO = 0.95  # one lease per command, GET p50
S2_MIN_RATIO = 1.0  # W=8, C=2, 5 ms other I/O
CLUSTER_MIN_RATIO = 0.9  # W=8 on 3 primaries, C per node, issue 22
S2X_MIN_RATIO = {2: 0.85, 4: 1.0}  # Redis-bound, by C
VS_TWEMPROXY_MIN_RATIO = 1.0
VS_TWEMPROXY_FROM_C = 4  # S4 holds from this many connections up
S5A_MIN_LEASES = 250_000.0  # get_connection + release pairs per second, one process, on the accelerator
# The pure-Python path no slower than before the accelerator: an uncontended
# get_connection + release took 88.1k instructions then (callgrind; README).
PURE_MAX_INSTRUCTIONS = 88_100.0
E2E_SIZES = (4, 2)
E2E_MIN_RATIO = {4: 1.0, 2: 0.90}  # gunicorn + wrk requests/s, by C

WAIT_NOTE = ("lease wait = the manager's wait-time histogram (what stats()['wait_time'] summarises), "
             "this window's part; a figure is the upper bound of its bucket (10 us x 2^i)")


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted samples (q in 0..1)."""
    if not samples:
        return float("nan")
    return samples[min(len(samples) - 1, int(q * len(samples)))]


class Results:
    """Values by key and round, plus what went wrong and what was skipped."""

    def __init__(self) -> None:
        self.values: dict[str, dict[int, float]] = {}
        self.errors: list[str] = []
        self.notes: list[str] = []

    def add(self, key: str, round_no: int, value: float) -> None:
        self.values.setdefault(key, {})[round_no] = value

    def median(self, key: str) -> float | None:
        series = self.values.get(key)
        return statistics.median(series.values()) if series else None

    def ratio(self, numerator: str, denominator: str) -> float | None:
        """Median of the per-round ratios, over rounds where both ran."""
        top, bottom = self.values.get(numerator, {}), self.values.get(denominator, {})
        pairs = [top[r] / bottom[r] for r in top if r in bottom and bottom[r] > 0]
        return statistics.median(pairs) if pairs else None


@dataclass
class Row:
    scenario: str
    metric: str
    plain: float | None = None
    shared: float | None = None
    twemproxy: float | None = None
    ratio: float | None = None
    ratio_of: str = ""  # what the ratio divides by: "plain" or "twemproxy"
    target: str = ""
    verdict: str = "-"  # PASS, MISS, n/a (no data), - (no target)
    decimals: int = 1
    text: str = ""  # a row whose answer is words, not numbers


@dataclass
class Report:
    machine: dict[str, Any]
    command: str
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    results: Results = field(default_factory=Results)
    elapsed_s: float = 0.0


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda value: value >= limit


def _judge(value: float | None, passes: Callable[[float], bool]) -> str:
    if value is None:
        return "n/a"
    return "PASS" if passes(value) else "MISS"


def build_rows(results: Results, settings: dict[str, Any], cs: Sequence[int], twemproxy: bool,
               e2e_cs: Sequence[int] = ()) -> list[Row]:
    """The table, in scenario order, from whatever keys the run filled."""
    m, rows = results.median, []
    w, k, c = settings["workers"], settings["commands"], settings["max_connections"]

    def compare(scenario: str, metric: str, shared: str, plain: str = "", twemproxy: str = "", of: str = PLAIN,
                target: str = "", passes: Callable[[float], bool] | None = None, decimals: int = 1) -> None:
        """A row of medians by key; its ratio is the median of per-round ratios shared / ``of``."""
        base = plain if of == PLAIN else twemproxy
        ratio = results.ratio(shared, base) if base else None
        rows.append(Row(scenario, metric, m(plain) if plain else None, m(shared), m(twemproxy) if twemproxy else None,
                        ratio, of if base else "", target, _judge(ratio, passes) if passes else "-", decimals))

    def waits(scenario: str, metric: str, prefix: str) -> None:
        p50, p99 = m(prefix + ".wait_p50_ms"), m(prefix + ".wait_p99_ms")
        if p50 is not None and p99 is not None:
            rows.append(Row(scenario, metric, text=f"{p50:.2f} / {p99:.2f}"))

    def vs_twemproxy(size: int) -> dict[str, Any]:
        if size < VS_TWEMPROXY_FROM_C:
            return {}
        return {"target": f">= {VS_TWEMPROXY_MIN_RATIO:.2f}x twemproxy", "passes": _at_least(VS_TWEMPROXY_MIN_RATIO)}

    compare("S1(a)", "GET p50 us/command, 1 lease per command", "s1a.shared.p50", "s1a.plain.p50",
            target=f"<= {S1A_MAX_RATIO:.2f}x plain", passes=_at_most(S1A_MAX_RATIO))
    compare("S1(a)", "GET p99 us/command, 1 lease per command", "s1a.shared.p99", "s1a.plain.p99")
    compare("S1(a)", "CPU us/command, all processes", "s1a.shared.cpu_us", "s1a.plain.cpu_us")
    for q in ("p50", "p99"):
        compare("S1(b)", f"GET {q} us/command, 10 commands per lease()", f"s1b.shared.{q}", f"s1b.plain.{q}")

    label = f"W={w} k={k} C={c}, io {settings['io_ms']:g} ms"
    compare("S2", f"requests/s ({label})", "s2.shared.rps", "s2.plain.rps", "s2.twemproxy.rps",
            target=f">= {S2_MIN_RATIO:.2f}x plain", passes=_at_least(S2_MIN_RATIO), decimals=0)
    compare("S2", "p99 request latency ms", "s2.shared.p99_ms", "s2.plain.p99_ms", "s2.twemproxy.p99_ms", decimals=2)
    compare("S2", "CPU ms/request, all processes", "s2.shared.cpu_ms", "s2.plain.cpu_ms", "s2.twemproxy.cpu_ms", decimals=2)
    rows.append(Row("S2", "peak Redis connections", m("s2.plain.peak_clients"), m("s2.shared.peak_clients"),
                    m("s2.twemproxy.peak_clients"), decimals=0))
    waits("S2", "lease wait p50 / p99 ms", "s2.shared")
    if twemproxy:
        compare("S4", f"requests/s as S2 ({label})", "s2.shared.rps", twemproxy="s2.twemproxy.rps", of=TWEMPROXY,
                decimals=0, **vs_twemproxy(c))

    for size in cs:
        shared, proxy = f"s2x.shared.c{size}.rps", f"s2x.twemproxy.c{size}.rps"
        limit = S2X_MIN_RATIO.get(size)
        compare("S2'", f"requests/s, no other I/O, W={w} C={size}", shared, "s2x.plain.rps", proxy, decimals=0,
                target=f">= {limit:.2f}x plain" if limit else "", passes=_at_least(limit) if limit else None)
        waits("S2'", f"lease wait p50 / p99 ms, C={size}", f"s2x.shared.c{size}")
        if twemproxy:
            compare("S4", f"requests/s as S2', C={size}", shared, twemproxy=proxy, of=TWEMPROXY, decimals=0,
                    **vs_twemproxy(size))

    compare("S3", f"requests/s, restart every {settings['restart_every']} requests", "s3.shared.rps", "s3.plain.rps",
            decimals=0)
    new = m("s3.shared.new_per_restart")
    rows.append(Row("S3", "new Redis connections per worker restart", m("s3.plain.new_per_restart"), new,
                    target="0 for sharedpool", verdict=_judge(new, lambda v: v == 0), decimals=2))
    rows.append(Row("S3", "worker restarts per run", m("s3.plain.restarts"), m("s3.shared.restarts"), decimals=0))

    leases = m("s5a.shared.leases_per_s")
    rows.append(Row("S5(a)", "leases/s, get_connection+release, 1 process", shared=leases,
                    target=f">= {S5A_MIN_LEASES:,.0f}/s", verdict=_judge(leases, _at_least(S5A_MIN_LEASES)), decimals=0))
    compare("S5(a)", "us per lease, wall clock", "s5a.shared.us_per_lease", decimals=2)
    compare("S5(a)", "CPU us per lease, worker + manager + Redis", "s5a.shared.cpu_us", decimals=2)
    compare("S5(a)", "instructions per lease (callgrind, worker)", "s5a.shared.instructions", decimals=0)
    compare("S5(a)", "leases/s, pure-Python table core", "s5a.pure.leases_per_s", decimals=0)
    compare("S5(a)", "us per lease, pure-Python table core", "s5a.pure.us_per_lease", decimals=2)
    speed_up = results.ratio("s5a.shared.leases_per_s", "s5a.pure.leases_per_s")
    if speed_up is not None:
        rows.append(Row("S5(a)", "leases/s, accelerator / pure-Python core", text=f"{speed_up:.2f}x"))
    pure = m("s5a.pure.instructions")
    if pure is not None:
        # Instructions, not leases/s: the load of a shared machine moves the one and not the other.
        rows.append(Row("S5(a)", "instructions per lease, pure-Python table core", shared=pure,
                        target=f"<= {PURE_MAX_INSTRUCTIONS:,.0f}", verdict=_judge(pure, _at_most(PURE_MAX_INSTRUCTIONS)),
                        decimals=0))
    compare("S5(b)", f"hand-offs/s, W={w} processes on C={c}", "s5b.shared.handoffs_per_s",
            target="report; higher is better", decimals=0)
    compare("S5(b)", "get_connection p99 us, client side", "s5b.shared.p99_us", decimals=0)
    compare("S5(b)", "CPU us per hand-off, workers + manager + Redis", "s5b.shared.cpu_us", decimals=1)
    waits("S5(b)", "lease wait p50 / p99 ms", "s5b.shared")

    http = f"{settings['http_workers']} gunicorn sync workers, wrk -c{settings['wrk_connections']}"
    for size in e2e_cs:
        limit = E2E_MIN_RATIO.get(size)
        compare("E2E", f"requests/s ({http}), C={size}", f"e2e.shared.c{size}.rps", "e2e.plain.rps", decimals=0,
                target=f">= {limit:.2f}x plain" if limit else "", passes=_at_least(limit) if limit else None)
        compare("E2E", f"p99 request latency ms, C={size}", f"e2e.shared.c{size}.p99_ms", "e2e.plain.p99_ms", decimals=2)
        waits("E2E", f"lease wait p50 / p99 ms, C={size}", f"e2e.shared.c{size}")
    label = f"W=4 x 64 tasks, k={k}, C=4, io {settings['io_ms']:g} ms"
    compare("ASYNC", f"requests/s, defaults: autopipelined ({label})", "async.shared.rps", "async.plain.rps", decimals=0,
            target=">= 1.00x plain", passes=_at_least(1.0))
    compare("ASYNC", "CPU ms/request, workers, defaults", "async.shared.cpu_ms", "async.plain.cpu_ms", decimals=3,
            target="<= 1.00x plain", passes=_at_most(1.0))
    compare("ASYNC", "p99 request latency ms, defaults", "async.shared.p99_ms", "async.plain.p99_ms", decimals=2)
    compare("ASYNC", "commands per batch, defaults", "async.shared.per_batch", decimals=1)
    compare("ASYNC", "requests/s, autopipeline=False", "async.shared_optout.rps", "async.plain.rps", decimals=0)
    compare("ASYNC", "CPU ms/request, workers, autopipeline=False", "async.shared_optout.cpu_ms", "async.plain.cpu_ms",
            decimals=3)
    compare("ASYNC", "p99 request latency ms, autopipeline=False", "async.shared_optout.p99_ms", "async.plain.p99_ms",
            decimals=2)
    compare("ASYNC", "requests/s, one lease() per request", "async.shared_lease.rps", "async.plain.rps", decimals=0)
    compare("ASYNC", "CPU ms/request, workers, lease() per request", "async.shared_lease.cpu_ms", "async.plain.cpu_ms",
            decimals=3)
    compare("ASYNC", "p99 request latency ms, lease() per request", "async.shared_lease.p99_ms", "async.plain.p99_ms",
            decimals=2)
    compare("ASYNC", "p99 ms of the others, a 1 MB GET mixed in, defaults", "async.shared_slow.p99_ms",
            "async.plain_slow.p99_ms", decimals=2)
    compare("ASYNC", "requests/s, a 1 MB GET mixed in, defaults", "async.shared_slow.rps", "async.plain_slow.rps",
            decimals=0)
    rows.append(Row("ASYNC", "peak Redis connections, defaults", m("async.plain.peak_clients"),
                    m("async.shared.peak_clients"), decimals=0))
    # The issue-20 bound: a lease renewed for the next command costs no more than redis.asyncio's own checkout.
    compare("ASYNC", "CPU us per checkout+release, one task, back to back", "async.checkout_shared.back_to_back_us",
            "async.checkout_plain.back_to_back_us", decimals=2, target="<= 1.00x plain", passes=_at_most(1.0))
    compare("ASYNC", "CPU us per checkout+release, a loop turn between", "async.checkout_shared.turned_us",
            "async.checkout_plain.turned_us", decimals=2)
    compare("TLS S1(a)", "GET p50 us/command over TLS, 1 lease per command", "tls.s1a.shared.p50", "tls.s1a.plain.p50",
            target="<= 1.00x plain", passes=_at_most(1.0))
    compare("TLS S1(a)", "GET p99 us/command over TLS", "tls.s1a.shared.p99", "tls.s1a.plain.p99")
    compare("TLS S1(b)", "GET p50 us/command over TLS, 10 per lease()", "tls.s1b.shared.p50", "tls.s1b.plain.p50",
            target="<= 1.00x plain", passes=_at_most(1.0))
    for size in (c,):
        compare("TLS E2E", f"requests/s over TLS ({http}), C={size}", f"tls.e2e.shared.c{size}.rps", "tls.e2e.plain.rps",
                decimals=0, target=">= 1.00x plain", passes=_at_least(1.0))
        compare("TLS E2E", f"p99 request latency ms over TLS, C={size}", f"tls.e2e.shared.c{size}.p99_ms",
                "tls.e2e.plain.p99_ms", decimals=2)
    compare("CLUSTER", f"requests/s, W={w} on 3 primaries, C={c} per node", "cluster.shared.rps", "cluster.plain.rps",
            decimals=0, target=f">= {CLUSTER_MIN_RATIO:.2f}x plain", passes=_at_least(CLUSTER_MIN_RATIO))
    cluster_peak = m("cluster.shared.peak_clients")
    rows.append(Row("CLUSTER", "peak Redis connections, all nodes", m("cluster.plain.peak_clients"), cluster_peak,
                    target=f"<= {3 * c} (max_connections)", verdict=_judge(cluster_peak, _at_most(3 * c)), decimals=0))
    wanted = {name.lower() for name in settings["scenarios"]}
    return [row for row in rows if _scenario_id(row.scenario) in wanted]


def _scenario_id(scenario: str) -> str:
    return {"S1(a)": "s1", "S1(b)": "s1", "S2'": "s2x", "S5(a)": "s5", "S5(b)": "s5", "TLS S1(a)": "tls", "TLS S1(b)": "tls",
            "TLS E2E": "tls"}.get(scenario, scenario.lower())


def _number(value: float | None, decimals: int) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{decimals}f}"


def format_table(report: Report) -> str:
    lines = [f"sharedpool bench  ({report.command})", ""]
    lines += [f"  {name:<14} {value}" for name, value in report.machine.items()]
    lines.append("  settings       " + "  ".join(f"{k}={v}" for k, v in report.settings.items() if k != "scenarios"))
    lines.append("")
    header = ("scenario", "metric", "plain", "sharedpool", "twemproxy", "ratio", "target", "result")
    body = []
    for row in report.rows:
        if row.text:
            cells = (row.scenario, row.metric, "", row.text, "", "", row.target, row.verdict)
        else:
            ratio = f"{row.ratio:.2f}x {row.ratio_of}" if row.ratio is not None else "-"
            cells = (row.scenario, row.metric, _number(row.plain, row.decimals), _number(row.shared, row.decimals),
                     _number(row.twemproxy, row.decimals), ratio, row.target or "-", row.verdict)
        body.append(cells)
    widths = [max(len(str(cells[i])) for cells in [header, *body]) for i in range(len(header))]
    numeric = {2, 3, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    lines.append(line(header))
    lines.append("  ".join("-" * width for width in widths))
    lines += [line(cells) for cells in body]
    lines.append("")
    lines.append(
        f"Figures are medians of {report.settings['rounds']} rounds; a ratio is the median of per-round "
        "ratios (sharedpool / the column named), runs alternating within each round."
    )
    if any(row.metric.startswith("lease wait") for row in report.rows):
        lines.append(f"note: {WAIT_NOTE}")
    for note in report.results.notes:
        lines.append(f"note: {note}")
    for error in report.results.errors:
        lines.append(f"ERROR: {error}")
    verdicts = [row.verdict for row in report.rows]
    lines.append(
        f"{verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS, {verdicts.count('n/a')} n/a; "
        f"{len(report.results.errors)} errors; {report.elapsed_s:.1f} s"
    )
    return "\n".join(lines)


def to_json(report: Report) -> str:
    document = {
        "machine": report.machine,
        "command": report.command,
        "settings": report.settings,
        "rows": [asdict(row) for row in report.rows],
        "rounds": {key: {str(r): v for r, v in sorted(series.items())} for key, series in sorted(report.results.values.items())},
        "notes": report.results.notes,
        "errors": report.results.errors,
        "elapsed_s": round(report.elapsed_s, 3),
    }
    return json.dumps(document, indent=2, allow_nan=False, default=str)


def command_line() -> str:
    """The command as typed, interpreter included, so a run can be repeated exactly."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def describe_machine(redis_version: str, redis_where: str, twemproxy: str) -> dict[str, Any]:
    physical = psutil.cpu_count(logical=False)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {physical or '?'} physical, {usable} usable",
        "load": f"{load_average()} (1, 5, 15 min) at start",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis-py": redis.__version__,
        "redis-server": f"{redis_version} ({redis_where})",
        "sharedpool": sharedpool.__version__,
        "twemproxy": twemproxy,
    }
