"""What the Cluster tests of both clients share: the module's cluster and its managers,
fleets of worker processes, and the manager's connections per node as Redis lists them."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import multiprocess
import pytest
import redis

from sharedpool.dev.cluster import LocalCluster
from support.waiting import wait_for

ctx = multiprocess.get_context("fork")

# Errors a command may meet while a node is down or being replaced: redis-py's cluster
# client retries them, and a worker may see one at the moment of the failover.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError,
             redis.exceptions.ClusterError, redis.exceptions.SlotNotCoveredError)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One 3-primary cluster per test module (modules run on different xdist workers)."""
    with LocalCluster(primaries=3) as started:
        yield started


@pytest.fixture
def cluster_manager(cluster: LocalCluster, start_manager: Any) -> Any:
    def start(**settings: Any) -> Any:
        settings.setdefault("min_idle", 0)
        settings.setdefault("cluster_refresh_interval", 0.5)
        return start_manager(redis_url=cluster.seed_url, cluster=True, **settings)
    return start


def manager_conns(cluster: LocalCluster, pool_name: str) -> dict[int, int]:
    """Per live node: the connections the manager of ``pool_name`` has open to it."""
    prefix = f"sharedpool:{pool_name}:"
    counts = {}
    for port in cluster.live_ports():
        with cluster.client(port) as c:
            counts[port] = len([x for x in c.client_list() if x.get("name", "").startswith(prefix)])
    return counts


def sample_peaks(cluster: LocalCluster, manager: Any, seconds: float) -> tuple[dict[int, int], int]:
    """For ``seconds``: the most connections the manager had open to each node, and in all.

    Each node's CLIENT LIST is one instant of that node; the host's total is the
    manager's own count (a sum over nodes asked one after another is no instant)."""
    peak: dict[int, int] = {}
    total_peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for port, count in manager_conns(cluster, manager.pool_name).items():
            peak[port] = max(peak.get(port, 0), count)
        total_peak = max(total_peak, manager.stats()["connections"]["open"])
    return peak, total_peak


def assert_all_right(results: list[dict[str, Any]], least_done: int) -> None:
    """No wrong reply, no error, and every worker got work done."""
    assert [w for r in results for w in r["wrong"]] == []
    assert [e for r in results for e in r["errors"]] == []
    assert all(r["done"] > least_done for r in results), [r["done"] for r in results]


class Fleet:
    """Worker processes running ``target(socket_path, tag, worker, stop, results, *args)``
    until ``stop``; each puts one dict of what it saw in ``results``."""

    def __init__(self, target: Callable[..., None], socket_path: str, workers: int, *args: Any) -> None:
        self.tag = f"cl-{uuid.uuid4().hex[:8]}"
        self.stop = ctx.Event()
        self.results = ctx.Queue()
        self.processes = [ctx.Process(target=target, args=(socket_path, self.tag, w, self.stop, self.results, *args))
                          for w in range(workers)]

    def __enter__(self) -> Fleet:
        for process in self.processes:
            process.start()
        return self

    def finish(self) -> list[dict[str, Any]]:
        self.stop.set()
        found = [self.results.get(timeout=60) for _ in self.processes]
        for process in self.processes:
            process.join(timeout=20)
            assert process.exitcode == 0
        return found

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for process in self.processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()


def queue_mixed(pipe: Any, key: str, value: str) -> Any:
    """One slot's keys (a hash tag) and another slot's: a pipeline over two nodes mostly,
    which holds one node's lease while it takes the other's (sync) or runs both at once (asyncio)."""
    pipe.set(f"{{{key}}}:a", value).set(f"{{{key}}}:b", value).get(f"{{{key}}}:a").get(f"{{{key}}}:b")
    return pipe.set(f"{key}:far", value).get(f"{key}:far")


def mixed_reads(replies: list[Any]) -> list[Any]:
    """The three reads of a ``queue_mixed`` pipeline's replies."""
    return [replies[2], replies[3], replies[5]]


class Seen:
    """What one worker saw: commands done, wrong replies (when, key, expected, got), errors (when, what)."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.done = 0
        self.wrong: list[tuple[float, str, Any, Any]] = []
        self.errors: list[tuple[float, str]] = []
        self.last_ok = 0.0

    def failed(self, key: str, value: Any, exc: Exception) -> None:
        if isinstance(exc, TRANSIENT):
            self.errors.append((time.time(), f"{type(exc).__name__}: {exc}"))
        else:  # anything else is as wrong as a wrong reply
            self.wrong.append((time.time(), key, value, f"{type(exc).__name__}: {exc}"))

    def check(self, key: str, expected: Any, got: Any) -> None:
        if got != expected:
            self.wrong.append((time.time(), key, expected, got))
        self.done += 1
        self.last_ok = time.time()

    def report(self) -> dict[str, Any]:
        return {"worker": self.worker, "done": self.done, "wrong": self.wrong, "errors": self.errors, "last_ok": self.last_ok}


def kill_holder_mid_blpop(cluster: LocalCluster, holder_main: Callable[..., None], socket_path: str, key: str) -> None:
    """Start ``holder_main(socket_path, key, ready)``, which sets ``ready`` and BLPOPs ``key``;
    SIGKILL it while Redis holds that reply back; then push to ``key`` (a reply that would land
    on the dead holder's connection, were it reused) and set ``key:probe`` to "fresh"."""
    port = cluster.owner_of(redis.cluster.key_slot(key.encode()))
    ready = ctx.Event()
    holder = ctx.Process(target=holder_main, args=(socket_path, key, ready))
    holder.start()
    try:
        assert ready.wait(20)
        with cluster.client(port) as c:
            wait_for(lambda: any(x.get("cmd") == "blpop" for x in c.client_list()), 10, "the BLPOP under way")
            os.kill(holder.pid, signal.SIGKILL)
            holder.join(10)
            c.rpush(key, "for-the-dead")
            c.set(key + ":probe", "fresh")
    finally:
        if holder.is_alive():
            holder.kill()
