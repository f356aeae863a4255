"""Flags of ``sharedpool bench`` and the settings they make; ``--quick`` is the CI smoke size."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

SCENARIOS = ("s1", "s2", "s2x", "s3", "s4", "s5", "e2e", "async", "tls", "cluster")
# Sized for a 2-core machine: about 6 minutes in all. Scale up with the flags.
FULL = {"workers": 8, "commands": 5, "cpu_us": 100.0, "io_ms": 5.0, "max_connections": 2,
        "restart_every": 50, "rounds": 5, "duration": 3.0, "time_limit": 0.0,
        "http_workers": 4, "wrk_connections": 16}
QUICK = dict(FULL, rounds=2, duration=0.5, restart_every=10, time_limit=50.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def number(flag: str, kind: type, metavar: str, text: str) -> None:
        name = flag[2:].replace("-", "_")
        parser.add_argument(flag, type=kind, default=None, metavar=metavar,
                            help=f"{text} (default {FULL[name]:g}; --quick {QUICK[name]:g})")

    parser.add_argument("--quick", action="store_true",
                        help="reduced run for CI smoke tests, under a minute; a missed target is reported, never an error")
    number("--workers", int, "W", "worker processes in S2, S2', S3, S5(b)")
    number("--commands", int, "K", "Redis commands per request")
    number("--cpu-us", float, "US", "CPU busy loop per request, microseconds")
    number("--io-ms", float, "MS", "wait on other I/O per request (a sleep), milliseconds")
    number("--max-connections", int, "C", "Redis connections of sharedpool and twemproxy in S2, S3, S5")
    number("--restart-every", int, "R", "S3: requests before a worker is replaced (like gunicorn's max_requests)")
    number("--rounds", int, "N", "rounds of alternating runs; the table shows medians")
    number("--duration", float, "SECONDS", "length of each measurement window (E2E: rounded to whole seconds, for wrk)")
    number("--time-limit", float, "SECONDS", "skip the remaining runs after this long (0: no limit)")
    number("--http-workers", int, "N", "E2E: gunicorn sync workers")
    number("--wrk-connections", int, "N", "E2E: wrk's open HTTP connections (-c)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), metavar="LIST",
                        help="comma-separated subset of " + ", ".join(SCENARIOS) + " (s2x is S2')")
    parser.add_argument("--redis-url", metavar="URL", help="use this Redis instead of starting one")
    parser.add_argument("--socket-path", metavar="PATH",
                        help="use the manager already serving this control socket (S2' and E2E then run at its C only)")
    parser.add_argument("--no-twemproxy", action="store_true", help="skip S4 even when nutcracker is on PATH")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--json-file", metavar="PATH", help="also write the results as JSON to PATH")


@dataclass(frozen=True)
class BenchSettings:
    """One ``sharedpool bench`` run's sizes and choices, from its flags (``--quick`` picks the smaller defaults)."""

    workers: int
    commands: int
    cpu_us: float
    io_ms: float
    max_connections: int
    restart_every: int
    rounds: int
    duration: float
    time_limit: float
    http_workers: int
    wrk_connections: int
    quick: bool
    scenarios: tuple[str, ...]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        base = QUICK if args.quick else FULL
        values: dict[str, Any] = {name: getattr(args, name, None) if getattr(args, name, None) is not None else default
                                  for name, default in base.items()}
        names = [n.strip().lower().replace("'", "x") for n in str(args.scenarios).split(",") if n.strip()]
        unknown = sorted(set(names) - set(SCENARIOS))
        if unknown:
            raise ValueError(f"--scenarios: unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
        settings = cls(quick=bool(args.quick), scenarios=tuple(n for n in SCENARIOS if n in names), **values)
        for name in ("workers", "commands", "max_connections", "restart_every", "rounds", "http_workers", "wrk_connections"):
            if getattr(settings, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be 1 or more, not {getattr(settings, name)}")
        if settings.duration <= 0 or settings.cpu_us < 0 or settings.io_ms < 0:
            raise ValueError("--duration must be > 0, --cpu-us and --io-ms >= 0")
        return settings

    @property
    def wrk_seconds(self) -> int:
        """E2E's window: wrk takes whole seconds only."""
        return max(1, round(self.duration))

    def public(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
