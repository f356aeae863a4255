"""Nothing leaks: dead holders, revoked leases, pool hygiene."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import multiprocess
import pytest
import redis
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool
from sharedpool.admin import admin as admin_command
from sharedpool.admin import report_dead_worker

ctx = multiprocess.get_context("fork")


def _storm_worker(socket_path: str, worker: int, bad: multiprocess.Queue) -> None:
    """Take leases, hold them a while, check every value; die whenever killed."""
    r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=30)
    rng = random.Random(worker)
    for i in range(1_000_000):
        k, value = f"storm:{worker}:{uuid.uuid4().hex}", f"{worker}:{i}"
        try:
            with r.lease() as pinned:
                pinned.set(k, value)
                time.sleep(rng.random() * 0.02)  # hold the lease: a kill lands mid-lease
                got = pinned.get(k)
            if got != value:
                bad.put(f"{k}: wrote {value!r}, read {got!r}")
        except redis.RedisError as exc:
            bad.put(f"{k}: {type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_kill_storm_leaks_nothing_and_corrupts_nothing(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=4, min_idle=1, acquire_timeout=30, reap_interval=0.2)
    bad = ctx.Queue()
    workers = {n: ctx.Process(target=_storm_worker, args=(manager.socket_path, n, bad)) for n in range(8)}
    for process in workers.values():
        process.start()
    rng = random.Random(1)
    next_id = len(workers)
    kills = 0
    peak = 0
    end = time.monotonic() + 20
    while time.monotonic() < end:
        peak = max(peak, len(manager_clients(admin, manager.pool_name)))
        victim_slot = rng.choice(list(workers))
        os.kill(workers[victim_slot].pid, signal.SIGKILL)
        workers[victim_slot].join(10)
        kills += 1
        workers[victim_slot] = ctx.Process(target=_storm_worker, args=(manager.socket_path, next_id, bad))
        workers[victim_slot].start()
        next_id += 1
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > 0, what="leases flowing")
        time.sleep(0.15)  # pace of the killer, not a synchronisation
    for process in workers.values():
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
    errors = []
    while not bad.empty():
        errors.append(bad.get())
    assert errors == []
    stats = wait_for(
        lambda: (s := manager.stats())["leases"]["held"] == 0 and s, timeout=15, what="all leases reaped"
    )
    reaped = stats["counters"]["reaped_holder_closed"] + stats["counters"]["reaped_holder_dead"]
    assert reaped > kills / 4  # most kills land mid-lease
    assert peak <= 4 and len(manager_clients(admin, manager.pool_name)) <= 4
    # Every reaped connection was closed in Redis and replaced: the pool still
    # serves its full size.
    assert stats["counters"]["connections_closed"] >= reaped
    pool = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=10)
    held = [pool.get_connection() for _ in range(4)]
    ids = set()
    for conn in held:
        conn.send_command("CLIENT", "ID")
        ids.add(conn.read_response())
    assert len(ids) == 4
    for conn in held:
        pool.release(conn)
    pool.disconnect()


def _hold_then_die_leaving_socket_in_child(socket_path: str, child_pid) -> None:
    pool = sharedpool.SharedConnectionPool(socket_path)
    conn = pool.get_connection()
    # A long-lived child that inherits the lease's lock and the control
    # socket (and so keeps both alive), as one started with pass_fds (or by
    # C code that forks) does: they outlive us (DESIGN fact 12).
    inherited = [os.dup(conn.lease.lock_fd), os.dup(pool._attachment.channel.sock.fileno())]
    sleeper = subprocess.Popen(["sleep", "120"], pass_fds=inherited)
    child_pid.send(sleeper.pid)  # a Pipe: synchronous, unlike a Queue's feeder thread
    os._exit(0)


@contextmanager
def _dead_holder_with_living_socket(socket_path: str) -> Iterator[int]:
    """A holder that died with a lease, its control socket kept open by a child; yields its pid."""
    receiver, sender = ctx.Pipe(duplex=False)
    holder = ctx.Process(target=_hold_then_die_leaving_socket_in_child, args=(socket_path, sender))
    holder.start()
    assert receiver.poll(30)
    grandchild = receiver.recv()
    holder.join(10)
    try:
        yield holder.pid
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_sweep_reaps_a_dead_holder_whose_socket_lives_in_a_child(start_manager) -> None:
    manager = start_manager(max_connections=2, reap_interval=0.5)
    with _dead_holder_with_living_socket(manager.socket_path):
        started = time.monotonic()
        wait_for(lambda: manager.stats()["counters"]["reaped_holder_dead"] == 1, timeout=10, what="psutil sweep reaping")
        assert time.monotonic() - started < 0.5 + 3.0
        assert manager.stats()["leases"]["held"] == 0


def test_integration_report_reaps_at_once(start_manager) -> None:
    manager = start_manager(max_connections=2, reap_interval=60)
    with _dead_holder_with_living_socket(manager.socket_path) as dead_pid:
        assert report_dead_worker(dead_pid, manager.socket_path) == 1
        assert manager.stats()["counters"]["reaped_holder_dead"] == 1
        assert report_dead_worker(os.getpid(), manager.socket_path) == 0  # alive: left alone


def test_max_lease_time_revokes_and_names_the_limit(start_manager) -> None:
    manager = start_manager(max_connections=1, max_lease_time=0.5, reap_interval=0.1)
    r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
    with pytest.raises(sharedpool.LeaseLost, match=r"revoked after .* \(max_lease_time=0.5 s\)"):
        with r.lease() as pinned:
            pinned.set("revoke", "1")
            wait_for(lambda: manager.stats()["counters"]["reaped_revoked"] == 1, what="revocation")
            pinned.get("revoke")
    assert r.get("revoke") == "1"  # the pool recovered
    r.close()


def test_leak_threshold_warns_with_pid_age_and_place(start_manager, tmp_path) -> None:
    manager = start_manager(max_connections=1, leak_threshold=0.3, reap_interval=0.1)
    r = sharedpool.Redis(socket_path=manager.socket_path)
    with r.lease() as pinned:
        pinned.ping()
        wait_for(lambda: manager.stats()["counters"]["leak_warnings"] == 1, what="leak warning")
    log = Path(manager.log_path).read_text()
    assert f"possible leak: pid {os.getpid()} has held lease" in log
    assert "test_reaping.py" in log and "test_leak_threshold_warns_with_pid_age_and_place" in log
    r.close()


def test_max_lifetime_recycles_idle_connections(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=1, min_idle=1, max_lifetime=1, reap_interval=0.1)
    first = wait_for(lambda: manager_clients(admin, manager.pool_name), what="first connection")[0]["id"]
    wait_for(
        lambda: [c for c in manager_clients(admin, manager.pool_name) if c["id"] != first],
        timeout=10, what="replacement after max_lifetime",
    )
    assert manager.stats()["counters"]["connections_recycled"] >= 1


def test_lifetime_never_recycles_a_leased_connection(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1, max_lifetime=0.3, reap_interval=0.1)
    r = sharedpool.Redis(socket_path=manager.socket_path)
    with r.lease() as pinned:
        first = pinned.client_id()
        wait_for(lambda: manager.stats()["uptime_s"] > 1.0, what="lifetime to pass")
        assert pinned.client_id() == first  # still ours, still open
    assert r.client_id() != first  # recycled once released
    r.close()


def test_idle_timeout_shrinks_to_min_idle(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=3, min_idle=1, idle_timeout=0.5, reap_interval=0.1)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    held = [pool.get_connection() for _ in range(3)]
    assert len(manager_clients(admin, manager.pool_name)) == 3
    for conn in held:
        pool.release(conn)
    wait_for(lambda: len(manager_clients(admin, manager.pool_name)) == 1, timeout=10, what="shrink to min_idle")
    assert manager.stats()["counters"]["connections_idle_closed"] == 2
    pool.disconnect()


def test_health_check_replaces_a_connection_redis_closed(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=1, min_idle=1, health_check_interval=0.2)
    (victim,) = wait_for(lambda: manager_clients(admin, manager.pool_name), what="idle connection")
    admin.client_kill_filter(_id=victim["id"])
    wait_for(lambda: manager.stats()["counters"]["health_checks_failed"] == 1, what="health check")
    wait_for(
        lambda: [c for c in manager_clients(admin, manager.pool_name) if c["id"] != victim["id"]],
        what="replacement connection",
    )


def test_max_leases_per_worker(start_manager) -> None:
    manager = start_manager(max_connections=3, max_leases_per_worker=2)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    held = [pool.get_connection(), pool.get_connection()]
    with pytest.raises(sharedpool.SharedPoolError, match=r"already holds 2 leases .*max_leases_per_worker=2"):
        pool.get_connection()
    for conn in held:
        pool.release(conn)
    pool.disconnect()


def test_pause_makes_acquire_wait_and_resume_lets_it_through(start_manager) -> None:
    manager = start_manager(max_connections=1)
    admin_command("pause", manager.socket_path)
    pool = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=0.3)
    with pytest.raises(sharedpool.PoolTimeout):
        pool.get_connection()
    patient = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=30)
    granted: list[object] = []
    waiter = threading.Thread(target=lambda: granted.append(patient.get_connection()))
    waiter.start()
    wait_for(lambda: manager.stats()["leases"]["waiting"] == 1, what="a waiter queued while paused")
    assert not granted
    admin_command("resume", manager.socket_path)
    waiter.join(30)
    assert len(granted) == 1  # the waiter itself got through, without asking again
    patient.release(granted[0])
    pool.disconnect()
    patient.disconnect()


def test_reconnect_replaces_every_connection(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=2)
    both = wait_for(lambda: len(clients := manager_clients(admin, manager.pool_name)) == 2 and clients, what="two connections")
    before = {c["id"] for c in both}
    admin_command("reconnect", manager.socket_path)
    wait_for(
        lambda: len(after := {c["id"] for c in manager_clients(admin, manager.pool_name)}) == 2 and not after & before,
        what="two new connections",
    )
