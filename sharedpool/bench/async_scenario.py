"""ASYNC: asyncio workers (as under uvicorn), many tasks each, sharedpool.asyncio at C against plain redis.asyncio.

W=4 worker processes x 64 concurrent tasks; a request is k commands
(GET/SET of its own key) and a wait on other I/O (``asyncio.sleep``).
Plain: one ``redis.asyncio`` pool per worker (up to 64 connections each).
Shared: ``sharedpool.asyncio.Redis()`` at its defaults over a manager with
C connections (code written for ``redis.asyncio``, unchanged: its simple
commands autopipelined). Opt-out: ``Redis(autopipeline=False)``, one lease
per command. Lease per request: the same request inside ``async with
r.lease()``, the API the README offers for a block of commands. Slow:
plain and the default again, with task 0 of each worker reading a 1 MB
value in place of its small GET; the p99 counted is that of the other
tasks' requests, which may wait behind it (head of line). All run in the
same rounds, in alternating order; peak Redis connections are counted by
Redis itself (``CONNECTED_CLIENTS`` polled during the window).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import time
import uuid
from array import array
from typing import Any

from sharedpool.bench import async_checkout
from sharedpool.bench.report import PLAIN, SHARED, Results, percentile
from sharedpool.bench.rig import Rig
from sharedpool.bench.rounds import run_rounds

WORKERS = 4
TASKS = 64
CONNECTIONS = 4
SHARED_OPT_OUT = "shared_optout"  # sharedpool, Redis(autopipeline=False): a lease per command
SHARED_LEASE = "shared_lease"  # sharedpool, one lease() block per request
PLAIN_SLOW = "plain_slow"  # plain, with one task per worker reading a 1 MB value
SHARED_SLOW = "shared_slow"  # the default, the same
BIG_VALUE = 2**20


def _worker(system: str, address: str, commands: int, io_s: float, duration: float, ready: Any, go: Any, out: Any) -> None:
    async def main() -> tuple[int, bytes, float, float]:
        if system in (PLAIN, PLAIN_SLOW):
            import redis.asyncio

            r: Any = redis.asyncio.Redis.from_url(address, max_connections=TASKS)
        else:
            import sharedpool.asyncio

            r = sharedpool.asyncio.Redis(socket_path=address, acquire_timeout=30, autopipeline=system != SHARED_OPT_OUT)
        latencies = array("d")
        stop_at = 0.0
        slow = system in (PLAIN_SLOW, SHARED_SLOW)
        big_key = f"bench-async:big:{os.getpid()}"
        if slow:
            await r.set(big_key, b"b" * BIG_VALUE)

        async def commands_on(client: Any, key: str, value: str, big: bool) -> None:
            for i in range(commands):
                if i % 2:
                    if big and i == 1:
                        if len(await client.get(big_key)) != BIG_VALUE:
                            raise AssertionError(f"{big_key}: wrong reply")
                    elif await client.get(key) != value.encode():
                        raise AssertionError(f"{key}: wrong reply")
                else:
                    await client.set(key, value)

        async def request(key: str, value: str, big: bool) -> None:
            if system == SHARED_LEASE:
                async with r.lease() as pinned:
                    await commands_on(pinned, key, value, big)
            else:
                await commands_on(r, key, value, big)
            await asyncio.sleep(io_s)

        async def task(n: int, record: bool) -> None:
            key = f"bench-async:{os.getpid()}:{n}"
            big = slow and n == 0
            while time.monotonic() < stop_at:
                started = time.monotonic()
                await request(key, uuid.uuid4().hex, big)
                if record and not big:
                    latencies.append(time.monotonic() - started)

        stop_at = time.monotonic() + min(0.5, duration)  # warm-up: connections opened, caches filled
        await asyncio.gather(*(task(n, False) for n in range(TASKS)))
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        stop_at = time.monotonic() + duration
        await asyncio.gather(*(task(n, True) for n in range(TASKS)))
        used = resource.getrusage(resource.RUSAGE_SELF)
        batcher = getattr(r, "autopipeline", None)
        per_batch = batcher.commands / max(1, batcher.batches) if batcher is not None else 0.0
        await r.aclose()
        return len(latencies), latencies.tobytes(), used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime, per_batch

    out.put(asyncio.run(main()))


def _run(rig: Rig, system: str, address: str) -> dict[str, float]:
    s = rig.settings
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    readies = [ctx.Event() for _ in range(WORKERS)]
    go = ctx.Event()
    # Redis's own count: before the workers start, less the manager's
    # connections (already open: min_idle=C), so that both systems' peaks
    # are the connections they use.
    baseline = _clients(rig) - (rig.manager_open(address) if system not in (PLAIN, PLAIN_SLOW) else 0)
    peak = 0
    procs = [ctx.Process(target=_worker, args=(system, address, s.commands, s.io_ms / 1e3, s.duration, ready, go, out))
             for ready in readies]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + 60
        while not all(ready.is_set() for ready in readies):
            peak = max(peak, _clients(rig) - baseline)
            if time.monotonic() > deadline:
                raise RuntimeError("an asyncio bench worker did not warm up within 60 s")
            time.sleep(0.01)
        go.set()
        started = time.monotonic()
        results: list[tuple[int, bytes, float, float]] = []
        while len(results) < WORKERS:
            peak = max(peak, _clients(rig) - baseline)
            try:
                results.append(out.get(timeout=0.05))
            except Exception:
                if time.monotonic() - started > s.duration + 60:
                    raise RuntimeError("asyncio bench workers did not finish") from None
        elapsed = s.duration
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    count = sum(r[0] for r in results)
    samples = array("d")
    for _count, raw, _cpu, _per_batch in results:
        samples.frombytes(raw)
    ordered = sorted(samples)
    return {"rps": count / elapsed, "p99_ms": percentile(ordered, 0.99) * 1e3,
            "cpu_ms": sum(r[2] for r in results) / max(1, count) * 1e3, "peak_clients": float(peak),
            "per_batch": sum(r[3] for r in results) / len(results)}


def scenario_async(rig: Rig, results: Results) -> None:

    size = rig.sizes([CONNECTIONS])[0]
    address = rig.manager(size)
    systems = [
        (PLAIN, rig.redis_url), (SHARED, address), (SHARED_OPT_OUT, address), (SHARED_LEASE, address),
        (PLAIN_SLOW, rig.redis_url), (SHARED_SLOW, address),
    ]

    def measure(system: str, where: str) -> Any:
        def run(round_no: int) -> str:
            figures = _run(rig, system, where)
            for name, value in figures.items():
                results.add(f"async.{system}.{name}", round_no, value)
            return (f"{figures['rps']:,.0f} req/s, p99 {figures['p99_ms']:.2f} ms, "
                    f"peak {figures['peak_clients']:.0f} Redis connections")
        return run

    labelled = [(f"{system} W={WORKERS}x{TASKS} tasks", measure(system, where)) for system, where in systems]
    run_rounds(rig, results, "ASYNC", labelled + async_checkout.measures(rig, results, address))


def _clients(rig: Rig) -> int:
    return int(rig.admin.info("clients")["connected_clients"]) - 1  # less the asker

