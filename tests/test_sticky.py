"""Sticky leases: kept between uses, recalled on demand, never leaked."""

from __future__ import annotations

import os
import signal
import time

import multiprocess
import redis

import sharedpool
from sharedpool.admin import admin as admin_command

from conftest import manager_clients, wait_for

ctx = multiprocess.get_context("fork")


def test_steady_state_moves_no_frame(start_manager) -> None:
    manager = start_manager(max_connections=2, min_idle=1)
    r = sharedpool.Redis(socket_path=manager.socket_path, sticky=True, decode_responses=True)
    r.set("sticky", "1")
    wait_for(lambda: manager.stats()["workers_total"] == 1, what="the notify channel")
    granted = manager.stats()["counters"]["leases_granted"]
    for i in range(200):
        assert r.incr("sticky:n") == i + 1
        with r.pipeline() as pipe:
            pipe.get("sticky")
            assert pipe.execute() == ["1"]
    assert manager.stats()["counters"]["leases_granted"] == granted  # not one more grant
    r.close()
    wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="close() gives the parked lease back")


def _park_and_wait(socket_path: str, parked: multiprocess.Event, done: multiprocess.Event, result: multiprocess.Queue) -> None:
    r = sharedpool.Redis(socket_path=socket_path, sticky=True, decode_responses=True, acquire_timeout=10)
    r.set("park", "a")  # the lease is now parked in this process
    parked.set()
    done.wait(30)
    result.put(r.get("park"))  # works again after the recall took the lease away
    r.close()


def test_a_waiter_recalls_a_parked_lease(start_manager) -> None:
    manager = start_manager(max_connections=2, min_idle=1)
    parked, done, result = ctx.Event(), ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_park_and_wait, args=(manager.socket_path, parked, done, result))
    holder.start()
    assert parked.wait(30)
    wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="the parked lease")
    blocker = sharedpool.SharedConnectionPool(manager.socket_path)
    held = blocker.get_connection()  # the other connection: now the pool is full
    other = sharedpool.Redis(socket_path=manager.socket_path, acquire_timeout=5, decode_responses=True)
    started = time.monotonic()
    assert other.get("park") == "a"  # served through the recall, not a timeout
    assert time.monotonic() - started < 4
    assert manager.stats()["counters"]["sticky_recalls"] >= 1
    blocker.release(held)
    blocker.disconnect()
    done.set()
    assert result.get(timeout=30) == "a"
    holder.join(10)
    assert holder.exitcode == 0
    stats = manager.stats()
    assert stats["counters"]["reaped_holder_closed"] == 0 and stats["leases"]["held"] == 0
    other.close()


def _park_then(socket_path: str, parked: multiprocess.Event, leave: multiprocess.Event) -> None:
    r = sharedpool.Redis(socket_path=socket_path, sticky=True)
    r.ping()
    parked.set()
    leave.wait(60)  # then exit normally: atexit gives the parked lease back


def test_normal_exit_returns_parked_lease_clean_and_kill_reaps_it(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1)
    parked, leave = ctx.Event(), ctx.Event()
    leaver = ctx.Process(target=_park_then, args=(manager.socket_path, parked, leave))
    leaver.start()
    assert parked.wait(30)
    wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="the parked lease")
    leave.set()
    leaver.join(30)
    stats = wait_for(lambda: (s := manager.stats())["leases"]["held"] == 0 and s, what="parked lease back")
    assert stats["counters"]["connections_closed"] == 0  # given back clean: nothing replaced
    assert stats["counters"]["reaped_holder_closed"] == 0

    parked = ctx.Event()
    victim = ctx.Process(target=_park_then, args=(manager.socket_path, parked, ctx.Event()))
    victim.start()
    assert parked.wait(30)
    wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="the victim's parked lease")
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    wait_for(lambda: manager.stats()["counters"]["reaped_holder_closed"] == 1, what="parked lease reaped")
    assert len(manager_clients(admin, manager.pool_name)) <= 2
    r = sharedpool.Redis(socket_path=manager.socket_path)
    assert r.ping() is True
    r.close()


def test_no_sticky_lease_without_spare_connections(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    r = sharedpool.Redis(socket_path=manager.socket_path, sticky=True)
    for _ in range(5):
        r.ping()
    assert manager.stats()["leases"]["held"] == 0  # the only connection is never parked
    r.close()


def test_sticky_max_age_brings_an_idle_parked_lease_home(start_manager) -> None:
    manager = start_manager(max_connections=2, sticky_max_age=0.3, reap_interval=0.1)
    r = sharedpool.Redis(socket_path=manager.socket_path, sticky=True)
    r.ping()
    wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="recall after sticky_max_age")
    assert r.ping() is True  # and the next use simply takes a new lease
    r.close()


def test_sigterm_recalls_parked_leases_and_stops_promptly(start_manager) -> None:
    manager = start_manager(max_connections=2, shutdown_grace=30)
    r = sharedpool.Redis(socket_path=manager.socket_path, sticky=True)
    r.ping()
    wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="the parked lease")
    started = time.monotonic()
    manager.signal(signal.SIGTERM)
    assert manager.process.wait(15) == 0
    assert time.monotonic() - started < 10  # not the 30 s grace
    r.close()


def test_manager_without_sticky_keeps_clients_per_command(start_manager) -> None:
    manager = start_manager(max_connections=2, sticky="false")
    r = sharedpool.Redis(socket_path=manager.socket_path, sticky=True)
    for _ in range(10):
        r.ping()
    assert manager.stats()["counters"]["leases_granted"] == 10
    assert manager.stats()["leases"]["held"] == 0
    r.close()


def test_reconnect_recalls_parked_leases(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1)
    r = sharedpool.Redis(socket_path=manager.socket_path, sticky=True)
    first = r.client_id()
    admin_command("reconnect", manager.socket_path)
    wait_for(lambda: manager.stats()["counters"]["sticky_recalls"] == 1, what="recall")
    wait_for(lambda: r.client_id() != first, what="a new connection after reconnect")
    r.close()
