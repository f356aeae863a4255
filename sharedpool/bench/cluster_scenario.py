"""CLUSTER: W workers on a 3-primary Redis Cluster on loopback, sharedpool.RedisCluster
beside plain redis-py ``RedisCluster`` in the same run.

Each request is S2's shape: K commands (GETs on keys of random slots, so every
request meets every node, one of them a pipeline over two slots), a CPU
loop and a wait on other I/O. Plain redis-py keeps one connection per node
in every worker (W x nodes in all); the manager holds at most
``max_connections`` for the host (C per node, 3 C in all). The table shows
throughput and the peak connections of the cluster's nodes together.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from sharedpool.bench.report import PLAIN, SHARED, Results
from sharedpool.bench.rig import Rig

Rounds = Callable[[Rig, Results, str, list[tuple[str, Callable[[int], str]]]], None]  # rounds.run_rounds

NODES = 3
_KEYS = 1000


def _worker(system: str, where: str, settings: dict[str, Any], ready: Any, go: Any, results: Any) -> None:
    import redis

    import sharedpool

    if system == SHARED:
        client: Any = sharedpool.RedisCluster(where, acquire_timeout=30)
    else:
        host, _, port = where.rpartition(":")
        client = redis.cluster.RedisCluster(host=host, port=int(port))
    rng = random.Random(os.getpid())
    commands, cpu_s, io_s = int(settings["commands"]), settings["cpu_us"] / 1e6, settings["io_ms"] / 1e3

    def request() -> None:
        for _ in range(max(0, commands - 2)):
            client.get(f"bench:{rng.randrange(_KEYS)}")
        pipe = client.pipeline()
        pipe.get(f"bench:{rng.randrange(_KEYS)}").get(f"bench:{rng.randrange(_KEYS)}")
        pipe.execute()
        until = time.perf_counter() + cpu_s
        while time.perf_counter() < until:
            pass
        if io_s:
            time.sleep(io_s)

    for _ in range(NODES * 4):
        request()  # every node's connection made before the window
    ready.put(os.getpid())
    go.wait(60)
    done, ends = 0, time.perf_counter() + settings["duration"]
    while time.perf_counter() < ends:
        request()
        done += 1
    results.put(done)
    client.close()


def scenario_cluster(rig: Rig, results: Results, rounds: Rounds) -> None:
    import multiprocess

    from sharedpool.dev.cluster import LocalCluster
    from sharedpool.dev.launch import ManagerProcess

    s = rig.settings
    cluster = LocalCluster(primaries=NODES)
    rig.stack.callback(cluster.cleanup)
    cluster.start()
    for port in cluster.ports:
        with cluster.client(port) as node:
            node.execute_command("CONFIG", "SET", "maxclients", "10000")
    seeder = __import__("redis").cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    for i in range(_KEYS):
        seeder.set(f"bench:{i}", b"v" * 16)
    seeder.close()
    size = s.max_connections * NODES
    path = os.path.join(rig.workdir, "manager-cluster.sock")
    manager = ManagerProcess(path, cluster.seed_url, log_path=path + ".log", cluster=True, max_connections=size,
                             min_idle=s.max_connections, max_connections_per_node=s.max_connections,
                             pool_name="bench-cluster", log_level="WARNING")
    rig.stack.callback(manager.stop, 5.0)
    manager.start(timeout=15.0)
    samplers = [cluster.client(port) for port in cluster.ports]
    for sampler in samplers:
        rig.stack.callback(sampler.close)
    ctx = multiprocess.get_context("fork")
    plan = {"commands": s.commands, "cpu_us": s.cpu_us, "io_ms": s.io_ms, "duration": s.duration}

    def connections() -> int:
        return sum(len(sampler.client_list()) - 1 for sampler in samplers)  # less the sampler itself

    def run(system: str, where: str) -> Callable[[int], str]:
        def measure(round_no: int) -> str:
            rig.check_time(1, s.duration)
            ready, go, done = ctx.Queue(), ctx.Event(), ctx.Queue()
            workers = [ctx.Process(target=_worker, args=(system, where, plan, ready, go, done)) for _ in range(s.workers)]
            for worker in workers:
                worker.start()
            try:
                for _ in workers:
                    ready.get(timeout=60)
                go.set()
                started, peak = time.perf_counter(), 0
                while time.perf_counter() - started < s.duration:
                    peak = max(peak, connections())
                    time.sleep(0.05)
                total = sum(done.get(timeout=60) for _ in workers)
            finally:
                for worker in workers:
                    worker.join(10)
                    if worker.is_alive():
                        worker.kill()
            rps = total / s.duration
            results.add(f"cluster.{system}.rps", round_no, rps)
            results.add(f"cluster.{system}.peak_clients", round_no, peak)
            return f"{rps:,.0f} requests/s, peak {peak} Redis connections on {NODES} nodes"
        return measure

    seed = f"127.0.0.1:{cluster.ports[0]}"
    rounds(rig, results, "CLUSTER", [("plain RedisCluster", run(PLAIN, seed)),
                                     (f"sharedpool C={size} ({s.max_connections} per node)", run(SHARED, path))])
