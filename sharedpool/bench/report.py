"""What ``sharedpool bench`` measured, judged against the targets, as a table or JSON.

``bench.py`` drives the runs and stores one value per (key, round) in a
``Results``; this module turns those into rows. Every figure in the table
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

# Targets of the project (issue 6). Each is (comparison, threshold).
S1A_MAX_RATIO = 1.5
S1B_MAX_RATIO = 1.10
S2_MIN_RATIO = 0.95
VS_TWEMPROXY_MIN_RATIO = 1.0
S2X_REACH = 0.9
S5_MIN_GRANTS = 20_000.0


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


def _judge(value: float | None, passes: Callable[[float], bool]) -> str:
    if value is None:
        return "n/a"
    return "PASS" if passes(value) else "MISS"


def build_rows(results: Results, settings: dict[str, Any], cs: Sequence[int], twemproxy: bool) -> list[Row]:
    """The table, in scenario order, from whatever keys the run filled."""
    m, rows = results.median, []
    w, k, c = settings["workers"], settings["commands"], settings["max_connections"]
    for part, block, limit in (("a", "1 lease per command", S1A_MAX_RATIO), ("b", "10 commands per lease()", S1B_MAX_RATIO)):
        for q in ("p50", "p99"):
            ratio = results.ratio(f"s1{part}.shared.{q}", f"s1{part}.plain.{q}")
            row = Row(f"S1({part})", f"GET {q} us/command, {block}", m(f"s1{part}.plain.{q}"), m(f"s1{part}.shared.{q}"),
                      ratio=ratio, ratio_of=PLAIN)
            if q == "p50":
                row.target, row.verdict = f"<= {limit:.2f}x plain", _judge(ratio, _at_most(limit))
            rows.append(row)
        if part == "a":
            rows.append(Row("S1(a)", "CPU us/command, all processes", m("s1a.plain.cpu_us"), m("s1a.shared.cpu_us"),
                            ratio=results.ratio("s1a.shared.cpu_us", "s1a.plain.cpu_us"), ratio_of=PLAIN))

    label, key = f"W={w} k={k} C={c}, io {settings['io_ms']:g} ms", "s2"
    rps = Row("S2", f"requests/s ({label})", m(f"{key}.plain.rps"), m(f"{key}.shared.rps"), m(f"{key}.twemproxy.rps"),
              results.ratio(f"{key}.shared.rps", f"{key}.plain.rps"), PLAIN, f">= {S2_MIN_RATIO:.2f}x plain (C=2, W=8)", decimals=0)
    rps.verdict = _judge(rps.ratio, lambda r: r >= S2_MIN_RATIO)
    rows.append(rps)
    for metric, suffix, decimals in (("p99 request latency ms", "p99_ms", 2), ("CPU ms/request, all processes", "cpu_ms", 2),
                                     ("peak Redis connections", "peak_clients", 0)):
        ratio = results.ratio(f"{key}.shared.{suffix}", f"{key}.plain.{suffix}") if suffix != "peak_clients" else None
        rows.append(Row("S2", metric, m(f"{key}.plain.{suffix}"), m(f"{key}.shared.{suffix}"), m(f"{key}.twemproxy.{suffix}"),
                        ratio, PLAIN if ratio is not None else "", decimals=decimals))
    if twemproxy:
        vs = results.ratio(f"{key}.shared.rps", f"{key}.twemproxy.rps")
        rows.append(Row("S4", f"requests/s as S2 ({label})", None, m(f"{key}.shared.rps"), m(f"{key}.twemproxy.rps"), vs,
                        TWEMPROXY, f">= {VS_TWEMPROXY_MIN_RATIO:.2f}x twemproxy", _judge(vs, lambda r: r >= VS_TWEMPROXY_MIN_RATIO), 0))

    reached: int | None = None
    for size in cs:
        key = f"s2x.shared.c{size}.rps"
        ratio = results.ratio(key, "s2x.plain.rps")
        rows.append(Row("S2'", f"requests/s, no other I/O, C={size}", m("s2x.plain.rps"), m(key), m(f"s2x.twemproxy.c{size}.rps"),
                        ratio, PLAIN, decimals=0))
        if ratio is not None and ratio >= S2X_REACH and reached is None:
            reached = size
        if twemproxy:
            vs = results.ratio(key, f"s2x.twemproxy.c{size}.rps")
            rows.append(Row("S4", f"requests/s as S2', C={size}", None, m(key), m(f"s2x.twemproxy.c{size}.rps"), vs, TWEMPROXY,
                            f">= {VS_TWEMPROXY_MIN_RATIO:.2f}x twemproxy", _judge(vs, lambda r: r >= VS_TWEMPROXY_MIN_RATIO), 0))
    if any(f"s2x.shared.c{size}.rps" in results.values for size in cs):
        tried = ", ".join(str(size) for size in cs)
        rows.append(Row("S2'", f"smallest C reaching {S2X_REACH:.1f}x plain",
                        text=f"C={reached}" if reached is not None else f"none of C={tried}"))

    rows.append(Row("S3", f"requests/s, restart every {settings['restart_every']} requests", m("s3.plain.rps"), m("s3.shared.rps"),
                    ratio=results.ratio("s3.shared.rps", "s3.plain.rps"), ratio_of=PLAIN, decimals=0))
    new = m("s3.shared.new_per_restart")
    rows.append(Row("S3", "new Redis connections per worker restart", m("s3.plain.new_per_restart"), new,
                    target="0 for sharedpool", verdict=_judge(new, lambda v: v == 0), decimals=2))
    rows.append(Row("S3", "worker restarts per run", m("s3.plain.restarts"), m("s3.shared.restarts"), decimals=0))

    grants = m("s5.shared.grants_per_s")
    rows.append(Row("S5", f"lease grants/s, W={w} acquire+release, C={c}", shared=grants,
                    target=f">= {S5_MIN_GRANTS:,.0f}/s", verdict=_judge(grants, lambda g: g >= S5_MIN_GRANTS), decimals=0))
    rows.append(Row("S5", "grant latency p99 us", shared=m("s5.shared.p99_us"), decimals=0))
    rows.append(Row("S5", "CPU us/grant, workers + manager + Redis", shared=m("s5.shared.cpu_us"), decimals=0))
    wanted = {name.lower() for name in settings["scenarios"]}
    return [row for row in rows if _scenario_id(row.scenario) in wanted]


def _scenario_id(scenario: str) -> str:
    return {"S1(a)": "s1", "S1(b)": "s1", "S2'": "s2x"}.get(scenario, scenario.lower())


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


def describe_machine(redis_version: str, redis_where: str, twemproxy: str) -> dict[str, Any]:
    physical = psutil.cpu_count(logical=False)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {physical or '?'} physical, {usable} usable; load average {load}",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis-py": redis.__version__,
        "redis-server": f"{redis_version} ({redis_where})",
        "sharedpool": sharedpool.__version__,
        "twemproxy": twemproxy,
    }
