"""Autopipelining, on by default: many tasks' commands in shared batches, every reply its asker's."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from typing import Any

import multiprocess
import pytest
import redis
import redis.asyncio
from redis.exceptions import ResponseError
from support.async_mix import report_from_async_worker
from support.proxy import HoldingProxy
from support.redis_view import manager_clients
from support.waiting import wait_for
from support.workers import fleet_holds_the_cap

import sharedpool.asyncio as spa
from sharedpool import errors
from sharedpool.asyncio.autopipeline import AutoPipeline

ctx = multiprocess.get_context("fork")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 180))


def both_idle_connections_open(manager: Any) -> int:
    """Wait until the manager has opened its two ``min_idle`` connections; counting earlier would catch it between them."""
    return int(wait_for(lambda: manager.stats()["counters"]["connections_opened"] >= 2 and 2, what="the two idle connections"))


def batcher_of(r: spa.SharedRedis) -> AutoPipeline:
    assert r.autopipeline is not None
    return r.autopipeline


async def checked_mix(r: Any, tasks: int, rounds: int, tag: str) -> list[str]:
    """Tasks of unique keys and values, batched and unbatched commands mixed; every reply and error checked."""

    async def body(task: int) -> list[str]:
        prefix = f"ap:{tag}:{task}:{uuid.uuid4().hex}"
        wrong: list[str] = []

        def check(what: str, got: Any, want: Any) -> None:
            if got != want:
                wrong.append(f"{prefix} {what}: want {want!r}, got {got!r}")

        for i in range(rounds):
            value = f"{tag}-{task}-{i}-{uuid.uuid4().hex}"
            try:
                check("set", await r.set(f"{prefix}:s", value), True)
                check("get", await r.get(f"{prefix}:s"), value)
                check("incr", await r.incr(f"{prefix}:n"), i + 1)
                check("hset", await r.hset(f"{prefix}:h", str(i), value), 1)
                check("hget", await r.hget(f"{prefix}:h", str(i)), value)
                check("mget", await r.mget([f"{prefix}:s", f"{prefix}:none"]), [value, None])
                # WRONGTYPE: a string key as a list. Its error is this task's alone.
                with pytest.raises(ResponseError, match="WRONGTYPE"):
                    await r.lpush(f"{prefix}:s", "x")
                turn = (task + i) % 4
                if turn == 0:
                    check("echo", await r.echo(value), value)  # off the allowlist: a lease of its own
                elif turn == 1:
                    async with r.pipeline() as pipe:
                        check("pipeline", await pipe.get(f"{prefix}:s").incr(f"{prefix}:p").execute(), [value, 1 + i // 4])
                elif turn == 2:
                    async with r.lease() as pinned:
                        check("pinned", await pinned.get(f"{prefix}:s"), value)
                else:
                    script = "return redis.call('GET', KEYS[1])"
                    check("eval", await r.eval(script, 1, f"{prefix}:s"), value)
            except Exception as exc:
                wrong.append(f"{prefix}: {type(exc).__name__}: {exc}")
        return wrong

    results = await asyncio.gather(*(body(t) for t in range(tasks)))
    return [w for ws in results for w in ws]


def test_many_tasks_share_batches_every_reply_their_own(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1, acquire_timeout=30)

    async def main() -> tuple[list[str], AutoPipeline, dict[str, Any]]:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        try:
            wrong = await checked_mix(r, tasks=150, rounds=12, tag="mix")
            return wrong, batcher_of(r), await r.connection_pool.stats()
        finally:
            await r.aclose()

    wrong, batcher, stats = run(main())
    assert wrong == []
    # 7 batched commands x 150 tasks x 12 rounds, in far fewer batches than commands.
    assert batcher.commands == 7 * 150 * 12
    assert batcher.batches < batcher.commands / 4, batcher
    assert stats["leases"]["held"] == 0
    assert len(manager_clients(admin, manager.pool_name)) <= 2


def test_an_error_reply_goes_to_its_own_task_only(manager) -> None:
    async def main() -> None:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        try:
            keys = [f"ap:err:{uuid.uuid4().hex}" for _ in range(60)]
            await asyncio.gather(*(r.set(k, k) for k in keys))
            before = batcher_of(r).batches
            # Issued in one turn of the loop: one batch, the bad command in the middle.
            replies = await asyncio.gather(
                *(r.get(k) for k in keys[:30]), r.lpush(keys[0], "x"), *(r.get(k) for k in keys[30:]),
                return_exceptions=True,
            )
            assert batcher_of(r).batches == before + 1
            assert isinstance(replies[30], ResponseError) and "WRONGTYPE" in str(replies[30])
            assert replies[:30] + replies[31:] == keys
            # The connection is in step after the error: the next batch's replies are right too.
            assert await asyncio.gather(*(r.get(k) for k in keys)) == keys
        finally:
            await r.aclose()

    run(main())
    assert manager.stats()["leases"]["held"] == 0


def test_cancelled_before_sending_is_never_sent_and_the_bound_holds(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)

    async def main() -> None:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=0.5)
        try:
            k = f"ap:never:{uuid.uuid4().hex}"
            async with r.lease() as pinned:  # the only connection: the batch waits for it, open
                task = asyncio.ensure_future(r.set(k, "must-not-be-written"))
                deadline = time.monotonic() + 10
                while batcher_of(r)._open is None or not batcher_of(r)._open:
                    assert time.monotonic() < deadline, "the command never joined a batch"
                    await asyncio.sleep(0.001)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # The batch waits past acquire_timeout: its other commands get PoolTimeout within the bound.
                started = time.monotonic()
                with pytest.raises(errors.PoolTimeout, match="1 of 1 connections leased"):
                    await r.get(k)
                assert time.monotonic() - started < 3.0
                await pinned.ping()
            assert await r.get(k) is None
            assert await r.set(k, "later") is True and await r.get(k) == "later"
        finally:
            await r.aclose()

    run(main())
    assert manager.stats()["leases"]["held"] == 0


def test_cancellation_storm_then_every_reply_right(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=2, acquire_timeout=30)
    opened_before = both_idle_connections_open(manager)

    async def main() -> tuple[list[str], int, list[str], dict[str, Any]]:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        rng = random.Random(7)
        wrong: list[str] = []
        cancelled = 0

        async def body(task: int) -> None:
            nonlocal cancelled
            for i in range(30):
                k = f"ap:storm:{task}:{i}:{uuid.uuid4().hex}"
                # Some values large, so that a batch's replies span many reads.
                value = f"{task}:{i}:" + "x" * rng.choice((0, 100, 20_000, 200_000))
                try:
                    await asyncio.wait_for(r.set(k, value), rng.uniform(0, 0.004))
                    got = await asyncio.wait_for(r.get(k), rng.uniform(0, 0.004))
                    if got != value:
                        wrong.append(f"{k}: got {str(got)[:40]!r}")
                except asyncio.TimeoutError:
                    cancelled += 1

        try:
            await asyncio.gather(*(body(t) for t in range(60)))
            after = await checked_mix(r, tasks=50, rounds=4, tag="after-storm")
            return wrong, cancelled, after, await r.connection_pool.stats()
        finally:
            await r.aclose()

    wrong, cancelled, after, stats = run(main())
    assert wrong == [] and after == []
    assert cancelled > 100
    assert stats["leases"]["held"] == 0
    # A batch reads every reply whoever stopped waiting: its leases came back clean, nothing replaced.
    assert manager.stats()["counters"]["connections_opened"] == opened_before
    assert len(manager_clients(admin, manager.pool_name)) <= 2


def test_connection_killed_under_batches(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=2, acquire_timeout=30)
    opened_before = both_idle_connections_open(manager)
    stop = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        rng = random.Random(3)
        while not stop.is_set():
            for client in manager_clients(admin, manager.pool_name):
                if client.get("cmd") not in ("hello", "reset", "client|setname") and rng.random() < 0.5:
                    kills += admin.client_kill_filter(_id=client["id"])
            stop.wait(0.005)

    async def main() -> tuple[list[str], int, int]:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        wrong: list[str] = []
        right = failed = 0

        async def body(task: int) -> None:
            nonlocal right, failed
            for i in range(40):
                k = f"ap:kill:{task}:{i}:{uuid.uuid4().hex}"
                value = f"{task}:{i}:" + "y" * (50_000 if i % 3 == 0 else 10)
                try:
                    if await r.set(k, value) is not True:
                        wrong.append(f"{k}: SET did not say OK")
                    got = await r.get(k)
                except (redis.ConnectionError, redis.TimeoutError, errors.LeaseLost):
                    failed += 1
                    continue
                if got != value:
                    wrong.append(f"{k}: got {str(got)[:40]!r}")
                else:
                    right += 1

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            # Rounds until kills did land under batches (connections replaced).
            while manager.stats()["counters"]["connections_opened"] < opened_before + 3:
                assert time.monotonic() < deadline, "no kill landed"
                await asyncio.gather(*(body(t) for t in range(40)))
        finally:
            stop.set()
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        try:
            after = await checked_mix(r, tasks=30, rounds=3, tag="after-kills")
            return wrong + after, right, failed
        finally:
            await r.aclose()

    wrong, right, failed = run(main())
    assert wrong == []
    assert right > 0 and kills > 0
    assert wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="every lease back")


def _worker(socket_path: str, worker: int, out: Any) -> None:
    report_from_async_worker(
        out, socket_path, lambda r: checked_mix(r, tasks=64, rounds=5, tag=f"w{worker}")
    )


def test_worker_processes_x_64_tasks_batched_cap_holds(start_manager, admin: redis.Redis) -> None:
    fleet_holds_the_cap(start_manager(max_connections=2, min_idle=1, acquire_timeout=60), admin, _worker)


def test_batches_are_capped(manager) -> None:
    async def main() -> None:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        r.autopipeline = AutoPipeline(max_batch=10)
        try:
            keys = [f"ap:cap:{uuid.uuid4().hex}" for _ in range(95)]
            assert await asyncio.gather(*(r.set(k, k) for k in keys)) == [True] * 95
            assert batcher_of(r).batches == 10  # 9 full, 1 of 5
            assert await asyncio.gather(*(r.get(k) for k in keys)) == keys
        finally:
            await r.aclose()

    run(main())
    with pytest.raises(ValueError, match="max_batch=0"):
        AutoPipeline(max_batch=0)


def test_pinned_and_single_connection_clients_do_not_batch(manager) -> None:
    async def main() -> None:
        single = spa.Redis(socket_path=manager.socket_path, decode_responses=True,
                           single_connection_client=True)
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        try:
            k = f"ap:single:{uuid.uuid4().hex}"
            assert await single.set(k, "1") is True and await single.get(k) == "1"
            assert batcher_of(single).commands == 0  # its one connection, in order: nothing to batch
            async with r.lease() as pinned:
                assert await pinned.incr(k) == 2
            assert batcher_of(r).commands == 0
            assert await r.incr(k) == 3 and batcher_of(r).commands == 1
        finally:
            await single.aclose()
            await r.aclose()

    run(main())
    assert wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="every lease back")


def test_a_cancelled_write_is_never_resent_over_a_newer_one(start_manager, redis_server, admin: redis.Redis) -> None:
    """Issue 25, finding 1: SET k v1 sent, its task cancelled; SET k v2 answered; v1's connection lost: k stays v2.

    The relay holds v1 away from Redis until the cut, so the order is exact
    in every round: v1 is never answered, v2 is, then v1's batch loses its
    connection and retries what is still awaited, which v1 is not.
    """
    proxy = HoldingProxy(redis_server.port)
    manager = start_manager(redis_url=proxy.url, max_connections=2, min_idle=2, acquire_timeout=30)

    def two_open() -> bool:
        return bool(manager.stats()["connections"]["idle"] == 2)

    async def main() -> list[str]:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        wrong: list[str] = []
        try:
            for round_ in range(20):
                await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(two_open, what="two idle connections"))
                k = f"ap:replay:{round_}:{uuid.uuid4().hex}"
                proxy.hold_all()
                first = asyncio.ensure_future(r.set(k, "v1"))
                deadline = time.monotonic() + 10
                while (link := proxy.holding(k.encode())) is None:
                    assert time.monotonic() < deadline, "SET k v1 never reached the relay"
                    await asyncio.sleep(0.001)
                first.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first
                proxy.release_all(but=link)
                assert await r.set(k, "v2") is True  # the other connection: v1's batch still holds its own
                link.cut()
                deadline = time.monotonic() + 10
                while batcher_of(r)._running:
                    assert time.monotonic() < deadline, "v1's batch never ended"
                    await asyncio.sleep(0.001)
                got = admin.get(k)
                if got != "v2":
                    wrong.append(f"round {round_}: {k} = {got!r}")
            return wrong
        finally:
            await r.aclose()

    try:
        assert run(main()) == []
    finally:
        proxy.close()


@pytest.mark.parametrize("retry", ["default", "none"])
def test_a_revoked_batch_fails_its_commands_with_lease_lost_at_once(start_manager, redis_server, admin: redis.Redis,
                                                                   retry: str) -> None:
    """Issue 25, finding 2, for batches: a batch whose lease is revoked mid-flight raises LeaseLost in every
    task at once, with no retry, and sends nothing again."""
    proxy = HoldingProxy(redis_server.port)
    manager = start_manager(redis_url=proxy.url, max_connections=2, min_idle=2, max_lease_time=0.5, reap_interval=0.05)

    async def main() -> None:
        options: dict[str, Any] = {} if retry == "default" else {"retry": None}
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True, **options)
        try:
            await r.ping()
            k = f"ap:revoked:{uuid.uuid4().hex}"
            proxy.hold_all()  # the batch's INCRs never reach Redis: it waits past max_lease_time, and is revoked
            results = await asyncio.gather(*(r.incr(k) for _ in range(5)), return_exceptions=True)
            failed_at = time.monotonic()
            # The relay's thread sees the manager's shutdown a little after
            # the holder does (this process's loop holds the GIL meanwhile).
            deadline = time.monotonic() + 10
            while not (cut := [lk for lk in proxy.links if lk.cut_done]):
                assert time.monotonic() < deadline, "the revocation never cut the relayed connection"
                await asyncio.sleep(0.001)
            assert len(cut) == 1 and proxy.holding(b"INCR") is None  # held INCRs and all: none reached Redis
            assert all(isinstance(e, errors.LeaseLost) for e in results), results
            assert "max_lease_time" in str(results[0])
            assert failed_at - cut[0].cut_at < 0.1
            proxy.release_all()
            # Nothing went out again on another lease.
            assert admin.get(k) is None
            assert await r.incr(k) == 1
        finally:
            await r.aclose()

    try:
        run(main())
    finally:
        proxy.close()
