"""One control connection per process and manager, whatever number of pools (issue 24).

Sync pools share one; asyncio pools share one per event loop (an asyncio
channel is driven by its loop, a sync channel blocks: ``shell.links``).
Counted by the manager itself (its stats' per-worker ``control_connections``),
asked through one of the pools: a stats client of its own would add one.
"""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any

import multiprocess
import pytest
import redis
from support.waiting import wait_for

import sharedpool
import sharedpool.asyncio as spa


def _connections_of(stats: dict[str, Any], pid: int) -> int:
    for worker in stats["workers"]:
        if worker["pid"] == pid:
            return int(worker["control_connections"])
    return 0


def _sync_pools(socket_path: str) -> list[sharedpool.SharedConnectionPool]:
    # Pools a process's libraries make each their own way: other options, other databases' clients.
    return [
        sharedpool.SharedConnectionPool(socket_path),
        sharedpool.SharedConnectionPool(socket_path, decode_responses=True),
        sharedpool.SharedConnectionPool(socket_path, db=0),
        sharedpool.SharedConnectionPool(socket_path, socket_timeout=5),
        sharedpool.Redis(socket_path=socket_path).connection_pool,
    ]


def test_the_sync_pools_of_a_process_share_one_control_connection(manager: Any) -> None:
    pools = _sync_pools(manager.socket_path)
    clients = [redis.Redis(connection_pool=pool) for pool in pools]
    for client in clients:
        assert client.ping() is True
    assert _connections_of(pools[0].stats(), os.getpid()) == 1
    # One pool let go (disconnect): the others keep the connection.
    pools[0].disconnect()
    assert clients[1].ping() is True
    assert _connections_of(pools[1].stats(), os.getpid()) == 1
    for pool in pools:
        pool.disconnect()
    wait_for(lambda: _connections_of(manager.stats(), os.getpid()) == 1, timeout=5)  # the stats call's own


def test_the_asyncio_pools_of_a_loop_share_one_control_connection(manager: Any) -> None:
    async def main() -> int:
        clients = [
            spa.Redis(socket_path=manager.socket_path),
            spa.Redis(socket_path=manager.socket_path, decode_responses=True),
            spa.SharedRedis(connection_pool=spa.SharedConnectionPool(manager.socket_path, socket_timeout=5)),
        ]
        for client in clients:
            assert await client.ping() is True
        count = _connections_of(await clients[0].connection_pool.stats(), os.getpid())
        for client in clients:
            await client.aclose()
            await client.connection_pool.disconnect()
        return count

    assert asyncio.run(main()) == 1
    wait_for(lambda: _connections_of(manager.stats(), os.getpid()) == 1, timeout=5)  # the stats call's own


def _child(socket_path: str, out: Any, done: Any) -> None:
    clients = [redis.Redis(connection_pool=pool) for pool in _sync_pools(socket_path)]
    out.put([client.ping() for client in clients])
    # The parent counts while this child still holds its pools, then lets it go.
    done.get(timeout=30)


def test_a_forked_child_opens_its_own_one(manager: Any) -> None:
    pools = _sync_pools(manager.socket_path)
    for pool in pools:
        assert redis.Redis(connection_pool=pool).ping() is True
    context = multiprocess.get_context("fork")
    out, done = context.Queue(), context.Queue()
    child = context.Process(target=_child, args=(manager.socket_path, out, done))
    child.start()
    try:
        assert out.get(timeout=30) == [True] * len(pools)
        stats = pools[0].stats()
        assert _connections_of(stats, child.pid) == 1
        assert _connections_of(stats, os.getpid()) == 1
    finally:
        done.put("done")
        child.join(timeout=30)
    assert child.exitcode == 0
    for pool in pools:
        pool.disconnect()


def test_after_a_manager_restart_the_pools_share_one_again(start_manager: Any) -> None:
    first = start_manager(max_connections=4)
    pools = _sync_pools(first.socket_path)
    clients = [redis.Redis(connection_pool=pool) for pool in pools]
    for client in clients:
        assert client.ping() is True
    first.kill()
    start_manager(socket_path=first.socket_path, max_connections=4)
    for client in clients:
        assert client.ping() is True
    assert _connections_of(pools[0].stats(), os.getpid()) == 1
    for pool in pools:
        pool.disconnect()


# The dropped pools' cached Redis sockets are collected unclosed, as a dropped redis-py pool's are.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_pools_dropped_without_disconnect_let_their_connection_go(manager: Any) -> None:
    # redis.Redis(connection_pool=pool) never closes a pool it was given: collected, it lets go.
    pools = _sync_pools(manager.socket_path)
    for pool in pools:
        assert redis.Redis(connection_pool=pool).ping() is True
    assert _connections_of(pools[0].stats(), os.getpid()) == 1
    del pool, pools
    gc.collect()
    wait_for(lambda: _connections_of(manager.stats(), os.getpid()) == 1, timeout=5)  # the stats call's own
