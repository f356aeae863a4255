"""Rounds of a scenario: every system once a round, in reversed order every other round."""

from __future__ import annotations

import sys
from collections.abc import Callable

from sharedpool.bench.report import Results
from sharedpool.bench.rig import Rig, Skipped

Measure = tuple[str, Callable[[int], str]]  # label, run for a round -> progress text


def run_rounds(rig: Rig, results: Results, scenario: str, systems: list[Measure]) -> None:
    """Each round runs every system once, in reversed order every other round."""
    rounds = rig.settings.rounds
    for round_no in range(1, rounds + 1):
        order = systems if round_no % 2 else systems[::-1]
        for label, measure in order:
            try:
                text = measure(round_no)
            except (Skipped, KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                results.errors.append(f"{scenario} round {round_no} {label}: {first}")
                say(f"{scenario} round {round_no}/{rounds} {label}: ERROR {exc}")
                continue
            say(f"{scenario} round {round_no}/{rounds} {label}: {text}")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
