"""Worker processes run against one manager while Redis is watched for the cap."""

from __future__ import annotations

import time
from typing import Any

import multiprocess
import redis

from support.redis_view import manager_clients
from support.waiting import wait_for


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


def fleet_holds_the_cap(manager: Any, admin: redis.Redis, target: Any, workers: int = 4, cap: int = 2) -> None:
    """``workers`` forked processes run ``target(socket_path, index, out)``: none may report a failure,
    the manager's connections stay within ``cap``, and every lease is back at the end."""
    context = multiprocess.get_context("fork")
    out = context.Queue()
    processes = [context.Process(target=target, args=(manager.socket_path, index, out)) for index in range(workers)]
    failures, peak = run_watching_the_cap(processes, out, admin, manager.pool_name, within=200)
    assert failures == []
    assert 1 <= peak <= cap
    assert wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="every lease back")
