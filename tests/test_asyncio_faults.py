"""sharedpool.asyncio under faults: cancellation storms, SIGKILLed workers, forks, a second event loop."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import uuid
from typing import Any

import multiprocess
import redis
import redis.asyncio
from support.async_mix import many_tasks
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool.asyncio as spa

ctx = multiprocess.get_context("fork")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 180))


async def _storm(r: Any, tasks: int, rounds: int, seed: int) -> tuple[list[str], int]:
    """Tasks echo unique payloads (some large, so replies span reads) and many are cancelled mid-command."""
    rng = random.Random(seed)
    wrong: list[str] = []
    cancelled = 0

    async def echo(value: str) -> None:
        got = await r.echo(value)
        if got != value:
            wrong.append(f"sent {value[:40]!r}..., got {str(got)[:40]!r}...")

    async def body(task: int) -> None:
        nonlocal cancelled
        for i in range(rounds):
            value = f"{task}:{i}:{uuid.uuid4().hex}:" + "x" * rng.choice((0, 10, 5_000, 200_000))
            way = rng.random()
            try:
                if way < 0.3:
                    await asyncio.wait_for(echo(value), rng.uniform(0, 0.003))
                elif way < 0.6:
                    # The lease is taken first: the cancellation lands in the command.
                    async with r.lease() as pinned:
                        got = await asyncio.wait_for(pinned.echo(value), rng.uniform(0, 0.002))
                        if got != value:
                            wrong.append(f"pinned: sent {value[:40]!r}..., got {str(got)[:40]!r}...")
                else:
                    await echo(value)
            except asyncio.TimeoutError:
                cancelled += 1

    await asyncio.gather(*(body(t) for t in range(tasks)))
    return wrong, cancelled


def test_cancellation_storm_no_reply_goes_astray(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1, acquire_timeout=30)

    async def main() -> tuple[list[str], int, list[str]]:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        try:
            wrong: list[str] = []
            cancelled = 0
            # Storms until one cut a command mid-way (its connection was
            # replaced): how often that happens depends on the machine's speed.
            for seed in range(10):
                more_wrong, more_cancelled = await _storm(r, tasks=40, rounds=25, seed=seed)
                wrong += more_wrong
                cancelled += more_cancelled
                if manager.stats()["counters"]["connections_opened"] > 2:
                    break
            # Then every reply of plain work must be the asker's own.
            after = await many_tasks(r, tasks=50, rounds=6, tag="after-storm")
            return wrong, cancelled, after
        finally:
            await r.aclose()

    wrong, cancelled, after = run(main())
    assert wrong == [] and after == []
    assert cancelled > 50  # the storm did cancel tasks, many mid-command
    stats = wait_for(lambda: (s := manager.stats())["leases"]["held"] == 0 and s, what="every lease back")
    assert stats["connections"]["open"] <= 2
    assert len(manager_clients(admin, manager.pool_name)) <= 2
    # Leases cut mid-command came back broken and their connections were replaced.
    assert stats["counters"]["connections_opened"] > 2


def test_task_cancel_while_waiting_for_a_lease_leaves_nothing(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1, acquire_timeout=30)

    async def main() -> str:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        try:
            async with r.lease() as pinned:
                await pinned.ping()
                waiters = [asyncio.ensure_future(r.echo(f"w{i}")) for i in range(20)]
                while (await r.connection_pool.stats())["leases"]["waiting"] == 0:
                    await asyncio.sleep(0.01)
                for waiter in waiters[::2]:
                    waiter.cancel()
            done = await asyncio.gather(*waiters, return_exceptions=True)
            assert [d for d in done[1::2]] == [f"w{i}" for i in range(1, 20, 2)]
            assert all(isinstance(d, asyncio.CancelledError) for d in done[::2]), done
            return str(await r.echo("after"))
        finally:
            await r.aclose()

    assert run(main()) == "after"
    stats = wait_for(lambda: (s := manager.stats())["leases"]["held"] == 0 and s, what="every lease back")
    assert stats["leases"]["waiting"] == 0


def _busy_worker(socket_path: str, started: Any) -> None:
    async def main() -> None:
        r = spa.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=60)
        rng = random.Random(os.getpid())

        async def body(task: int) -> None:
            while True:
                value = f"{os.getpid()}:{task}:{uuid.uuid4().hex}" + "y" * rng.choice((0, 100_000))
                assert await r.echo(value) == value
                started.value += 1

        await asyncio.gather(*(body(t) for t in range(32)))

    asyncio.run(main())


def test_workers_sigkilled_mid_command(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1, acquire_timeout=60)
    counters = [ctx.Value("i", 0) for _ in range(3)]
    workers = [ctx.Process(target=_busy_worker, args=(manager.socket_path, c)) for c in counters]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: all(c.value > 50 for c in counters), timeout=60, what="all workers busy")
        peak = len(manager_clients(admin, manager.pool_name))
        for worker in workers[:2]:
            os.kill(worker.pid, signal.SIGKILL)
        for worker in workers[:2]:
            worker.join(10)
        survivor = counters[2].value
        wait_for(lambda: counters[2].value > survivor + 50, timeout=60, what="the survivor to go on")
        assert workers[2].is_alive()  # its every echo was checked: an assert would have ended it

        async def main() -> list[str]:
            r = spa.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=60)
            try:
                return await many_tasks(r, tasks=40, rounds=6, tag="after-kill")
            finally:
                await r.aclose()

        assert run(main()) == []
        peak = max(peak, len(manager_clients(admin, manager.pool_name)))
        assert peak <= 2
    finally:
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)
                worker.join(10)
    stats = wait_for(lambda: (s := manager.stats())["leases"]["held"] == 0 and s, what="the killed workers' leases back")
    assert stats["connections"]["open"] <= 2


def _child_runs_its_own_loop(r: Any, out: Any) -> None:
    async def main() -> tuple[str, int]:
        await r.set("forked", "child")
        return str(await r.get("forked")), r.connection_pool._attachment.channel.pid

    try:
        out.put((asyncio.run(main()), os.getpid()))
    except Exception as exc:
        out.put(repr(exc))


def test_fork_and_a_second_loop(start_manager) -> None:
    manager = start_manager(max_connections=2, min_idle=1)
    r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)

    async def first() -> None:
        await r.set("parent", "1")

    asyncio.run(first())  # the pool keeps what it cached: the loop it served is gone
    out = ctx.Queue()
    child = ctx.Process(target=_child_runs_its_own_loop, args=(r, out))
    child.start()
    got = out.get(timeout=60)
    child.join(10)
    assert child.exitcode == 0, got
    (value, channel_pid), child_pid = got
    assert value == "child" and channel_pid == child_pid

    async def second() -> str:
        try:
            return str(await r.get("forked"))
        finally:
            await r.aclose()

    assert asyncio.run(second()) == "child"
    stats = wait_for(lambda: (s := manager.stats())["leases"]["held"] == 0 and s, what="every lease back")
    assert stats["counters"]["reaped_holder_closed"] == 0


def test_retry_defaults_are_redis_asyncios_own(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)

    async def main() -> tuple[Any, int]:
        shared = spa.Redis(socket_path=manager.socket_path)
        bare_pool = spa.SharedConnectionPool(socket_path=manager.socket_path)
        try:
            conn = await shared.connection_pool.get_connection()
            policy = conn.retry.policy
            await shared.connection_pool.release(conn)
            bare = await bare_pool.get_connection()
            retries = bare.retry.get_retries()
            await bare_pool.release(bare)
            return policy, retries
        finally:
            await shared.aclose()
            await bare_pool.disconnect()

    policy, bare_retries = run(main())
    assert policy == redis.asyncio.Redis().get_retry()  # what redis.asyncio.Redis() retries with
    assert bare_retries == redis.asyncio.Connection().retry.get_retries() == 0  # as redis.asyncio.ConnectionPool
