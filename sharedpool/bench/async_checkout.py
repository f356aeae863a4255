"""ASYNC checkout: the exclusive path's own cost, one task taking and giving back a connection.

``get_connection()`` + ``release()`` of ``redis.asyncio``'s own pool against
``sharedpool.asyncio.SharedConnectionPool(autopipeline=False)``, no command
sent, in a forked process that measures its own CPU time (RUSAGE_SELF):

* back to back: the next take in the same loop step, as a task's next
  command follows its last reply (ours: the parked lease renewed in place);
* a loop turn between (``await asyncio.sleep(0)``): ours gives the lease
  back to the table at the turn's end and takes it again, lock, fd flags
  and the loop's reader included. A bare turn, measured in the same
  process, is subtracted.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
from typing import Any

from sharedpool.bench.report import PLAIN, SHARED, Results
from sharedpool.bench.rig import Rig
from sharedpool.bench.rounds import Measure

ITERATIONS = 20_000
QUICK_ITERATIONS = 3_000


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(system: str, address: str, iterations: int, out: Any) -> None:
    async def main() -> tuple[float, float]:
        pool: Any
        if system == PLAIN:
            import redis.asyncio

            pool = redis.asyncio.ConnectionPool.from_url(address)
        else:
            import sharedpool.asyncio

            pool = sharedpool.asyncio.SharedConnectionPool(address, autopipeline=False, acquire_timeout=30)
        try:
            for _ in range(200):  # connected, fds bound, code warm
                await pool.release(await pool.get_connection())
                await asyncio.sleep(0)
            started = _cpu_s()
            for _ in range(iterations):
                await pool.release(await pool.get_connection())
            back_to_back = _cpu_s() - started
            started = _cpu_s()
            for _ in range(iterations):
                await asyncio.sleep(0)
            turns = _cpu_s() - started
            started = _cpu_s()
            for _ in range(iterations):
                await pool.release(await pool.get_connection())
                await asyncio.sleep(0)
            turned = _cpu_s() - started - turns
            return back_to_back / iterations * 1e6, max(0.0, turned) / iterations * 1e6
        finally:
            await pool.disconnect()

    out.put(asyncio.run(main()))


def measures(rig: Rig, results: Results, address: str) -> list[Measure]:
    """One measure per system, for the ASYNC rounds."""
    iterations = QUICK_ITERATIONS if rig.settings.quick else ITERATIONS

    def measure(system: str, where: str) -> Any:
        def run(round_no: int) -> str:
            ctx = multiprocessing.get_context("fork")
            out = ctx.Queue()
            child = ctx.Process(target=_child, args=(system, where, iterations, out))
            child.start()
            try:
                back_to_back, turned = out.get(timeout=120)
            finally:
                child.join(10)
                if child.is_alive():
                    child.kill()
            results.add(f"async.checkout_{system}.back_to_back_us", round_no, back_to_back)
            results.add(f"async.checkout_{system}.turned_us", round_no, turned)
            return f"{back_to_back:.2f} us back to back, {turned:.2f} us with a loop turn between"
        return run

    return [(f"checkout {system}", measure(system, where)) for system, where in ((PLAIN, rig.redis_url), (SHARED, address))]
