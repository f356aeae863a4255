"""redis-py's own code paths, run over leased connections."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis
from redis.lock import Lock

import sharedpool
from sharedpool.dev.launch import ManagerProcess


@pytest.fixture
def r(manager: ManagerProcess) -> redis.Redis:
    client = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
    yield client
    client.close()


def key() -> str:
    return f"k:{uuid.uuid4().hex}"


def test_strings_and_hashes(r: redis.Redis) -> None:
    k, h = key(), key()
    assert r.set(k, "v1") is True
    assert r.get(k) == "v1"
    assert r.incrby(k + ":n", 5) == 5
    assert r.hset(h, mapping={"a": "1", "b": "2"}) == 2
    assert r.hgetall(h) == {"a": "1", "b": "2"}
    assert r.hincrby(h, "a", 10) == 11


def test_pipelines_with_and_without_transaction(r: redis.Redis) -> None:
    k = key()
    for transaction in (True, False):
        with r.pipeline(transaction=transaction) as pipe:
            pipe.set(k, 1).incr(k).incr(k).get(k)
            assert pipe.execute() == [True, 2, 3, "3"]


def test_watch_transaction(r: redis.Redis) -> None:
    k = key()
    r.set(k, 10)
    with r.pipeline() as pipe:
        pipe.watch(k)
        value = int(pipe.get(k))
        pipe.multi()
        pipe.set(k, value + 1)
        pipe.execute()
    assert r.get(k) == "11"


def test_lua_script(r: redis.Redis) -> None:
    k = key()
    script = r.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert script(keys=[k], args=[7]) == 7
    assert r.eval("return ARGV[1]", 0, "echo") == "echo"


def test_pubsub(r: redis.Redis) -> None:
    channel = key()
    pubsub = r.pubsub()
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    assert r.publish(channel, "hello") == 1
    message = pubsub.get_message(timeout=5)
    assert (message["type"], message["data"]) == ("message", "hello")
    pubsub.close()
    # The subscribed connection never comes back subscribed: a plain command works.
    assert r.ping() is True


def test_lock_excludes_across_threads(r: redis.Redis) -> None:
    name, counter = key(), key()
    r.set(counter, 0)

    def bump() -> None:
        for _ in range(20):
            with Lock(r, name, timeout=10, blocking_timeout=10):
                value = int(r.get(counter))
                r.set(counter, value + 1)

    threads = [threading.Thread(target=bump) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert r.get(counter) == "60"


def test_lease_pins_one_connection_for_a_block(r: redis.Redis, manager: ManagerProcess) -> None:
    before = manager.stats()["counters"]["leases_granted"]
    with r.lease() as pinned:
        ids = {pinned.client_id() for _ in range(5)}
        with pinned.pipeline() as pipe:
            pipe.client_id()
            ids.update(pipe.execute())
    assert len(ids) == 1
    assert manager.stats()["counters"]["leases_granted"] == before + 1
    with pytest.raises(sharedpool.LeaseError):
        pinned.ping()


def test_binary_values_and_large_payload(manager: ManagerProcess) -> None:
    raw = sharedpool.Redis(socket_path=manager.socket_path)
    k = key()
    payload = bytes(range(256)) * 4096  # 1 MiB
    raw.set(k, payload)
    assert raw.get(k) == payload
    raw.close()


def test_server_errors_surface_as_redis_py_errors(r: redis.Redis) -> None:
    k = key()
    r.set(k, "text")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        r.incr(k)
    assert r.get(k) == "text"  # the connection is still fine
