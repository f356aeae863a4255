"""Real worker processes against one manager: the cap, kills, forks."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import multiprocess
import redis
from support.mix import checked_round_trip
from support.redis_view import manager_clients
from support.waiting import wait_for
from support.workers import run_watching_the_cap

import sharedpool

ctx = multiprocess.get_context("fork")


def _hammer(socket_path: str, worker: int, rounds: int, errors: multiprocess.Queue) -> None:
    r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=30)
    failures: list[str] = []

    def thread_body(thread: int) -> None:
        prefix = f"hammer:{worker}:{thread}:{uuid.uuid4().hex}"
        for i in range(rounds):
            failure = checked_round_trip(r, f"{prefix}:{i}", f"{worker}-{thread}-{i}", i)
            if failure:
                failures.append(failure)

    threads = [threading.Thread(target=thread_body, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors.put(failures)


def test_cap_holds_under_8_processes_x_4_threads(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1, acquire_timeout=30)
    errors = ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(manager.socket_path, w, 60, errors)) for w in range(8)]
    failures, peak = run_watching_the_cap(workers, errors, admin, manager.pool_name, within=240)
    assert failures == []
    assert 1 <= peak <= 2
    stats = wait_for(lambda: (s := manager.stats())["leases"]["held"] == 0 and s, what="every lease back")
    assert stats["counters"]["leases_granted"] >= 8 * 4 * 60
    assert stats["connections"]["open"] <= 2


def _hold_mid_command(socket_path: str, ready: multiprocess.Event) -> None:
    pool = sharedpool.SharedConnectionPool(socket_path)
    conn = pool.get_connection()
    # A reply that will sit unread on the shared connection when we die.
    conn.send_command("ECHO", "poison: reply meant for the killed holder")
    ready.set()
    time.sleep(60)


def test_holder_killed_mid_lease_is_replaced_and_nobody_reads_its_reply(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_mid_command, args=(manager.socket_path, ready))
    holder.start()
    assert ready.wait(30)
    (victim,) = manager_clients(admin, manager.pool_name)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=10)
    for i in range(50):
        assert r.echo(f"mine {i}") == f"mine {i}"
    stats = manager.stats()
    assert stats["counters"]["reaped_holder_closed"] == 1
    live = {c["id"] for c in manager_clients(admin, manager.pool_name)}
    assert victim["id"] not in live and len(live) == 1
    r.close()


def _child_uses_its_own_channel(r: redis.Redis, result: multiprocess.Queue) -> None:
    try:
        pool = r.connection_pool
        r.set("forked", "child")
        result.put((r.get("forked"), os.getpid(), [pool._attachment.channel.pid]))
    except Exception as exc:  # report rather than die silently
        result.put(repr(exc))


def test_fork_while_holding_a_client(start_manager) -> None:
    manager = start_manager(max_connections=2, min_idle=1)
    r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
    r.set("parent", "1")
    with r.lease() as pinned:  # the parent even holds a lease across the fork
        result = ctx.Queue()
        child = ctx.Process(target=_child_uses_its_own_channel, args=(r, result))
        child.start()
        got = result.get(timeout=30)
        child.join(10)
        assert child.exitcode == 0
        value, child_pid, channel_pids = got
        assert value == "child" and channel_pids == [child_pid]
        assert pinned.get("parent") == "1"  # the parent's lease survived the child
    assert r.get("forked") == "child"
    stats = manager.stats()
    assert stats["leases"]["held"] == 0
    assert stats["counters"]["reaped_holder_closed"] == 0  # the child's exit took nothing of the parent's
    r.close()


def test_threads_do_not_deadlock_when_the_pool_is_exhausted(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    r = sharedpool.Redis(socket_path=manager.socket_path, acquire_timeout=30)
    release = threading.Event()
    done: list[int] = []

    def holder() -> None:
        with r.lease() as pinned:
            pinned.ping()
            release.wait(30)

    def waiter(i: int) -> None:
        r.ping()
        done.append(i)

    first = threading.Thread(target=holder)
    first.start()
    wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="the first thread's lease")
    others = [threading.Thread(target=waiter, args=(i,)) for i in range(3)]
    for thread in others:
        thread.start()
    wait_for(lambda: manager.stats()["leases"]["waiting"] == 3, what="three waiting threads")
    release.set()
    for thread in [first, *others]:
        thread.join(30)
    assert sorted(done) == [0, 1, 2]
    r.close()
