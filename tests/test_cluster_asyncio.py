"""sharedpool.asyncio.RedisCluster on a real 3-primary Redis Cluster on loopback, and replica
reads (``read_from_replicas``) through both clients: fleets of asyncio worker processes with
keys across every slot, every reply checked; the cap per node, a slot migrated mid-run,
cancellation storms, a holder SIGKILLed mid-command, a plain redis.asyncio cluster client in
the same process left as it was, and the paths we do not serve refused by name."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import multiprocess
import pytest
import redis
import redis.asyncio.cluster
from redis.cluster import LoadBalancingStrategy
from support.cluster_fleet import Fleet, Seen, assert_all_right, kill_holder_mid_blpop, mixed_reads, queue_mixed, sample_peaks
from support.waiting import wait_for

import sharedpool
import sharedpool.asyncio
from sharedpool.dev.cluster import LocalCluster

ctx = multiprocess.get_context("fork")


async def _task_loop(r: Any, tag: str, worker: int, task: int, stop: Any, seen: Seen, keys: int) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        key = f"{tag}:{worker}:{task}:{i % keys}"
        value = f"{worker}-{task}-{i}"
        try:
            if i % 3 == 0:
                replies = await queue_mixed(r.pipeline(transaction=False), key, value).execute()
                seen.check(key, [value] * 3, mixed_reads(replies))
            else:
                await r.set(key, value)
                seen.check(key, value, await r.get(key))
        except Exception as exc:
            seen.failed(key, value, exc)


def _async_fleet_worker(socket_path: str, tag: str, worker: int, stop: Any, results: Any, keys: int, tasks: int) -> None:
    seen = Seen(worker)

    async def main() -> None:
        r = sharedpool.asyncio.RedisCluster(socket_path, decode_responses=True, acquire_timeout=20)
        try:
            await asyncio.gather(*(_task_loop(r, tag, worker, t, stop, seen, keys) for t in range(tasks)))
        finally:
            await r.aclose()

    asyncio.run(main())
    results.put(seen.report())


def _async_fleet(socket_path: str, workers: int, tasks: int = 8, keys: int = 200) -> Fleet:
    return Fleet(_async_fleet_worker, socket_path, workers, keys, tasks)


def test_an_asyncio_fleet_across_all_slots_stays_within_the_caps(cluster: LocalCluster, cluster_manager: Any) -> None:
    manager = cluster_manager(max_connections=5, max_connections_per_node=2, acquire_timeout=20)
    with _async_fleet(manager.socket_path, workers=3, tasks=8) as fleet:
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > 300, 30, "the fleet under way")
        peak, total_peak = sample_peaks(cluster, manager, 2.0)
        results = fleet.finish()
    assert_all_right(results, 50)
    assert all(1 <= count <= 2 for count in peak.values()), peak  # every primary used, none above its cap
    assert 3 <= total_peak <= 5
    # 3 workers x 8 tasks x 3 nodes, and no connection of their own: only the manager's reached Redis.
    for port in cluster.primary_ports():
        with cluster.client(port) as c:
            others = [x for x in c.client_list() if not x.get("name", "").startswith("sharedpool:") and x["cmd"] != "client|list"]
            assert [x for x in others if "cluster" not in x.get("flags", "")] == []


def test_asyncio_clients_keep_working_while_a_slot_migrates(cluster: LocalCluster, cluster_manager: Any) -> None:
    manager = cluster_manager(max_connections=6, acquire_timeout=20)
    with _async_fleet(manager.socket_path, workers=2, tasks=6, keys=20) as fleet:
        key = f"{fleet.tag}:0:0:1"
        slot = redis.cluster.key_slot(key.encode())
        source = cluster.owner_of(slot)
        target = next(p for p in cluster.primary_ports() if p != source)
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > 300, 30, "the fleet under way")
        moved_keys = cluster.migrate_slot(slot, target, between=lambda: time.sleep(0.3))
        assert cluster.owner_of(slot) == target
        before = manager.stats()["counters"]["leases_granted"]
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > before + 300, 20, "work after the migration")
        results = fleet.finish()
    assert moved_keys > 0
    assert_all_right(results, 0)
    with cluster.client(target) as c:
        assert c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) > 0


def test_cancellation_storms_leave_every_reply_right_and_no_lease_held(cluster: LocalCluster, cluster_manager: Any) -> None:
    manager = cluster_manager(max_connections=3, max_connections_per_node=1, acquire_timeout=20)
    tag = f"cancel-{uuid.uuid4().hex[:8]}"
    rng = random.Random(7)

    async def main() -> tuple[list[Any], int]:
        r = sharedpool.asyncio.RedisCluster(manager.socket_path, decode_responses=True, acquire_timeout=20)
        wrong: list[Any] = []
        attempted: dict[str, int] = {}  # per key: the highest sequence number a SET of it was sent with
        written: dict[str, int] = {}  # per key: the highest one whose SET completed
        completed = 0

        async def own_key(n: int) -> None:
            nonlocal completed
            key = f"{tag}:{n}"  # one task per key: only this task writes it
            task = asyncio.current_task()
            assert task is not None
            seq = attempted.get(key, 0)
            # redis.asyncio itself may finish a command it was cancelled in and return
            # normally (the cancellation then stays pending, as plain redis.asyncio does it):
            # the task stops at its next command, instead of running on.
            while not task.cancelling():
                seq += 1
                attempted[key] = seq
                await r.set(key, str(seq))
                written[key] = seq
                got = await r.get(key)
                # A read comes after this task's last completed write; a cancelled SET
                # may or may not have landed. Anything else is someone else's reply.
                if got is None or not written[key] <= int(got) <= attempted[key]:
                    wrong.append((key, written[key], attempted[key], got))
                completed += 1

        try:
            # Rounds until enough commands completed between the cancellations (fewer a round on a loaded machine).
            for _round in range(100):
                if completed >= 300:
                    break
                tasks = [asyncio.ensure_future(own_key(n)) for n in range(60)]
                loop = asyncio.get_running_loop()
                for task in tasks:
                    loop.call_later(rng.uniform(0.0, 0.15), task.cancel)
                await asyncio.gather(*tasks, return_exceptions=True)
            # After the storms: every key reads as what was last written or attempted.
            for key, seq in written.items():
                got = await r.get(key)
                if got is None or not seq <= int(got) <= attempted[key]:
                    wrong.append((key, seq, attempted[key], got))
        finally:
            await r.aclose()
        return wrong, completed

    wrong, completed = asyncio.run(main())
    assert wrong == []
    assert completed >= 300
    stats = wait_for(lambda: (s := manager.stats())["connections"]["leased"] == 0 and s, 10, "every lease given back")
    assert stats["connections"]["open"] <= 3


def test_a_plain_redis_asyncio_cluster_in_the_same_process_is_left_as_it_was(cluster: LocalCluster, cluster_manager: Any) -> None:
    manager = cluster_manager(max_connections=3)

    async def main() -> tuple[Any, Any, int]:
        shared = sharedpool.asyncio.RedisCluster(manager.socket_path)
        await shared.set("mine:shared", "1")
        plain = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster.primary_ports()[0], client_name="plainone")
        try:
            await plain.set("mine:plain", "2")
            got = await plain.get("mine:plain"), await shared.get("mine:plain")
            # Plain's connections are its own: a CLIENT LIST entry named by it, on the node it used.
            node = plain.get_node_from_key("mine:plain")
            with cluster.client(int(node.port)) as c:
                named = len([x for x in c.client_list() if x.get("name") == "plainone"])
            return got[0], got[1], named
        finally:
            await plain.aclose()
            await shared.aclose()

    plain_got, shared_got, named = asyncio.run(main())
    assert plain_got == shared_got == b"2"
    assert named >= 1


def test_transactions_and_pubsub_are_refused_by_name_and_hold_nothing(cluster: LocalCluster, cluster_manager: Any) -> None:
    manager = cluster_manager(max_connections=3)

    async def main() -> list[str]:
        r = sharedpool.asyncio.RedisCluster(manager.socket_path, decode_responses=True)
        refused = []
        try:
            pipe = r.pipeline(transaction=True)
            pipe.set("{t}a", "1").get("{t}a")
            with pytest.raises(sharedpool.LeaseError) as tx:
                await pipe.execute()
            refused.append(str(tx.value))
            pubsub = r.pubsub()
            with pytest.raises(sharedpool.LeaseError) as sub:
                await pubsub.subscribe("news")
            refused.append(str(sub.value))
            await pubsub.aclose()
            assert await r.set("{t}a", "2") and await r.get("{t}a") == "2"  # and the client goes on
        finally:
            await r.aclose()
        return refused

    for message in asyncio.run(main()):
        assert "sync sharedpool.RedisCluster" in message
    wait_for(lambda: manager.stats()["connections"]["leased"] == 0, 10, "no lease held")


def _hold_mid_command_async(socket_path: str, key: str, ready: Any) -> None:
    async def main() -> None:
        r = sharedpool.asyncio.RedisCluster(socket_path, decode_responses=True, acquire_timeout=10)
        await r.set(f"{key}:other", "mine")
        ready.set()
        await r.blpop([key], timeout=30)  # SIGKILLed while Redis holds this reply back

    asyncio.run(main())


def test_an_asyncio_holder_killed_mid_command_leaves_no_stale_reply(cluster: LocalCluster, cluster_manager: Any) -> None:
    manager = cluster_manager(max_connections=3, max_connections_per_node=1, acquire_timeout=20)
    key = f"{{akill-{uuid.uuid4().hex[:8]}}}"
    kill_holder_mid_blpop(cluster, _hold_mid_command_async, manager.socket_path, key)

    async def reads() -> list[Any]:
        r = sharedpool.asyncio.RedisCluster(manager.socket_path, decode_responses=True, acquire_timeout=20)
        try:
            return [(await r.get(key + ":probe"), await r.lrange(key, 0, -1)) for _ in range(20)]
        finally:
            await r.aclose()

    for probe, listed in asyncio.run(reads()):
        assert probe == "fresh"
        assert listed in (["for-the-dead"], [])
    wait_for(lambda: manager.stats()["counters"]["reaped_holder_closed"] >= 1, 10, "the reap")


def test_the_asyncio_client_refuses_to_be_told_where_the_cluster_is() -> None:
    with pytest.raises(sharedpool.ConfigError, match="startup_nodes"):
        sharedpool.asyncio.RedisCluster("/nonexistent/sp.sock", startup_nodes=[])


def test_a_cluster_node_class_another_library_put_in_place_is_refused_and_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another library replaced redis.asyncio's ClusterNode first: ours cannot lease its
    connections, so the client says so by name before it opens anything (no manager
    at this path: a ManagerUnavailable would mean it tried), and theirs stays in place."""
    from sharedpool.asyncio import cluster as ours

    class TheirNode(ours._ORIGINAL_NODE):
        pass

    monkeypatch.setattr(redis.asyncio.cluster, "ClusterNode", TheirNode)
    with pytest.raises(sharedpool.Misconfigured, match="already replaced .*TheirNode"):
        sharedpool.asyncio.RedisCluster("/nonexistent/sp.sock")
    assert redis.asyncio.cluster.ClusterNode is TheirNode


# ----- reads from replicas (read_from_replicas, or load_balancing_strategy), both clients -----


REPLICAS_ONLY = LoadBalancingStrategy.ROUND_ROBIN_REPLICAS


def _replica_gets(replicated: LocalCluster) -> int:
    total = 0
    for port in replicated.live_ports():
        with replicated.client(port) as c:
            if c.info("replication")["role"] == "slave":
                total += int(c.info("commandstats").get("cmdstat_get", {}).get("calls", 0))
    return total


def test_reads_from_replicas_go_to_replica_leases_in_both_clients(start_manager: Any) -> None:
    with LocalCluster(primaries=3, replicas=1) as replicated:
        manager = start_manager(redis_url=replicated.seed_url, cluster=True, min_idle=0,
                                cluster_refresh_interval=0.5, max_connections=8, acquire_timeout=10)
        keys = {f"rr:{n}": str(n) for n in range(60)}
        writer = sharedpool.RedisCluster(manager.socket_path, decode_responses=True)
        for key, value in keys.items():
            writer.set(key, value)

        # Every replica has its primary's keys before we read (replication is asynchronous).
        wait_for(lambda: sum(_replica_dbsizes(replicated)) >= len(keys), 20, "all keys on the replicas")
        before = _replica_gets(replicated)
        reader = sharedpool.RedisCluster(manager.socket_path, decode_responses=True, load_balancing_strategy=REPLICAS_ONLY)
        sync_got = {key: reader.get(key) for key in keys}
        after_sync = _replica_gets(replicated)

        async def async_reads() -> dict[str, Any]:
            r = sharedpool.asyncio.RedisCluster(manager.socket_path, decode_responses=True, load_balancing_strategy=REPLICAS_ONLY)
            try:
                got = {key: await r.get(key) for key in keys}
                await r.set("rr:written-with-replicas-on", "yes")  # writes still go to primaries
                return got
            finally:
                await r.aclose()

        async_got = asyncio.run(async_reads())
        after_async = _replica_gets(replicated)
        assert sync_got == keys
        assert async_got == keys
        assert after_sync - before >= len(keys), (before, after_sync)  # replicas only: every GET is a replica's
        assert after_async - after_sync >= len(keys), (after_sync, after_async)
        assert writer.get("rr:written-with-replicas-on") == "yes"
        nodes = manager.stats()["cluster"]["nodes"]
        assert {n["role"] for n in nodes} == {"primary", "replica"}
        # Only the manager's connections reached the replicas (besides a replica's link to its
        # primary, flag M, and this CLIENT LIST's own).
        for port in replicated.live_ports():
            with replicated.client(port) as c:
                if c.info("replication")["role"] == "slave":
                    others = [x for x in c.client_list() if x["cmd"] != "client|list" and "M" not in x["flags"]
                              and not x.get("name", "").startswith(f"sharedpool:{manager.pool_name}:")]
                    assert others == [], (port, others)
        writer.close()
        reader.close()


def _replica_dbsizes(replicated: LocalCluster) -> list[int]:
    sizes = []
    for port in replicated.live_ports():
        with replicated.client(port) as c:
            if c.info("replication")["role"] == "slave":
                sizes.append(int(c.dbsize()))
    return sizes
