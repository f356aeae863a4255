"""Many processes, one small set of Redis connections: a plain ``multiprocess`` script.

Start a manager, then run this script against it::

    sharedpool serve --redis-url redis://127.0.0.1:6379/0 \\
        --socket-path /tmp/sharedpool-example/sp.sock --max-connections 2 &
    SHAREDPOOL_SOCKET=/tmp/sharedpool-example/sp.sock python examples/multiprocess_app.py 8

The argument is the number of worker processes (default 4). Every worker
uses the client created below, at import time, before the fork: the
client notices the fork and takes its own leases, so no worker ever
touches another's. The script prints how many tasks each process ran and
how many Redis connections the manager needed for all of them. It uses
only keys under ``sharedpool-example:`` and deletes them at the end.
Stdlib ``multiprocessing`` works the same way.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import multiprocess
import redis

import sharedpool

PREFIX = "sharedpool-example"

# Created once in the parent, inherited by every forked worker: the usual
# shape of an app module that a pre-fork server imports.
r = sharedpool.Redis(decode_responses=True)


def task(n: int) -> tuple[int, bool]:
    """One unit of work: a counter, writes read back, and an optimistic transaction."""
    r.incr(f"{PREFIX}:tasks")
    # One lease for the block instead of one per command: a single round
    # trip to the manager, and the commands run back to back.
    with r.lease() as pinned:
        pinned.set(f"{PREFIX}:square:{n}", n * n, ex=60)
        pinned.hset(f"{PREFIX}:owner", str(n), os.getpid())
        ok = pinned.get(f"{PREFIX}:square:{n}") == str(n * n)
        ok = ok and pinned.hget(f"{PREFIX}:owner", str(n)) == str(os.getpid())

    def add(pipe: redis.client.Pipeline) -> None:
        total = int(pipe.get(f"{PREFIX}:total") or 0)
        pipe.multi()
        pipe.set(f"{PREFIX}:total", total + n)

    # WATCH/MULTI/EXEC, retried by redis-py when another worker got there first.
    r.transaction(add, f"{PREFIX}:total")
    return os.getpid(), ok


def main() -> int:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    tasks = 50 * workers
    r.delete(f"{PREFIX}:tasks", f"{PREFIX}:total", f"{PREFIX}:owner")
    with multiprocess.get_context("fork").Pool(workers) as pool:
        results = pool.map(task, range(tasks), chunksize=5)
    per_pid = Counter(pid for pid, _ in results)
    failed = sum(1 for _, ok in results if not ok)
    stats = r.connection_pool.stats()
    print(f"{len(per_pid)} worker processes ran {tasks} tasks: "
          + ", ".join(f"pid {pid}: {count}" for pid, count in sorted(per_pid.items())))
    print(f"counter {int(r.get(f'{PREFIX}:tasks') or 0)} (expected {tasks}), "
          f"total {int(r.get(f'{PREFIX}:total') or 0)} (expected {sum(range(tasks))}), reads that disagreed: {failed}")
    print(f"Redis connections opened by the manager {stats['pool']!r}: {stats['counters']['connections_opened']} "
          f"({stats['connections']['open']} open now, max {stats['connections']['max']}); "
          f"leases granted since it started: {stats['counters']['leases_granted']}")
    for key in r.scan_iter(match=f"{PREFIX}:*"):
        r.delete(key)
    r.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
