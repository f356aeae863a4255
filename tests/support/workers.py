"""Worker processes run against one manager while Redis is watched for the cap."""

from __future__ import annotations

import time
from typing import Any

import redis

from support.redis_view import manager_clients


def run_watching_the_cap(
    workers: list[Any], out: Any, admin: redis.Redis, pool_name: str, within: float
) -> tuple[list[str], int]:
    """Start ``workers``, each of which puts one list of failures on ``out``; while they run,
    count the manager's connections in Redis. Each must exit 0 within ``within`` s.
    Returns every failure and the peak count of connections."""
    for worker in workers:
        worker.start()
    reports: list[list[str]] = []
    peak = 0
    deadline = time.monotonic() + within
    while len(reports) < len(workers):
        peak = max(peak, len(manager_clients(admin, pool_name)))
        try:
            reports.append(out.get(timeout=0.05))
        except Exception:
            assert time.monotonic() < deadline, f"workers did not finish within {within:g} s"
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    return [failure for report in reports for failure in report], peak
