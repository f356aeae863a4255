"""Defects real libraries (Celery, kombu, rq) found, each as the library meets it.

Celery's result backend builds its pool from a full set of redis-py options,
kombu closes a pool's connections in use with ``disconnect()`` and relies on
it, rq passes ``connection_pool=`` to the client class, and a config error
must never print the password.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest
import redis
import redis.asyncio
from redis.driver_info import DriverInfo
from support.waiting import wait_for

import sharedpool
import sharedpool.asyncio
from sharedpool import config as sp_config
from sharedpool.dev.launch import ManagerProcess
from sharedpool.dev.redis_server import RedisServer

# ----- manager-owned options given redis-py's defaults ----------------------------------


def _celery_like_options(port: int) -> dict[str, object]:
    """What Celery 5.7's RedisBackend passes to its pool class for redis://127.0.0.1:PORT/1."""
    return {
        "host": "127.0.0.1", "port": port, "db": 1, "password": None, "max_connections": None,
        "socket_timeout": None, "retry_on_timeout": False, "socket_connect_timeout": None, "client_name": None,
        "driver_info": DriverInfo().add_upstream_driver("celery", "5.7.0"), "lib_name": "redis-py(celery_v5.7.0)",
    }


def test_redis_py_defaults_of_manager_owned_options_are_accepted(manager: ManagerProcess, redis_server: RedisServer) -> None:
    pool = sharedpool.SharedConnectionPool(manager.socket_path, **_celery_like_options(redis_server.port))
    r = redis.Redis(connection_pool=pool)
    r.set("defaults:k", "v")
    assert r.get("defaults:k") == b"v"
    assert r.execute_command("CLIENT", "INFO").split()[0]  # the manager's connection answers
    assert manager.stats()["databases"]["1"]["open"] >= 1  # db 1, as the options said
    pool.disconnect()


def test_asyncio_pool_accepts_the_same_defaults(manager: ManagerProcess, redis_server: RedisServer) -> None:
    async def main() -> bytes | None:
        pool = sharedpool.asyncio.SharedConnectionPool(manager.socket_path, **_celery_like_options(redis_server.port))
        r = redis.asyncio.Redis(connection_pool=pool)
        await r.set("defaults:a", "w")
        value = await r.get("defaults:a")
        await pool.disconnect()
        return value

    assert asyncio.run(main()) == b"w"


@pytest.mark.parametrize(("option", "value"), [
    ("client_name", "mine"), ("password", "s3cretpw"), ("ssl", True), ("socket_keepalive_options", {1: 2}),
    ("username", "bob"),
])
def test_an_owned_option_that_differs_is_still_refused(manager: ManagerProcess, option: str, value: object) -> None:
    with pytest.raises(sharedpool.ConfigError, match=f"invalid {option}=.*manager owns") as caught:
        sharedpool.SharedConnectionPool(manager.socket_path, **{option: value})
    assert "s3cretpw" not in str(caught.value)


def test_host_and_port_of_another_redis_are_refused_at_first_lease(manager: ManagerProcess, redis_server: RedisServer) -> None:
    pool = sharedpool.SharedConnectionPool(manager.socket_path, manager_timeout=1, host="127.0.0.1", port=redis_server.port + 1)
    with pytest.raises(sharedpool.Misconfigured, match=f"names Redis at 127.0.0.1:{redis_server.port + 1}"):
        redis.Redis(connection_pool=pool).ping()
    same = sharedpool.SharedConnectionPool(manager.socket_path, host="localhost", port=redis_server.port)
    assert redis.Redis(connection_pool=same).ping()  # loopback names count as one
    same.disconnect()


# ----- sharedpool.Redis(connection_pool=...) ----------------------------------------------


def test_redis_shortcut_takes_a_connection_pool_as_redis_redis_does(manager: ManagerProcess) -> None:
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    r = sharedpool.Redis(connection_pool=pool)
    assert r.connection_pool is pool
    r.set("cp:k", "v")
    assert r.get("cp:k") == b"v"
    with pytest.raises(sharedpool.ConfigError, match="socket_path, acquire_timeout and manager_timeout are the pool's"):
        sharedpool.Redis(manager.socket_path, connection_pool=pool)
    pool.disconnect()


# ----- disconnect() ends leases in use ------------------------------------------------------


def test_disconnect_ends_leases_in_use_as_plain_redis_py(start_manager) -> None:
    manager = start_manager(max_connections=2, min_idle=1)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    r = redis.Redis(connection_pool=pool)
    pubsub = r.pubsub()
    pubsub.psubscribe("news.*")  # a lease held for as long as the subscription lives, as kombu's LISTEN
    assert pubsub.get_message(timeout=2)["type"] == "psubscribe"
    blocked = pool.get_connection()
    errors: list[BaseException] = []

    def wait_in_brpop() -> None:
        blocked.send_command("BRPOP", "disc:nothing", "30")
        try:
            blocked.read_response()
        except BaseException as exc:  # judged below: an error here would only be a thread warning
            errors.append(exc)

    reader = threading.Thread(target=wait_in_brpop)
    reader.start()
    wait_for(lambda: manager.stats()["leases"]["held"] == 2, what="two leases held")
    opened = manager.stats()["counters"]["connections_opened"]
    pool.disconnect()  # inuse_connections=True, redis-py's default
    reader.join(10)
    assert not reader.is_alive(), "a holder blocked in BRPOP must be woken, as on plain"
    assert errors and isinstance(errors[0], redis.ConnectionError), errors
    wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="both leases ended at once, not at garbage collection")
    wait_for(lambda: manager.stats()["counters"]["connections_opened"] >= opened + 1, what="the manager replaced them")
    # The holders go on as on plain redis-py: the next command takes a fresh lease.
    assert r.set("disc:after", "1") and r.get("disc:after") == b"1"
    pool.release(blocked)
    pubsub.close()
    pool.disconnect()


def test_disconnect_without_inuse_connections_leaves_leases_in_use(start_manager) -> None:
    manager = start_manager(max_connections=2, min_idle=1)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    conn = pool.get_connection()
    pool.disconnect(inuse_connections=False)
    assert manager.stats()["leases"]["held"] == 1
    conn.send_command("PING")
    assert conn.read_response() in (b"PONG", "PONG")
    pool.release(conn)
    wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="released")
    pool.disconnect()


def test_asyncio_disconnect_ends_leases_in_use_as_plain_redis_asyncio(start_manager) -> None:
    # redis-py's asyncio suite drops PubSubs unclosed and cleans up with the
    # pool's disconnect(): on plain that closes them; kept, their leases
    # piled up to the host's cap (PoolTimeout in later tests).
    manager = start_manager(max_connections=2, min_idle=1)

    async def scenario() -> None:
        pool = sharedpool.asyncio.SharedConnectionPool(manager.socket_path)
        r = redis.asyncio.Redis(connection_pool=pool)
        pubsub = r.pubsub()
        await pubsub.subscribe("news")
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        assert manager.stats()["leases"]["held"] == 1
        await pool.disconnect()  # inuse_connections=True, redis.asyncio's default
        wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="the PubSub's lease ended at once")
        # Its holder goes on as on plain: the next command takes a fresh lease.
        assert await r.set("adisc:after", "1") and await r.get("adisc:after") == b"1"
        await pubsub.aclose()
        await r.aclose()
        await pool.disconnect()

    asyncio.run(scenario())


def test_a_connection_redis_closed_while_idle_is_not_handed_out(start_manager, admin: redis.Redis) -> None:
    # redis-py's pool checks a connection it takes (can_read) and reconnects one
    # Redis closed meanwhile; the manager replaces such a one too, but a lease
    # taken before its turn must not get it (a Celery child's result store
    # failed so after CLIENT KILL).
    manager = start_manager(max_connections=2, min_idle=2)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    r = redis.Redis(connection_pool=pool)
    for _ in range(4):  # both slots cached in this process
        a, b = pool.get_connection(), pool.get_connection()
        assert a is not b
        pool.release(a)
        pool.release(b)
    for _ in range(20):
        for client in admin.client_list():
            if client["name"].startswith("sharedpool:"):
                admin.client_kill_filter(_id=client["id"])
        assert r.incr("idle:killed") >= 1  # at once, before the manager's replacement or not
    pool.disconnect()


# ----- no secret in any error ----------------------------------------------------------------

SECRET = "s3cretpw"
URLS = [
    f"redis://:{SECRET}@localhost:notaport/0",
    f"rediss://user:{SECRET}@localhost:notaport/0",
    f"rediss://:{SECRET}@localhost:6380/0?ssl_cert_reqs=sometimes&ssl_password={SECRET}",
    f"unix://:{SECRET}@/tmp/no.sock?db=x",
    f"unix:///tmp/no.sock?db=x&password={SECRET}",
    f"http://:{SECRET}@localhost:6379/0",
]


@pytest.mark.parametrize("url", URLS)
def test_a_refused_redis_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(sharedpool.ConfigError) as caught:
        sp_config.build(sp_config.ManagerConfig, environ={}, overrides={"redis_url": url})
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value.value)
    assert "://" not in str(caught.value) or "***" in str(caught.value)  # a URL shown is shown masked


OTHER_FIELDS = [
    ("max_connections", "many"), ("min_idle", "50"), ("databases", "0-x"), ("socket_mode", "777"),
    ("client_name", "a b"), ("acquire_timeout", "-1"), ("protocol", "4"), ("log_level", "LOUD"),
]


@pytest.mark.parametrize(("field", "value"), OTHER_FIELDS)
def test_every_config_error_with_a_password_set_is_masked(field: str, value: str) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:6379/3"
    with pytest.raises(sharedpool.ConfigError) as caught:
        sp_config.build(sp_config.ManagerConfig, environ={}, overrides={"redis_url": url, field: value})
    assert SECRET not in str(caught.value)
    config = sp_config.build(sp_config.ManagerConfig, environ={}, overrides={"redis_url": url, "databases": "3"})
    assert SECRET not in repr(config) and SECRET not in str(config.safe_dict())


# A worker's ssl_* options have no say (the manager verifies Redis): dropped, not refused.
@pytest.mark.parametrize("url", [url for url in URLS if "ssl_" not in url])
def test_client_urls_never_show_their_password(url: str) -> None:
    with pytest.raises(sharedpool.ConfigError) as caught:
        sharedpool.SharedConnectionPool.from_url(url)
    assert SECRET not in str(caught.value)


def test_serve_with_a_bad_url_prints_no_password(tmp_path) -> None:
    for url in URLS:
        done = subprocess.run(
            [sys.executable, "-m", "sharedpool", "serve", "--socket-path", str(tmp_path / "sp.sock")],
            env={**_env(), "SHAREDPOOL_REDIS_URL": url}, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode != 0, url
        assert SECRET not in done.stderr + done.stdout, url
        assert "://" not in done.stderr or "***" in done.stderr, done.stderr


def _env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if not key.startswith("SHAREDPOOL_")}


# ----- waiters beat idle floors --------------------------------------------------------------


def test_a_waiting_database_gets_the_idle_floor_of_another_then_the_floor_refills(start_manager) -> None:
    # Seen with Celery: "3 of 4 leased, 4 waiting" on db 1 while db 0 kept its min_idle one idle.
    manager = start_manager(max_connections=2, min_idle=1, reap_interval=0.2)
    wait_for(lambda: manager.stats()["databases"]["0"]["idle"] == 1, what="db 0's min_idle connection")
    one = sharedpool.SharedConnectionPool(manager.socket_path, db=1, acquire_timeout=3)
    first = one.get_connection()  # db 1 opens the second and last connection
    second = one.get_connection()  # none free under the cap: db 0's floor must be lent, within acquire_timeout
    assert manager.stats()["databases"]["1"]["held"] == 2
    assert manager.stats()["counters"]["connections_rebound"] >= 1
    one.release(first)
    one.release(second)
    # The pressure is gone: db 0's floor is back within a few sweeps, without idle_timeout.
    wait_for(lambda: manager.stats()["databases"]["0"]["idle"] == 1, timeout=10, what="db 0's min_idle refilled")
    assert manager.stats()["connections"]["open"] <= 2
    one.disconnect()
