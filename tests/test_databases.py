"""Several databases on one manager, with real processes: the global cap,
each database's keys where they belong, rebinding, per-database stats, a
refused database, subscribers that outlive the leak and revoke limits, and
the connections' CLIENT SETNAME."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import multiprocess
import pytest
import redis
from support.mix import checked_round_trip
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool
from sharedpool import errors

ctx = multiprocess.get_context("fork")

DATABASES = (0, 1, 2)


def _use_every_database(socket_path: str, worker: int, rounds: int, tag: str, results: multiprocess.Queue) -> None:
    """One client per database in one process, used in turns and from threads at once."""
    clients = {db: sharedpool.Redis(socket_path=socket_path, db=db, decode_responses=True, acquire_timeout=30)
               for db in DATABASES}

    def body(thread: int) -> list[str]:
        failures = []
        for i in range(rounds):
            db = DATABASES[(i + thread) % len(DATABASES)]
            # The value names its database: a read from the wrong one cannot match.
            failure = checked_round_trip(clients[db], f"{tag}:{db}:{worker}:{thread}:{i}", f"db{db}-{worker}-{thread}-{i}", i)
            if failure:
                failures.append(failure)
        return failures

    with ThreadPoolExecutor(3) as threads:
        results.put([failure for failures in threads.map(body, range(3)) for failure in failures])


def test_workers_use_three_databases_at_once_within_the_global_cap(start_manager, redis_server) -> None:
    manager = start_manager(databases="0-2", max_connections=3, min_idle=0, acquire_timeout=30)
    admin = redis_server.client(decode_responses=True)
    tag = f"dbs-{uuid.uuid4().hex}"
    results = ctx.Queue()
    workers = [ctx.Process(target=_use_every_database, args=(manager.socket_path, w, 40, tag, results)) for w in range(4)]
    for worker in workers:
        worker.start()
    peak = 0
    while any(worker.is_alive() for worker in workers):
        peak = max(peak, len(manager_clients(admin, manager.pool_name)))
        time.sleep(0.005)
    failures = [failure for _ in workers for failure in results.get(timeout=30)]
    for worker in workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0
    assert failures == []
    assert 1 <= peak <= 3, f"{peak} connections of the manager at once, max_connections=3"
    for db in DATABASES:
        plain = redis_server.client(db=db, decode_responses=True)
        found = plain.keys(f"{tag}:*")
        assert len(found) == 4 * 3 * 40 // len(DATABASES), (db, len(found))
        assert all(key.startswith(f"{tag}:{db}:") for key in found), f"db {db} holds keys of another db"
        assert all(plain.get(key).startswith(f"db{db}-") for key in found[:20])
        plain.close()
    admin.close()


def test_an_idle_connection_is_rebound_to_a_waiting_database(start_manager, redis_server) -> None:
    manager = start_manager(databases="0-2", max_connections=2, min_idle=0, reap_interval=5)
    admin = redis_server.client(decode_responses=True)
    zero = sharedpool.SharedConnectionPool(socket_path=manager.socket_path, db=0)
    taken = [zero.get_connection("GET") for _ in range(2)]
    for conn in taken:
        zero.release(conn)
    assert len(manager_clients(admin, manager.pool_name)) == 2  # the cap, both idle and of db 0
    two = sharedpool.Redis(socket_path=manager.socket_path, db=2, decode_responses=True, acquire_timeout=5)
    key = f"rebound:{uuid.uuid4().hex}"
    started = time.monotonic()
    two.set(key, "in db 2")
    # A DEMAND that finds nothing to open rebinds at once, not at the next sweep (5 s).
    assert time.monotonic() - started < 2.5
    assert redis_server.client(db=2).get(key) == b"in db 2"
    assert redis_server.client(db=0).get(key) is None
    stats = manager.stats()
    assert stats["counters"]["connections_rebound"] >= 1
    assert len(manager_clients(admin, manager.pool_name)) <= 2
    assert stats["databases"]["2"]["open"] >= 1
    # db 0 still works, on what is left or by rebinding back.
    r0 = sharedpool.Redis(socket_path=manager.socket_path, db=0, decode_responses=True)
    r0.set(key, "in db 0")
    assert redis_server.client(db=0).get(key) == b"in db 0" and redis_server.client(db=2).get(key) == b"in db 2"
    for client in (two, r0):
        client.close()
    zero.disconnect()
    admin.close()


def test_stats_show_each_database(start_manager) -> None:
    manager = start_manager(databases="0,1,5", max_connections=4, min_idle=1)
    pools = {db: sharedpool.SharedConnectionPool(socket_path=manager.socket_path, db=db) for db in (1, 5)}
    held = {db: pool.get_connection("GET") for db, pool in pools.items()}
    stats: dict[str, Any] = wait_for(
        lambda: (s := manager.stats())["databases"].get("0", {}).get("idle") == 1 and s,
        what="db 0's min_idle connection",
    )
    assert stats["databases_served"] == "0-1,5" and stats["default_db"] == 0
    for db in ("1", "5"):
        assert stats["databases"][db]["held"] == 1 and stats["databases"][db]["open"] >= 1, stats["databases"]
    assert stats["leases"]["held"] == 2
    from sharedpool.cli import format_stats

    table = format_stats(stats)
    assert "served 0-1,5" in table and "subscribers" in table
    from sharedpool.metrics import render_prometheus

    metrics = render_prometheus(stats)
    for db in ("1", "5"):
        line = f'sharedpool_database_connections{{pool="{manager.pool_name}",db="{db}",state="held"}} 1'
        assert line in metrics, metrics
    for db, conn in held.items():
        pools[db].release(conn)
        pools[db].disconnect()


def test_a_database_not_served_is_refused_naming_what_is(start_manager) -> None:
    manager = start_manager(databases="0-2", max_connections=2)
    client = sharedpool.Redis(socket_path=manager.socket_path, db=7)
    with pytest.raises(errors.DatabaseNotServed) as refused:
        client.ping()
    assert not isinstance(refused.value, redis.ConnectionError)
    assert isinstance(refused.value, errors.Misconfigured)
    text = str(refused.value)
    assert "db 7" in text and "0-2" in text and "--databases" in text, text
    client.close()


def test_a_subscriber_outlives_leak_threshold_and_max_lease_time(start_manager, redis_server) -> None:
    manager = start_manager(max_connections=3, leak_threshold=0.5, max_lease_time=1.0, reap_interval=0.1)
    channel = f"news-{uuid.uuid4().hex}"
    subscriber = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
    pubsub = subscriber.pubsub()
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    wait_for(lambda: manager.stats()["subscribers"] == 1, what="the lease marked as a subscriber")
    subscribed_at = time.monotonic()
    publisher = redis_server.client(decode_responses=True)

    def received_late() -> bool:
        # Publish until a message sent after both limits arrives.
        late = time.monotonic() - subscribed_at > 2.0
        publisher.publish(channel, "late" if late else "early")
        message = pubsub.get_message(timeout=0.2)
        return bool(message and message["type"] == "message" and message["data"] == "late")

    wait_for(received_late, timeout=15, what="a message published after max_lease_time")
    stats = manager.stats()
    assert stats["databases"]["0"]["subscribers"] == 1
    assert stats["counters"]["leak_warnings"] == 0 and stats["counters"]["reaped_revoked"] == 0
    log = Path(manager.log_path).read_text()
    assert "possible leak" not in log and "revoked lease" not in log
    pubsub.close()
    # Given back, it subscribes no more.
    wait_for(lambda: manager.stats()["subscribers"] == 0, what="the subscriber flag cleared")
    publisher.close()
    subscriber.close()


@pytest.mark.parametrize(("template", "expected"), [("app-{db}-{slot}", "app-1-"), ("", None)])
def test_client_name_sets_or_drops_the_connections_name(start_manager, redis_server, template: str, expected: str | None) -> None:
    manager = start_manager(databases="0-1", max_connections=2, min_idle=0, client_name=template)
    client = sharedpool.Redis(socket_path=manager.socket_path, db=1)
    assert client.client_getname() == (expected + "0" if expected else None)
    client.close()
