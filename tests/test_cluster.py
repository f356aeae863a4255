"""A manager serving a real Redis Cluster (3 primaries on loopback, slots assigned here),
and fleets of worker processes using sharedpool.RedisCluster with keys across all slots,
every reply checked: the cap per node, a slot migrated mid-run, a primary SIGKILLed and
its replica promoted, a holder SIGKILLed mid-command, a non-cluster Redis refused."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from typing import Any

import multiprocess
import pytest
import redis
from support.cluster_fleet import Fleet, Seen, assert_all_right, kill_holder_mid_blpop, mixed_reads, queue_mixed, sample_peaks
from support.waiting import wait_for

import sharedpool
from sharedpool.dev.cluster import LocalCluster
from sharedpool.manager.cluster import FoundNode, NodeMap, parse_shards, parse_slots

ctx = multiprocess.get_context("fork")


def _fleet_worker(socket_path: str, tag: str, worker: int, stop: Any, results: Any, keys: int) -> None:
    """Writes and reads back keys spread over every slot until ``stop``; reports what it saw."""
    r = sharedpool.RedisCluster(socket_path, decode_responses=True, acquire_timeout=20)
    seen = Seen(worker)
    i = 0
    while not stop.is_set():
        i += 1
        key = f"{tag}:{worker}:{i % keys}"
        value = f"{worker}-{i}"
        try:
            if i % 3 == 0:
                seen.check(key, [value] * 3, mixed_reads(queue_mixed(r.pipeline(), key, value).execute()))
            else:
                r.set(key, value)
                seen.check(key, value, r.get(key))
        except Exception as exc:
            seen.failed(key, value, exc)
    r.close()
    results.put(seen.report())


def _fleet(socket_path: str, workers: int, keys: int = 2000) -> Fleet:
    return Fleet(_fleet_worker, socket_path, workers, keys)


def _lost_write(entry: tuple[float, str, Any, Any]) -> bool:
    """A read that shows a write lost in a failover (Redis Cluster replicates asynchronously:
    an acknowledged write on a primary killed before its replica got it is gone): nothing, or
    an older value this worker wrote to this key. Anything else (another key's value, another
    command's reply) would be a stale reply."""
    _when, _key, wrote, read = entry
    if isinstance(wrote, list) and isinstance(read, list) and len(read) == len(wrote):
        pairs = list(zip(wrote, read, strict=True))
    else:
        pairs = [(wrote, read)]
    for expected, got in pairs:
        if got == expected or got is None:
            continue
        worker, _, n = str(expected).partition("-")
        got_worker, _, got_n = str(got).partition("-")
        if not (got_worker == worker and got_n.isdigit() and int(got_n) < int(n)):
            return False
    return True


def test_node_lists_parse_and_numbers_stay_put() -> None:
    shards = [{"slots": [0, 99, 200, 300], "nodes": [
        {"ip": "127.0.0.1", "endpoint": "127.0.0.1", "port": 7001, "role": "master", "health": "online"},
        {"ip": "127.0.0.1", "endpoint": "127.0.0.1", "port": 7004, "role": "replica", "health": "online"},
        {"ip": "127.0.0.1", "endpoint": "127.0.0.1", "port": 7007, "role": "replica", "health": "failed"}]}]
    assert parse_shards(shards) == [FoundNode("127.0.0.1:7001", "primary", ((0, 99), (200, 300))),
                                    FoundNode("127.0.0.1:7004", "replica", (), "127.0.0.1:7001")]
    slots = [[0, 99, [b"127.0.0.1", 7001, b"id"], [b"127.0.0.1", 7004, b"id2"]], [100, 200, [b"127.0.0.1", 7002, b"x"]]]
    assert [(n.addr, n.role) for n in parse_slots(slots)] == [
        ("127.0.0.1:7001", "primary"), ("127.0.0.1:7002", "primary"), ("127.0.0.1:7004", "replica")]
    numbers = NodeMap()
    assert numbers.apply(parse_slots(slots))
    first = {n["addr"]: n["index"] for n in numbers.describe()}
    assert not numbers.apply(parse_slots(slots))
    # The replica promoted and a node gone: numbers are kept, the gone one is not reused.
    assert numbers.apply([FoundNode("127.0.0.1:7004", "primary", ((0, 99),)), FoundNode("127.0.0.1:7009", "primary")])
    after = {n["addr"]: n["index"] for n in numbers.describe()}
    assert after["127.0.0.1:7004"] == first["127.0.0.1:7004"]
    assert after["127.0.0.1:7009"] not in first.values()


def test_a_fleet_across_all_slots_stays_within_the_caps(cluster: LocalCluster, cluster_manager: Any) -> None:
    manager = cluster_manager(max_connections=5, max_connections_per_node=2, acquire_timeout=20)
    with _fleet(manager.socket_path, workers=6) as fleet:
        peak, total_peak = sample_peaks(cluster, manager, 3.0)
        results = fleet.finish()
    assert_all_right(results, 20)
    assert all(1 <= count <= 2 for count in peak.values()), peak  # every primary used, none above its cap
    assert 3 <= total_peak <= 5
    stats = manager.stats()
    assert {n["role"] for n in stats["cluster"]["nodes"]} == {"primary"}
    assert len(stats["cluster"]["nodes"]) == 3
    # Every key is where the cluster routes it: the fleet wrote to all three primaries.
    for port in cluster.primary_ports():
        with cluster.client(port) as c:
            assert c.dbsize() > 0


def test_clients_keep_working_while_a_slot_migrates(cluster: LocalCluster, cluster_manager: Any) -> None:
    manager = cluster_manager(max_connections=6, acquire_timeout=20)
    with _fleet(manager.socket_path, workers=4, keys=50) as fleet:
        # Put keys in the slot to move, then move it while the fleet writes to it.
        key = f"{fleet.tag}:0:1"
        slot = redis.cluster.key_slot(key.encode())
        source = cluster.owner_of(slot)
        target = next(p for p in cluster.primary_ports() if p != source)
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > 200, 20, "the fleet under way")
        moved_keys = cluster.migrate_slot(slot, target, between=lambda: time.sleep(0.3))
        assert cluster.owner_of(slot) == target
        before = manager.stats()["counters"]["leases_granted"]
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > before + 200, 20, "work after the migration")
        # The manager's view followed (a client's report, or its own refresh).
        wait_for(lambda: any([slot, slot] in [list(r) for r in n["slots"]] or any(
            a <= slot <= b for a, b in n["slots"]) for n in manager.stats()["cluster"]["nodes"]
            if n["addr"].endswith(f":{target}")), 10, "the manager's node list showing the move")
        results = fleet.finish()
    assert moved_keys > 0
    assert_all_right(results, 0)
    with cluster.client(target) as c:
        assert c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) > 0


def test_work_resumes_after_a_primary_is_killed_and_its_replica_promoted(cluster_manager: Any, start_manager: Any) -> None:
    with LocalCluster(primaries=3, replicas=1) as own:
        manager = start_manager(redis_url=own.seed_url, cluster=True, min_idle=0, cluster_refresh_interval=0.5,
                                max_connections=8, acquire_timeout=10, redis_timeout=1)
        with _fleet(manager.socket_path, workers=4) as fleet:
            wait_for(lambda: manager.stats()["counters"]["leases_granted"] > 300, 20, "the fleet under way")
            victim = own.primary_ports()[0]
            replica = own.replica_of(victim)
            own.kill(victim)
            killed_at = time.time()
            own.failover(replica)
            promoted_at = time.time()
            wait_for(lambda: any(n["addr"].endswith(f":{replica}") and n["role"] == "primary"
                                 for n in manager.stats()["cluster"]["nodes"]), 15, "the manager seeing the new primary")
            before = manager.stats()["counters"]["leases_granted"]
            wait_for(lambda: manager.stats()["counters"]["leases_granted"] > before + 300, 30, "work after the failover")
            # Work goes on after the failover, on every worker, for a while.
            resumed_at = time.time()
            wait_for(lambda: manager.stats()["counters"]["leases_granted"] > before + 600, 30, "more work")
            results = fleet.finish()
        wrong = [tuple(w) for r in results for w in r["wrong"]]
        assert [w for w in wrong if not _lost_write(w)] == [], "stale replies"
        # Lost writes only around the failover.
        assert [w for w in wrong if not killed_at - 0.05 <= w[0] <= promoted_at + 3.0] == []
        # README: errors end within 3 s of the promotion (about 0.5 s here).
        late = [(t, e) for r in results for t, e in r["errors"] if t > min(resumed_at, promoted_at + 3.0)]
        assert late == [], late[:5]
        early = [(t, e) for r in results for t, e in r["errors"] if t < killed_at - 0.05]
        assert early == [], early[:5]
        assert all(r["last_ok"] > promoted_at for r in results)


def _hold_mid_command(socket_path: str, key: str, ready: Any) -> None:
    r = sharedpool.RedisCluster(socket_path, decode_responses=True, acquire_timeout=10)
    r.set(f"{key}:other", "mine")
    ready.set()
    r.blpop([key], timeout=30)  # SIGKILLed while Redis holds this reply back


def test_a_holder_killed_mid_command_leaves_no_stale_reply(cluster: LocalCluster, cluster_manager: Any) -> None:
    manager = cluster_manager(max_connections=3, max_connections_per_node=1, acquire_timeout=20)
    key = f"{{kill-{uuid.uuid4().hex[:8]}}}"  # a hash tag: every key below is on one node
    kill_holder_mid_blpop(cluster, _hold_mid_command, manager.socket_path, key)
    r = sharedpool.RedisCluster(manager.socket_path, decode_responses=True, acquire_timeout=20)
    try:
        for _ in range(20):
            # The node's only connection is the one the dead holder had, or its replacement.
            assert r.get(key + ":probe") == "fresh"
            assert r.lrange(key, 0, -1) in (["for-the-dead"], [])
    finally:
        r.close()
    counters = wait_for(lambda: (c := manager.stats()["counters"])["reaped_holder_closed"] >= 1 and c, 10, "the reap")
    assert counters["reaped_holder_closed"] >= 1


def test_cluster_mode_against_a_plain_redis_is_refused_in_one_line(redis_server: Any, tmp_path: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sharedpool", "serve", "--cluster", "--redis-url", redis_server.url,
         "--socket-path", str(tmp_path / "sp.sock")],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "not a cluster node" in lines[0], result.stderr


@pytest.mark.parametrize(("settings", "field"), [
    ({"redis_url": "unix:///tmp/r.sock"}, "redis_url"),
    ({"redis_url": "redis://127.0.0.1:7000/3"}, "redis_url"),
    ({"databases": (0, 1)}, "databases"),
    ({"max_connections_per_database": 2}, "max_connections_per_database"),
    ({"sentinels": (("127.0.0.1", 26379),), "sentinel_service": "mymaster"}, "cluster"),
])
def test_cluster_settings_that_cannot_apply_are_refused_by_name(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(sharedpool.ConfigError) as refused:
        sharedpool.ManagerConfig(cluster=True, **settings)
    assert field in str(refused.value)


def test_the_client_refuses_to_be_told_where_the_cluster_is() -> None:
    with pytest.raises(sharedpool.ConfigError, match="host"):
        sharedpool.RedisCluster("/nonexistent/sp.sock", host="127.0.0.1")


def test_a_manager_whose_seed_is_down_still_starts_and_clients_get_a_connection_error(start_manager: Any) -> None:
    from sharedpool.dev.cluster import cluster_port

    port = cluster_port()
    manager = start_manager(redis_url=f"redis://127.0.0.1:{port}/0", cluster=True, min_idle=0,
                            cluster_refresh_interval=0.2, redis_timeout=1)
    with pytest.raises(sharedpool.RedisUnavailable, match="no cluster primary"):
        sharedpool.RedisCluster(manager.socket_path)
    assert manager.stats()["cluster"]["nodes"] == []
