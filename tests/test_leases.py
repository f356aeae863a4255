"""Lease semantics seen from one process: fd caching, outcomes, resets."""

from __future__ import annotations

import uuid

import pytest
import redis
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool
from sharedpool.dev.launch import ManagerProcess


def test_second_lease_of_a_slot_moves_no_fd(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    first = pool.get_connection()
    pool.release(first)
    sent = manager.stats()["counters"]["fds_sent"]
    assert sent == 1
    second = pool.get_connection()
    assert second is first  # the same connection object, not rebuilt
    pool.release(second)
    for _ in range(20):
        pool.release(pool.get_connection())
    assert manager.stats()["counters"]["fds_sent"] == 1
    pool.disconnect()


def test_exception_inside_pipeline_discards_the_connection(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    r = sharedpool.Redis(socket_path=manager.socket_path)
    first_id = r.client_id()

    class Boom(Exception):
        pass

    def explode(*args: object, **kwargs: object) -> None:
        raise Boom()

    pipe = r.pipeline(transaction=False)
    pipe.set("x", 1).get("x")
    original = pipe.parse_response
    pipe.parse_response = explode  # fails after the commands were sent, before replies are read
    with pytest.raises(Boom):
        pipe.execute()
    pipe.parse_response = original
    wait_for(lambda: manager.stats()["counters"]["reaped_broken"] == 1, what="broken release counted")
    assert r.client_id() != first_id  # a new connection, not the one with unread replies
    wait_for(
        lambda: first_id not in {int(c["id"]) for c in manager_clients(admin, manager.pool_name)}, what="old connection closed"
    )
    r.close()


def test_select_inside_a_lease_does_not_leak_into_the_next(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
    k = f"k:{uuid.uuid4().hex}"
    with r.lease() as pinned:
        pinned.execute_command("SELECT", 5)
        pinned.set(k, "in db 5")
    assert r.get(k) is None
    assert r.execute_command("CLIENT", "INFO").split(" db=")[1].startswith("0 ")
    with r.lease() as pinned:
        pinned.execute_command("SELECT", 5)
        assert pinned.get(k) == "in db 5"
        pinned.delete(k)
    assert manager.stats()["counters"]["connections_reset"] == 2
    r.close()


def test_unread_reply_marks_the_lease_broken(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    conn = pool.get_connection()
    conn.send_command("ECHO", "meant for the first holder")
    pool.release(conn)  # reply never read
    r = redis.Redis(connection_pool=pool)
    assert r.echo("second") == b"second"
    assert manager.stats()["counters"]["reaped_broken"] == 1
    pool.disconnect()


def test_double_release_is_a_clear_error(manager: ManagerProcess) -> None:
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    conn = pool.get_connection()
    pool.release(conn)
    with pytest.raises(sharedpool.LeaseError, match="released twice"):
        pool.release(conn)
    pool.disconnect()


def test_pool_timeout_names_pool_and_pressure(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    pool = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=0.3)
    held = pool.get_connection()
    other = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=0.3)
    with pytest.raises(sharedpool.PoolTimeout) as caught:
        other.get_connection()
    assert isinstance(caught.value, redis.TimeoutError)
    assert f"no lease from pool '{manager.pool_name}' within 0.30 s (1 of 1 connections leased, 0 waiting)" == str(caught.value)
    pool.release(held)
    other.release(other.get_connection())
    pool.disconnect()
    other.disconnect()


def test_max_waiting_refuses_at_once(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1, max_waiting=0)
    # With max_waiting=0 even the wait for a connection being opened is refused.
    wait_for(lambda: manager.stats()["connections"]["idle"] == 1, what="the min_idle connection")
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    held = pool.get_connection()
    other = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=30)
    with pytest.raises(sharedpool.PoolFull, match="max_waiting=0"):
        other.get_connection()
    pool.release(held)
    pool.disconnect()
    other.disconnect()


def test_no_manager_raises_manager_unavailable_naming_the_path(tmp_path) -> None:
    path = str(tmp_path / "nobody.sock")
    r = sharedpool.Redis(socket_path=path, manager_timeout=0)
    with pytest.raises(sharedpool.ManagerUnavailable, match=f"no sharedpool manager at {path}") as caught:
        r.ping()
    assert isinstance(caught.value, redis.ConnectionError)


def test_manager_owned_options_are_refused(manager: ManagerProcess) -> None:
    with pytest.raises(ValueError, match="invalid password=.*manager owns"):
        sharedpool.Redis(socket_path=manager.socket_path, password="secret")


def test_db_and_protocol_mismatch_are_clear_errors(manager: ManagerProcess) -> None:
    with pytest.raises(sharedpool.DatabaseNotServed, match="serves databases 0-15 .default 0., not db 20"):
        sharedpool.Redis(socket_path=manager.socket_path, db=20).ping()
    with pytest.raises(sharedpool.ProtocolMismatch, match="RESP3, this client expects RESP2"):
        sharedpool.Redis(socket_path=manager.socket_path, protocol=2).ping()


def test_resp2_manager_serves_resp2_clients(start_manager) -> None:
    manager = start_manager(max_connections=1, protocol=2)
    r = sharedpool.Redis(socket_path=manager.socket_path, protocol=2, decode_responses=True)
    r.hset("h2", mapping={"a": "1"})
    assert r.hgetall("h2") == {"a": "1"}
    r.close()


def test_reply_in_flight_after_a_reconnect_is_never_handed_on(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    r = redis.Redis(connection_pool=pool)
    r.set("inflight:b", "value-of-b")
    conn = pool.get_connection()
    conn.disconnect()  # as redis-py does after an error: the next send takes a new lease
    conn.send_command("BLPOP", "inflight:nolist", "0.3")  # a reply that arrives late
    pool.release(conn)  # never read
    assert r.get("inflight:b") == b"value-of-b"
    assert manager.stats()["counters"]["reaped_broken"] == 2
    pool.disconnect()
