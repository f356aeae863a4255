"""sharedpool.asyncio: redis-py's asyncio code over leases, many tasks, cancellation, kills and forks."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import multiprocess
import pytest
import redis
import redis.asyncio
from support.async_mix import many_tasks, report_from_async_worker
from support.redis_view import manager_clients
from support.waiting import wait_for
from support.workers import fleet_holds_the_cap

import sharedpool.asyncio as spa
from sharedpool import errors

ctx = multiprocess.get_context("fork")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def key() -> str:
    return f"k:{uuid.uuid4().hex}"


def test_redis_py_asyncio_paths(manager) -> None:
    async def main() -> None:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        try:
            k, h = key(), key()
            assert await r.set(k, "v1") is True and await r.get(k) == "v1"
            assert await r.hset(h, mapping={"a": "1"}) == 1 and await r.hgetall(h) == {"a": "1"}
            for transaction in (True, False):
                async with r.pipeline(transaction=transaction) as pipe:
                    pipe.set(k, 1).incr(k).incr(k).get(k)
                    assert await pipe.execute() == [True, 2, 3, "3"]
            async with r.pipeline() as pipe:  # WATCH / MULTI / EXEC
                await pipe.watch(k)
                value = int(await pipe.get(k))
                pipe.multi()
                pipe.set(k, value + 1)
                await pipe.execute()
            assert await r.get(k) == "4"
            script = r.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
            assert await script(keys=[k + ":lua"], args=[7]) == 7
            async with r.lock(k + ":lock", timeout=5):
                assert await r.exists(k + ":lock") == 1
            async with r.lease() as pinned:
                await pinned.client_setname("changed-by-a-task")  # the manager must RESET this one
                await pinned.set(k, "pinned")
                async with pinned.pipeline() as pipe:
                    assert await pipe.get(k).execute() == ["pinned"]
            pubsub = r.pubsub()
            await pubsub.subscribe("chan")
            assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
            await r.publish("chan", "hello")
            message = None
            deadline = time.monotonic() + 10
            while message is None or message["type"] != "message":
                assert time.monotonic() < deadline
                message = await pubsub.get_message(timeout=1)
            assert message["data"] == "hello"
            await pubsub.aclose()
            stats = await r.connection_pool.stats()
            assert stats["leases"]["held"] == 0
        finally:
            await r.aclose()

    run(main())
    # CLIENT SETNAME changed the session: that lease came back for a RESET.
    assert wait_for(lambda: manager.stats()["counters"]["connections_reset"] >= 1, what="the reset")


def test_plain_redis_asyncio_over_the_pool_and_a_db_refused(manager) -> None:
    async def main() -> None:
        pool = spa.SharedConnectionPool(manager.socket_path, decode_responses=True)
        r = redis.asyncio.Redis(connection_pool=pool)
        assert await r.echo("x") == "x" and pool.db is None
        await pool.aclose()
        other = spa.Redis(socket_path=manager.socket_path, db=20)  # the manager serves 0-15
        with pytest.raises(errors.DatabaseNotServed, match="db 20"):
            await other.ping()
        await other.aclose()

    run(main())


def test_many_tasks_on_two_connections_every_reply_checked(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1, acquire_timeout=30)

    async def main() -> list[str]:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        try:
            return await many_tasks(r, tasks=200, rounds=15, tag="one")
        finally:
            await r.aclose()

    assert run(main()) == []
    assert len(manager_clients(admin, manager.pool_name)) <= 2
    assert manager.stats()["leases"]["held"] == 0


def _worker_tasks(socket_path: str, worker: int, out: Any) -> None:
    report_from_async_worker(out, socket_path, lambda r: many_tasks(r, tasks=64, rounds=10, tag=f"w{worker}"))


def test_worker_processes_x_64_tasks_cap_holds(start_manager, admin: redis.Redis) -> None:
    fleet_holds_the_cap(start_manager(max_connections=2, min_idle=1, acquire_timeout=60), admin, _worker_tasks)


def test_acquire_timeout_bounds_the_wait(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)

    async def main() -> float:
        r = spa.Redis(socket_path=manager.socket_path, acquire_timeout=0.5)
        try:
            async with r.lease() as pinned:
                await pinned.ping()
                started = time.monotonic()
                with pytest.raises(errors.PoolTimeout, match="1 of 1 connections leased"):
                    await r.ping()
                return time.monotonic() - started
        finally:
            await r.aclose()

    waited = run(main())
    assert 0.4 <= waited < 3.0
    assert manager.stats()["leases"]["held"] == 0
