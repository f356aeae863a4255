"""asyncio clients rebuilt from a shared pool (copied, pickled, from a URL) land on the same shared pool and database.

The asyncio side of ``test_cloning``: FastAPI apps build their client from a
URL setting, and hand it to spawned processes (``ProcessPoolExecutor``).
Redis's own CLIENT LIST is the witness that no connection but the
manager's reached it.
"""

from __future__ import annotations

import asyncio
import pickle
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import multiprocess
import pytest
import redis
import redis.asyncio
from support.redis_view import strangers

import sharedpool
import sharedpool.asyncio as spa
from sharedpool.dev.launch import ManagerProcess

DB = 3


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def manager(start_manager: Any) -> ManagerProcess:
    return start_manager(max_connections=3, min_idle=1)


@pytest.fixture
def db_view(redis_server: Any) -> Iterator[redis.Redis]:
    """A plain sync client of database DB, to see where keys landed."""
    client = redis_server.client(db=DB, decode_responses=True)
    yield client
    client.close()


def original_client(manager: ManagerProcess) -> spa.SharedRedis:
    return spa.Redis(socket_path=manager.socket_path, db=DB, decode_responses=True)


CLONES: dict[str, Callable[[spa.SharedRedis], redis.asyncio.Redis]] = {
    "type(pool)(**connection_kwargs)": lambda c: redis.asyncio.Redis(
        connection_pool=type(c.connection_pool)(**c.connection_pool.connection_kwargs)
    ),
    "SharedRedis(**connection_kwargs)": lambda c: spa.SharedRedis(**c.connection_pool.connection_kwargs),
    "pickle": lambda c: pickle.loads(pickle.dumps(c)),
}


async def write_through(client: redis.asyncio.Redis, key: str, value: str) -> str:
    try:
        assert await client.set(key, value) is True
        return type(client.connection_pool).__name__
    finally:
        await client.aclose()
        await client.connection_pool.disconnect()  # a pool given to redis.asyncio.Redis is the caller's to close


@pytest.mark.parametrize("how", sorted(CLONES))
def test_a_clone_in_the_same_process_uses_the_shared_pool_and_database(
    how: str, manager: ManagerProcess, db_view: redis.Redis
) -> None:
    key = f"aclone:{uuid.uuid4().hex}"

    async def main() -> str:
        original = original_client(manager)
        try:
            assert await original.ping()
            return await write_through(CLONES[how](original), key, how)
        finally:
            await original.aclose()

    assert run(main()) == "SharedConnectionPool"
    assert db_view.get(key) == how, f"{how}: the key did not land in db {DB}"
    assert strangers(db_view, manager) == []


def _clone_in_spawned_child(how: str, client: spa.SharedRedis, key: str) -> str:
    return str(asyncio.run(write_through(CLONES[how](client), key, how)))  # the client came by pickle: options only


@pytest.mark.parametrize("how", ["pickle", "type(pool)(**connection_kwargs)"])
def test_a_clone_in_a_spawned_process_uses_the_shared_pool_and_database(
    how: str, manager: ManagerProcess, db_view: redis.Redis
) -> None:
    key = f"aspawned:{uuid.uuid4().hex}"
    original = original_client(manager)
    with multiprocess.get_context("spawn").Pool(1) as pool:
        pool_class = pool.apply(_clone_in_spawned_child, (how, original, key))
    assert pool_class == "SharedConnectionPool"
    assert db_view.get(key) == how
    assert strangers(db_view, manager) == []


def test_from_url_takes_the_database_and_options_and_drops_the_password(
    manager: ManagerProcess, redis_server: Any, db_view: redis.Redis
) -> None:
    url = f"redis://:not-the-password@127.0.0.1:{redis_server.port}/{DB}?decode_responses=True"

    async def main() -> tuple[Any, Any]:
        pool = spa.SharedConnectionPool.from_url(url, socket_path=manager.socket_path)
        assert pool.db == DB and "password" not in pool.connection_kwargs
        client = redis.asyncio.Redis(connection_pool=pool)
        try:
            await client.set("aurl:pool", "from_url")
            missing = await client.get(f"missing:{uuid.uuid4().hex}")
        finally:
            await client.aclose()
            await pool.disconnect()
        via_client = spa.SharedRedis.from_url(f"redis://localhost:{redis_server.port}?db={DB}", socket_path=manager.socket_path)
        try:
            await via_client.set("aurl:client", "SharedRedis.from_url")
            return missing, await via_client.get("aurl:client")
        finally:
            await via_client.aclose()

    missing, raw = run(main())
    assert missing is None and raw == b"SharedRedis.from_url"  # decode_responses is the URL's, not the client's
    assert db_view.get("aurl:pool") == "from_url"
    assert strangers(db_view, manager) == []


def test_from_url_naming_another_redis_is_refused_not_redirected(manager: ManagerProcess, redis_server: Any) -> None:
    other_port = redis_server.port + 1

    async def main() -> None:
        client = spa.SharedRedis.from_url(f"redis://127.0.0.1:{other_port}/{DB}", socket_path=manager.socket_path)
        expected = rf"127.0.0.1:{other_port}.*connects to 127.0.0.1:{redis_server.port}"
        try:
            with pytest.raises(sharedpool.Misconfigured, match=expected):
                await client.ping()
        finally:
            await client.aclose()

    run(main())


def test_a_plain_pool_of_leased_connections_says_what_to_do(manager: ManagerProcess, db_view: redis.Redis) -> None:
    async def main() -> None:
        original = original_client(manager)
        pool = original.connection_pool
        plain = redis.asyncio.Redis(
            connection_pool=redis.asyncio.ConnectionPool(connection_class=pool.connection_class, **pool.connection_kwargs)
        )
        try:
            with pytest.raises(sharedpool.Misconfigured, match=r"type\(pool\)\(\*\*pool.connection_kwargs\)") as caught:
                await plain.ping()
            assert not isinstance(caught.value, redis.ConnectionError)  # a retry loop must not spin on it
        finally:
            await plain.aclose()
            await original.aclose()

    run(main())
    assert strangers(db_view, manager) == []
