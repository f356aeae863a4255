"""Autopipelining as the default: what a redis.asyncio app gets is what redis.asyncio gives, reply for reply.

Each batched reply is compared with the one plain ``redis.asyncio`` gets
from the same Redis for the same command and options (RESP2 and RESP3,
decoded or not, custom callbacks, NEVER_DECODE, error replies); then the
faults an app meets at this default, with real worker processes: a
cancellation at each step of a command, SIGKILLed workers, a manager
restart, every reply checked.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
import uuid
from typing import Any

import multiprocess
import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ConstantBackoff
from redis.client import NEVER_DECODE
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool.asyncio as spa
from sharedpool.asyncio.autopipeline import AutoPipeline

ctx = multiprocess.get_context("fork")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 180))


def batcher_of(r: spa.SharedRedis) -> AutoPipeline:
    assert r.autopipeline is not None, "autopipelining is off"
    return r.autopipeline


def test_on_by_default_off_when_asked_and_copies_keep_the_choice(manager) -> None:
    path = manager.socket_path

    async def main() -> None:
        clients = [
            spa.Redis(socket_path=path),
            spa.SharedRedis(socket_path=path),
            spa.SharedRedis(connection_pool=spa.SharedConnectionPool(socket_path=path)),
            spa.SharedRedis.from_url("redis://localhost", socket_path=path),
        ]
        for client in clients:
            assert client.autopipeline is not None, client
        off = spa.Redis(socket_path=path, autopipeline=False)
        off_pool = spa.SharedConnectionPool(socket_path=path, autopipeline=False)
        off_clients = [
            off,
            spa.SharedRedis(connection_pool=off_pool),
            spa.SharedRedis(**off.connection_pool.connection_kwargs),
            spa.SharedRedis(connection_pool=type(off_pool)(**off_pool.connection_kwargs)),
            pickle.loads(pickle.dumps(off)),
            spa.SharedRedis.from_url("redis://localhost", socket_path=path, autopipeline=False),
            spa.SharedRedis(connection_pool=spa.SharedConnectionPool(socket_path=path), autopipeline=False),
        ]
        for client in off_clients:
            assert client.autopipeline is None, client
        # The default pool's options are the ones a copy needs, and nothing else.
        assert "autopipeline" not in clients[0].connection_pool.connection_kwargs
        # Behaviour, not only the attribute: concurrent commands share batches at the default.
        r = clients[0]
        keys = [f"def:{uuid.uuid4().hex}" for _ in range(50)]
        assert await asyncio.gather(*(r.set(k, k) for k in keys)) == [True] * 50
        assert batcher_of(r).commands == 50 and batcher_of(r).batches < 10
        assert await asyncio.gather(*(off.get(k) for k in keys)) == [k.encode() for k in keys]
        # A plain redis.asyncio.Redis over the pool works: every command its own lease.
        plain = redis.asyncio.Redis(connection_pool=spa.SharedConnectionPool(socket_path=path), decode_responses=True)
        assert await asyncio.gather(*(plain.get(k) for k in keys)) == [k.encode() for k in keys]
        for client in clients + off_clients + [plain]:
            await client.aclose()
        await plain.connection_pool.disconnect()

    run(main())


async def _workload(r: Any, prefix: str) -> list[Any]:
    """Commands with options and callbacks redis.asyncio handles, issued together (one batch when shared).

    Concurrent commands run in no set order on separate connections (plain
    redis.asyncio's case), so no two of one gather touch the same key unless
    both only read it.
    """
    def key(name: str) -> str:
        return f"{prefix}:{name}"

    setup = await asyncio.gather(
        r.set(key("s"), "v\u00e9"), r.set(key("s2"), "old"), r.set(key("s3"), "x"), r.set(key("s4"), "abc"),
        r.set(key("s5"), "gone"), r.hset(key("h"), mapping={"a": "1", "b": "2.5"}),
        r.hset(key("h2"), mapping={"b": "2.5", "i": "x"}), r.zadd(key("z"), {"m1": 1.5, "m2": 2}),
        r.rpush(key("l"), "x", "y", "z"), r.rpush(key("l2"), "x", "y", "z"), r.sadd(key("set"), "p", "q"),
    )
    replies = await asyncio.gather(
        r.get(key("s")),
        r.set(key("s2"), "w", get=True),
        r.set(key("s"), "new", nx=True),
        r.getex(key("s3"), ex=100),
        r.mget([key("s"), key("none")]),
        r.hgetall(key("h")),
        r.hmget(key("h"), ["a", "zz"]),
        r.hincrbyfloat(key("h2"), "b", 0.25),
        r.incrbyfloat(key("f"), 1.5),
        r.zrange(key("z"), 0, -1, withscores=True),
        r.zrangebyscore(key("z"), 0, 10, withscores=True, score_cast_func=int),
        r.zscore(key("z"), "m1"),
        r.zmscore(key("z"), ["m1", "nope"]),
        r.smembers(key("set")),
        r.smismember(key("set"), ["p", "nope"]),
        r.lrange(key("l"), 0, -1),
        r.lpop(key("l2"), 2),
        r.type(key("s")),
        r.ttl(key("s")),
        r.exists(key("s"), key("h"), key("none")),
        r.expire(key("s4"), 100),
        r.strlen(key("s")),
        r.getrange(key("s"), 0, 0),
        r.lpush(key("s"), "wrong"),  # WRONGTYPE
        r.hincrby(key("h2"), "i", 1),  # not an integer
        r.execute_command("GET", key("s"), **{NEVER_DECODE: []}),
        r.getdel(key("s5")),
        return_exceptions=True,
    )
    return setup + [(type(x).__name__, str(x)) if isinstance(x, Exception) else x for x in replies]


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("options", [
    {"decode_responses": True},
    {},
    {"decode_responses": True, "encoding": "latin-1"},
], ids=["decoded", "bytes", "latin-1"])
def test_batched_replies_equal_redis_asyncios_own(start_manager, redis_server, protocol: int, options: dict[str, Any]) -> None:
    manager = start_manager(max_connections=2, min_idle=1, protocol=protocol)

    async def main() -> tuple[list[Any], list[Any], AutoPipeline]:
        shared = spa.Redis(socket_path=manager.socket_path, protocol=protocol, **options)
        plain = redis.asyncio.Redis(port=redis_server.port, password=redis_server.password or None, protocol=protocol,
                                    **options)
        try:
            got = await _workload(shared, f"eq:{protocol}:{uuid.uuid4().hex}")
            want = await _workload(plain, f"eq:{protocol}:{uuid.uuid4().hex}")
            return got, want, batcher_of(shared)
        finally:
            await shared.aclose()
            await plain.aclose()

    got, want, batcher = run(main())
    assert got == want
    assert batcher.batches <= 4 and batcher.commands == len(got)  # every command of the workload went in batches


def test_a_clients_own_response_callback_applies_to_its_batched_replies(manager) -> None:
    async def main() -> None:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        other = spa.SharedRedis(connection_pool=r.connection_pool)
        r.set_response_callback("GET", lambda reply, **options: f"<{reply}>")
        try:
            k = f"cb:{uuid.uuid4().hex}"
            await r.set(k, "v")
            assert await asyncio.gather(r.get(k), other.get(k), r.get(k)) == ["<v>", "v", "<v>"]
            assert batcher_of(r).commands == 3
        finally:
            await r.aclose()

    run(main())


def test_a_cancellation_at_each_step_of_a_command_loses_nothing(start_manager, admin: redis.Redis) -> None:
    """Cancel after 0, 1, 2, ... loop turns (before the batch starts, while it leases, once sent, after the reply):
    the write is done or not, never half, never later; the lease comes back clean; the next write sticks."""
    manager = start_manager(max_connections=1, min_idle=1)
    wait_for(lambda: manager.stats()["connections"]["idle"] == 1, what="the idle connection")
    opened = manager.stats()["counters"]["connections_opened"]

    async def main() -> list[str]:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        wrong: list[str] = []
        try:
            await r.ping()
            for turns in range(40):
                for size in (10, 300_000):
                    k = f"cx:{turns}:{size}:{uuid.uuid4().hex}"
                    value = "v" * size
                    task = asyncio.ensure_future(r.set(k, value))
                    for _ in range(turns):
                        await asyncio.sleep(0)
                    task.cancel()
                    outcome = await asyncio.gather(task, return_exceptions=True)
                    got = await r.get(k)
                    if got not in (None, value) or (outcome == [True] and got != value):
                        wrong.append(f"{turns} turns, {size} B: SET said {outcome!r}, GET gave {str(got)[:20]!r}")
                    assert await r.set(k, "after") is True
                    if admin.get(k) != "after":
                        wrong.append(f"{turns} turns, {size} B: the later write did not stick")
            return wrong
        finally:
            await r.aclose()

    assert run(main()) == []
    # Cancelled once sent, the batch still read the reply: no lease came back broken.
    assert manager.stats()["counters"]["connections_opened"] == opened


def test_a_lone_command_goes_out_at_once(manager) -> None:
    """Light load: a lone command is sent within the loop turns its own task takes, waiting on no timer for company."""

    async def main() -> list[int]:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        try:
            await r.ping()
            batcher = batcher_of(r)
            turns_taken = []
            for i in range(20):
                sent_before = batcher.commands
                task = asyncio.ensure_future(r.get(f"lone:{i}"))
                turns = 0
                while batcher.commands == sent_before:
                    await asyncio.sleep(0)
                    turns += 1
                    assert turns < 50, "the lone command was never sent"
                turns_taken.append(turns)
                assert await task is None
            return turns_taken
        finally:
            await r.aclose()

    # Turn 1: the caller's task joins (and opens) the batch; turn 2: the batch's task leases and sends.
    assert max(run(main())) <= 2


@pytest.mark.parametrize("command", ["get", "ping"], ids=["batched", "exclusive"])
def test_retries_of_a_batch_stop_at_the_call_bound(start_manager, admin: redis.Redis, command: str) -> None:
    """50 retries 1 s apart, the manager frozen so nothing replaces the killed connection: within the bound."""
    manager = start_manager(max_connections=2, min_idle=1)

    async def main() -> float:
        r = spa.Redis(
            socket_path=manager.socket_path, acquire_timeout=0.5, manager_timeout=0.5,
            retry=AsyncRetry(ConstantBackoff(1.0), 50),
        )
        try:
            assert await r.ping()
            manager.signal(signal.SIGSTOP)
            try:
                for client in manager_clients(admin, manager.pool_name):
                    admin.client_kill_filter(_id=client["id"])
                started = time.monotonic()
                with pytest.raises(redis.RedisError):
                    await (r.get("k") if command == "get" else r.ping())
                return time.monotonic() - started
            finally:
                manager.signal(signal.SIGCONT)
        finally:
            await r.aclose()

    elapsed = run(main())
    assert elapsed < 0.5 + 0.5 + 1.0, f"one {command} took {elapsed:.2f} s"


def test_exclusive_paths_beside_batches(manager) -> None:
    """pipeline, MULTI, pub/sub, a blocking BLPOP, a script and a lock each hold a lease of their own
    while batches go on; none of their commands is batched."""

    async def main() -> None:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True)
        p = f"ex:{uuid.uuid4().hex}"
        try:
            batcher = batcher_of(r)
            blpop = asyncio.ensure_future(r.blpop([f"{p}:q"], timeout=5))
            pubsub = r.pubsub()
            await pubsub.subscribe(f"{p}:ch")
            assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
            before = batcher.commands
            async with r.pipeline(transaction=True) as pipe:
                assert await pipe.set(f"{p}:t", "1").incr(f"{p}:t").execute() == [True, 2]
            assert await r.eval("return redis.call('GET', KEYS[1])", 1, f"{p}:t") == "2"
            async with r.lock(f"{p}:lock", timeout=5):
                assert await r.publish(f"{p}:ch", "hello") == 1
            assert batcher.commands == before  # none of that was batched
            keys = [f"{p}:{i}" for i in range(30)]
            assert await asyncio.gather(*(r.set(k, k) for k in keys)) == [True] * 30
            assert batcher.commands == before + 30
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None and message["data"] == "hello"
            await r.rpush(f"{p}:q", "item")
            assert list(await blpop) == [f"{p}:q", "item"]
            await pubsub.aclose()
        finally:
            await r.aclose()

    run(main())
    assert wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="every lease back")


def _checked_writer(socket_path: str, count: Any, storm: bool = False) -> None:
    """Tasks write values no one else writes and read them back, batched; a wrong reply ends the process.

    ``storm``: a third of the commands run under a timeout of 0-3 ms, so
    many are cancelled before they are sent, once sent, or as they are
    answered; a fresh key each round tells which outcomes may be seen.
    """
    import random

    async def main() -> None:
        r = spa.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=60)
        assert r.autopipeline is not None
        rng = random.Random(os.getpid())

        async def maybe_cut(call: Any) -> Any:
            if storm and rng.random() < 0.33:
                return await asyncio.wait_for(call, rng.uniform(0, 0.003))
            return await call

        async def body(task: int) -> None:
            i = 0
            while True:
                i += 1
                key = f"fleet:{os.getpid()}:{task}:{i}"
                value = f"{os.getpid()}:{task}:{i}:" + "z" * (100_000 if i % 50 == 0 else 8)
                written = False
                try:
                    written = await maybe_cut(r.set(key, value)) is True
                except (asyncio.TimeoutError, redis.ConnectionError, redis.TimeoutError):
                    pass  # cancelled, or an outage: the write happened or not
                try:
                    got = await maybe_cut(r.get(key))
                except (asyncio.TimeoutError, redis.ConnectionError, redis.TimeoutError):
                    continue
                if got != value and (written or got is not None):
                    os._exit(3)  # a reply that was not this task's, or a write that was lost or came back
                count.value += 1

        await asyncio.gather(*(body(t) for t in range(32)))

    asyncio.run(main())


def _start_writers(socket_path: str, n: int, storm: bool = False) -> tuple[list[Any], list[Any]]:
    counters = [ctx.Value("i", 0) for _ in range(n)]
    writers = [ctx.Process(target=_checked_writer, args=(socket_path, c, storm)) for c in counters]
    for writer in writers:
        writer.start()
    return writers, counters


def _stop(writers: list[Any]) -> None:
    for writer in writers:
        if writer.is_alive():
            os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)


def test_fleet_at_the_default_through_sigkills(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1, acquire_timeout=60)
    writers, counters = _start_writers(manager.socket_path, 3)
    try:
        wait_for(lambda: all(c.value > 200 for c in counters), timeout=60, what="all writers busy")
        peak = len(manager_clients(admin, manager.pool_name))
        for writer in writers[:2]:
            os.kill(writer.pid, signal.SIGKILL)
            writer.join(10)
        survivor = counters[2].value
        wait_for(lambda: counters[2].value > survivor + 500, timeout=60, what="the survivor to go on")
        assert writers[2].is_alive()  # every one of its replies was checked
        peak = max(peak, len(manager_clients(admin, manager.pool_name)))
        assert peak <= 2
    finally:
        _stop(writers)
    assert wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="the killed writers' leases back")


def test_fleet_at_the_default_through_a_manager_restart(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1, acquire_timeout=60)
    writers, counters = _start_writers(manager.socket_path, 2)
    try:
        wait_for(lambda: all(c.value > 200 for c in counters), timeout=60, what="all writers busy")
        manager.kill()
        manager.start()
        before = [c.value for c in counters]
        wait_for(lambda: all(c.value > b + 500 for c, b in zip(counters, before, strict=True)), timeout=60,
                 what="every writer to go on with the new manager")
        assert all(writer.is_alive() for writer in writers)  # no wrong reply, before, during or after
        assert len(manager_clients(admin, manager.pool_name)) <= 2
    finally:
        _stop(writers)


def test_fleet_at_the_default_through_cancellation_storms_and_client_kills(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=2, acquire_timeout=60)
    wait_for(lambda: manager.stats()["connections"]["idle"] == 2, what="the two idle connections")
    opened = manager.stats()["counters"]["connections_opened"]
    writers, counters = _start_writers(manager.socket_path, 3, storm=True)
    kills = 0
    try:
        wait_for(lambda: all(c.value > 300 for c in counters), timeout=60, what="all writers busy")
        for _ in range(8):
            before = [c.value for c in counters]
            for client in manager_clients(admin, manager.pool_name):
                if client.get("cmd") not in ("hello", "reset", "client|setname"):
                    kills += admin.client_kill_filter(_id=client["id"])
            wait_for(lambda b=before: all(c.value > v + 50 for c, v in zip(counters, b, strict=True)), timeout=60,
                     what="every writer to go on after the kill")
        assert all(writer.is_alive() for writer in writers)  # no wrong reply, no lost or late write
        assert kills > 0 and manager.stats()["counters"]["connections_opened"] > opened
        assert len(manager_clients(admin, manager.pool_name)) <= 2
    finally:
        _stop(writers)
    assert wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="the writers' leases back")
