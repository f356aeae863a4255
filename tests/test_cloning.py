"""Clients rebuilt from a shared pool land on the same shared pool and database.

Libraries rebuild clients from what a pool says about itself: rq's
scheduler and worker pool as ``redis.ConnectionPool(connection_class=
pool.connection_class, **pool.connection_kwargs)`` with the client's own
class, others as ``type(pool)(**pool.connection_kwargs)`` or by pickling a
client into a spawned process, django-redis through ``from_url``. Each way
must reach the same manager and database, or fail with one error that says
what to do: never connect anywhere else. Redis's own CLIENT LIST is the
witness that no connection but the manager's reached it.
"""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import multiprocess
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.redis_view import strangers

import sharedpool
from sharedpool.dev.launch import ManagerProcess

DB = 2


@pytest.fixture
def manager(start_manager: Any, redis_server: Any) -> ManagerProcess:
    return start_manager(redis_url=redis_server.url.rsplit("/", 1)[0] + f"/{DB}", max_connections=3, min_idle=1)


@pytest.fixture
def db_view(redis_server: Any) -> Iterator[redis.Redis]:
    """A plain client of database DB, to see where keys landed."""
    client = redis_server.client(db=DB, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def original(manager: ManagerProcess) -> Iterator[sharedpool.SharedRedis]:
    client = sharedpool.Redis(socket_path=manager.socket_path, db=DB, decode_responses=True)
    yield client
    client.close()


def round_trip(client: redis.Redis, view: redis.Redis, how: str) -> None:
    """Write through the clone; the plain client of DB must see it there."""
    key = f"clone:{uuid.uuid4().hex}"
    client.set(key, how)
    assert client.get(key) in (how, how.encode())
    assert view.get(key) == how, f"{how}: the key did not land in db {DB}"


CLONES: dict[str, Callable[[sharedpool.SharedRedis], redis.Redis]] = {
    "type(pool)(**connection_kwargs)": lambda c: redis.Redis(
        connection_pool=type(c.connection_pool)(**c.connection_pool.connection_kwargs)
    ),
    "sharedpool.Redis(**connection_kwargs)": lambda c: sharedpool.Redis(**c.connection_pool.connection_kwargs),
    # rq's scheduler and worker pool: the client's class around a plain pool of our connection class.
    "rq: client class + redis.ConnectionPool": lambda c: type(c)(
        connection_pool=redis.ConnectionPool(
            connection_class=c.connection_pool.connection_class, **c.connection_pool.connection_kwargs
        )
    ),
    "pickle": lambda c: pickle.loads(pickle.dumps(c)),
}


@pytest.mark.parametrize("how", sorted(CLONES))
def test_a_clone_in_the_same_process_uses_the_shared_pool_and_database(
    how: str, original: sharedpool.SharedRedis, db_view: redis.Redis, manager: ManagerProcess
) -> None:
    clone = CLONES[how](original)
    try:
        assert isinstance(clone.connection_pool, sharedpool.SharedConnectionPool)
        round_trip(clone, db_view, how)
    finally:
        clone.close()
        clone.connection_pool.disconnect()  # a pool given to redis.Redis is the caller's to close
    assert strangers(db_view, manager) == []


def _clone_in_child(how: str, original: sharedpool.SharedRedis, results: Any) -> None:
    try:
        clone = CLONES[how](original)
        key = f"child:{uuid.uuid4().hex}"
        clone.set(key, how)
        results.put(("ok", key, type(clone.connection_pool).__name__))
        clone.close()
        clone.connection_pool.disconnect()
    except Exception as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}", ""))


@pytest.mark.parametrize("how", sorted(CLONES))
def test_a_clone_in_a_forked_child_uses_the_shared_pool_and_database(
    how: str, original: sharedpool.SharedRedis, db_view: redis.Redis, manager: ManagerProcess
) -> None:
    original.ping()  # the parent holds a channel and fds the child must not use
    ctx = multiprocess.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_clone_in_child, args=(how, original, results))
    child.start()
    outcome, key, pool_class = results.get(timeout=30)
    child.join(10)
    assert outcome == "ok", key
    assert pool_class == "SharedConnectionPool"
    assert db_view.get(key) == how
    assert strangers(db_view, manager) == []


def _clone_in_spawned_child(how: str, client: sharedpool.SharedRedis, key: str) -> str:
    clone = CLONES[how](client)  # the client itself came by pickle: only its options travelled
    try:
        clone.set(key, how)
        return type(clone.connection_pool).__name__
    finally:
        clone.close()
        clone.connection_pool.disconnect()
        client.close()


@pytest.mark.parametrize("how", sorted(CLONES))
def test_a_clone_in_a_spawned_process_uses_the_shared_pool_and_database(
    how: str, original: sharedpool.SharedRedis, db_view: redis.Redis, manager: ManagerProcess
) -> None:
    original.ping()
    key = f"spawned:{uuid.uuid4().hex}"
    with multiprocess.get_context("spawn").Pool(1) as pool:
        pool_class = pool.apply(_clone_in_spawned_child, (how, original, key))
    assert pool_class == "SharedConnectionPool"
    assert db_view.get(key) == how
    assert strangers(db_view, manager) == []


def test_a_plain_client_around_a_plain_pool_of_leased_connections_says_what_to_do(
    original: sharedpool.SharedRedis, db_view: redis.Redis, manager: ManagerProcess
) -> None:
    pool = original.connection_pool
    plain = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **pool.connection_kwargs))
    with pytest.raises(sharedpool.Misconfigured, match=r"type\(pool\)\(\*\*pool.connection_kwargs\)") as caught:
        plain.ping()
    assert not isinstance(caught.value, redis.ConnectionError)  # a retry loop must not spin on it
    assert strangers(db_view, manager) == []


def test_from_url_takes_the_database_and_options_and_drops_the_password(
    manager: ManagerProcess, redis_server: Any, db_view: redis.Redis
) -> None:
    url = f"redis://:not-the-password@127.0.0.1:{redis_server.port}/{DB}?decode_responses=True"
    pool = sharedpool.SharedConnectionPool.from_url(url, socket_path=manager.socket_path)
    assert pool.db == DB
    assert "password" not in pool.connection_kwargs
    client = redis.Redis(connection_pool=pool)
    try:
        round_trip(client, db_view, "from_url")
        assert client.get("missing:" + uuid.uuid4().hex) is None
    finally:
        client.close()
        pool.disconnect()
    url = f"redis://localhost:{redis_server.port}?db={DB}"
    via_client = sharedpool.SharedRedis.from_url(url, socket_path=manager.socket_path)
    try:
        round_trip(via_client, db_view, "SharedRedis.from_url")
    finally:
        via_client.close()
    assert strangers(db_view, manager) == []


def test_from_url_naming_another_redis_is_refused_not_redirected(manager: ManagerProcess, redis_server: Any) -> None:
    other_port = redis_server.port + 1
    client = sharedpool.SharedRedis.from_url(f"redis://127.0.0.1:{other_port}/{DB}", socket_path=manager.socket_path)
    try:
        with pytest.raises(sharedpool.Misconfigured, match=rf"127.0.0.1:{other_port}.*connects to 127.0.0.1:{redis_server.port}"):
            client.ping()
    finally:
        client.close()
    # The same host and port, but TLS, which this manager does not speak: another Redis, refused so.
    tls_client = sharedpool.SharedRedis.from_url(f"rediss://127.0.0.1:{redis_server.port}/{DB}", socket_path=manager.socket_path)
    try:
        with pytest.raises(sharedpool.Misconfigured, match=r"\(TLS\).*connects to 127.0.0.1"):
            tls_client.ping()
    finally:
        tls_client.close()


def test_retry_timeout_and_health_check_defaults_are_redis_pys_own(manager: ManagerProcess) -> None:
    plain_client_retry = redis.Redis().get_retry()
    shared = sharedpool.Redis(socket_path=manager.socket_path)
    pool_only = redis.Redis(connection_pool=sharedpool.SharedConnectionPool(socket_path=manager.socket_path))
    try:
        ours = shared.connection_pool.get_connection()
        try:
            assert ours.retry.policy == plain_client_retry  # what redis.Redis() retries with
            plain = redis.Connection()
            assert (ours.socket_timeout, ours.health_check_interval) == (plain.socket_timeout, plain.health_check_interval)
        finally:
            shared.connection_pool.release(ours)
        bare = pool_only.connection_pool.get_connection()
        try:
            assert bare.retry.get_retries() == redis.Connection().retry.get_retries() == 0  # as redis.ConnectionPool
        finally:
            pool_only.connection_pool.release(bare)
    finally:
        shared.close()
        pool_only.close()
        pool_only.connection_pool.disconnect()


def test_retries_stop_at_the_call_bound_whatever_the_policy(manager: ManagerProcess, redis_server: Any) -> None:
    """A policy of 50 retries with 1 s backoffs still ends within manager_timeout + acquire_timeout."""
    from redis.backoff import ConstantBackoff

    client = sharedpool.Redis(
        socket_path=manager.socket_path, db=DB, acquire_timeout=0.5, manager_timeout=0.5,
        retry=Retry(ConstantBackoff(1.0), 50),
    )
    try:
        client.ping()
        manager.signal(19)  # SIGSTOP: nobody can replace the connection Redis is about to drop
        try:
            with redis_server.client() as view:
                for c in view.client_list():
                    if c.get("name", "").startswith(f"sharedpool:{manager.pool_name}:"):
                        view.client_kill_filter(_id=c["id"])
            started = time.monotonic()
            with pytest.raises(redis.RedisError):
                client.ping()
            elapsed = time.monotonic() - started
        finally:
            manager.signal(18)  # SIGCONT
        assert elapsed < 0.5 + 0.5 + 1.0, f"one PING took {elapsed:.2f} s"
    finally:
        client.close()


def test_misconfiguration_is_not_an_outage(manager: ManagerProcess) -> None:
    """Refused at once, not retried: a retry loop that catches ConnectionError does not spin on it."""
    client = sharedpool.Redis(socket_path=manager.socket_path, protocol=2, retry=Retry(NoBackoff(), 10))
    try:
        started = time.monotonic()
        with pytest.raises(sharedpool.ProtocolMismatch) as caught:
            client.ping()
        assert not isinstance(caught.value, (redis.ConnectionError, redis.TimeoutError))
        assert time.monotonic() - started < 2.0
    finally:
        client.close()
