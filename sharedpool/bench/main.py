"""``run_bench``: set up, run the chosen scenarios, print the table or JSON."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from contextlib import ExitStack
from typing import Any

import sharedpool.bench.report as report
from sharedpool.bench.report import Report, Results
from sharedpool.bench.rig import Rig, Skipped
from sharedpool.bench.rounds import say
from sharedpool.bench.scenarios import SCENARIO_RUNNERS, e2e_sizes, s2x_sizes
from sharedpool.bench.settings import BenchSettings


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: children are stopped


def run_bench(args: argparse.Namespace) -> int:
    try:
        settings = BenchSettings.from_args(args)
    except ValueError as exc:
        print(f"sharedpool bench: error: {exc}", file=sys.stderr)
        return 2
    command, started = report.command_line(), time.perf_counter()
    results = Results()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with ExitStack() as stack:
            try:
                rig = Rig(settings, args, stack)
            except Exception as exc:
                print(f"sharedpool bench: cannot set up: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            twemproxy_text = rig.twemproxy_version or ("not used" if "s4" not in settings.scenarios or args.no_twemproxy
                                                       else "not on PATH")
            machine = report.describe_machine(rig.redis_version, rig.redis_where, twemproxy_text)
            say(f"sharedpool bench: {command}")
            try:
                for name in settings.scenarios:
                    if name in SCENARIO_RUNNERS:
                        SCENARIO_RUNNERS[name](rig, results)
            except Skipped as exc:
                results.notes.append(f"{exc}: later runs skipped")
                say(f"{exc}: skipping the remaining runs")
            machine["load"] += f"; {report.load_average()} at end"
            cs, e2e_cs = s2x_sizes(rig), e2e_sizes(rig) if rig.e2e_missing is None else []
            if settings.scenarios == ("s4",):
                results.notes.append("S4 runs inside S2 and S2': select them too (--scenarios s2,s2x,s4)")
    finally:
        signal.signal(signal.SIGTERM, previous)
    document = Report(machine, command, rig.settings.public(), results=results, elapsed_s=time.perf_counter() - started)
    document.rows = report.build_rows(results, document.settings, cs, bool(rig.nutcracker), e2e_cs)
    if args.json_file:
        with open(args.json_file, "w", encoding="utf-8") as handle:
            handle.write(report.to_json(document) + "\n")
    print(report.to_json(document) if args.json else report.format_table(document), flush=True)
    return 1 if results.errors else 0
