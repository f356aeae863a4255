"""Redis outages and manager restarts, survived without restarting anyone."""

from __future__ import annotations

import os
import time
import uuid

import multiprocess
import pytest
import redis
from support.waiting import wait_for

import sharedpool
from sharedpool.dev.redis_server import RedisServer

ctx = multiprocess.get_context("fork")


def _load(socket_path: str, stop: multiprocess.Event, report: multiprocess.Queue) -> None:
    """SET/GET own keys until told to stop; report every outcome with a timestamp."""
    r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, manager_timeout=0.5, acquire_timeout=2)
    outcomes = []
    parent = os.getppid()
    while not stop.is_set() and os.getppid() == parent:  # never outlive a killed test run
        k = f"load:{uuid.uuid4().hex}"
        try:
            r.set(k, k)
            got = r.get(k)
            outcomes.append((time.monotonic(), "ok" if got == k else f"WRONG {got!r}"))
        except redis.RedisError as exc:
            outcomes.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
            time.sleep(0.01)
    report.put(outcomes)


def _run_load(socket_path: str, workers: int = 2) -> tuple[multiprocess.Event, multiprocess.Queue, list]:
    stop, report = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=_load, args=(socket_path, stop, report)) for _ in range(workers)]
    for process in processes:
        process.start()
    return stop, report, processes


def _collect(stop: multiprocess.Event, report: multiprocess.Queue, processes: list) -> list:
    stop.set()
    outcomes = [item for _ in processes for item in report.get(timeout=60)]
    for process in processes:
        process.join(10)
    return sorted(outcomes)


@pytest.mark.slow
def test_redis_killed_and_restarted_under_load(start_manager, tmp_path) -> None:
    own_redis = RedisServer(directory=str(tmp_path / "redis")).start()
    try:
        manager = start_manager(
            redis_url=own_redis.url, max_connections=2, min_idle=1, health_check_interval=0.2, reap_interval=0.2
        )
        stop, report, processes = _run_load(manager.socket_path)
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > 100, what="load before the outage")
        own_redis.kill()
        killed_at = time.monotonic()
        wait_for(lambda: manager.stats()["redis_down_for_s"] is not None, what="manager noticing the outage")
        wait_for(lambda: manager.stats()["counters"]["refused_redis_unavailable"] > 20, what="fast refusals during the outage")
        wait_for(lambda: (manager.stats()["redis_down_for_s"] or 0) > 1.0, what="an outage of over a second")
        own_redis.start()
        restarted_at = time.monotonic()
        granted = manager.stats()["counters"]["leases_granted"]
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > granted + 100, timeout=30, what="recovery")
        recovered_at = time.monotonic()
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > granted + 400, timeout=30,
                 what="steady load after recovery")
        outcomes = _collect(stop, report, processes)
        assert manager.process.poll() is None  # never restarted
        assert not [o for o in outcomes if o[1].startswith("WRONG")]
        errors = [text for at, text in outcomes if text != "ok"]
        assert errors, "the outage went unnoticed"
        assert all(
            text.startswith(("RedisUnavailable: Redis at", "ConnectionError:", "TimeoutError:")) for text in errors
        ), errors[:5]
        assert any("unreachable for" in text for text in errors)
        during = [at for at, text in outcomes if killed_at < at < restarted_at and text != "ok"]
        assert during, "no clear error while Redis was down"
        after = [text for at, text in outcomes if at > recovered_at]
        assert after and all(text == "ok" for text in after)
    finally:
        own_redis.cleanup()


@pytest.mark.slow
def test_manager_killed_and_restarted_workers_recover(start_manager) -> None:
    first = start_manager(max_connections=2, min_idle=1)
    stop, report, processes = _run_load(first.socket_path)
    wait_for(lambda: first.stats()["counters"]["leases_granted"] > 100, what="load before the kill")
    first.kill()
    killed_at = time.monotonic()
    second = start_manager(socket_path=first.socket_path, max_connections=2, min_idle=1)
    wait_for(lambda: second.stats()["counters"]["leases_granted"] > 100, timeout=30, what="workers back on the new manager")
    recovered_at = time.monotonic()
    wait_for(lambda: second.stats()["counters"]["leases_granted"] > 400, timeout=30, what="steady load after recovery")
    outcomes = _collect(stop, report, processes)
    assert all(process.exitcode == 0 for process in processes)  # the workers were never restarted
    assert not [o for o in outcomes if o[1].startswith("WRONG")]
    errors = [text for at, text in outcomes if text != "ok"]
    assert all(text.startswith(("ManagerUnavailable:", "ConnectionError:")) for text in errors), errors[:5]
    after = [text for at, text in outcomes if at > recovered_at]
    assert after and all(text == "ok" for text in after)
    # Errors are allowed only around the gap: the client waits out short ones.
    assert all(killed_at - 1 < at for at, text in outcomes if text != "ok")


def test_first_command_after_a_manager_restart_succeeds(start_manager) -> None:
    first = start_manager(max_connections=2)
    r = sharedpool.Redis(socket_path=first.socket_path)
    assert r.ping() is True
    first.kill()
    second = start_manager(socket_path=first.socket_path, max_connections=2)
    assert r.ping() is True  # the dead channel is replaced, not reported
    assert second.stats()["counters"]["leases_granted"] == 1
    r.close()
