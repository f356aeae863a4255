"""The WSGI app of ``sharedpool bench`` E2E: three Redis commands per request.

gunicorn imports this module in each worker after the fork (no
``--preload``), so every worker builds its own client, as an app would:

* ``SHAREDPOOL_BENCH_SYSTEM=plain``: ``redis.Redis`` on
  ``SHAREDPOOL_BENCH_REDIS_URL``, its own pool per worker;
* ``SHAREDPOOL_BENCH_SYSTEM=shared``: ``sharedpool.Redis`` on the manager at
  ``SHAREDPOOL_BENCH_SOCKET``.

A request is INCR of one counter, then GET and SET of a key named after the
count (4096 keys in turn, so Redis's memory stays flat). When the worker has
its client and has used it once, it writes a file named after its pid into
``SHAREDPOOL_BENCH_READY_DIR``: the bench starts wrk only when every worker
has done so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import redis

import sharedpool

KEY_PREFIX = "sharedpool-bench:e2e:"
KEYS = 4096


def _client() -> redis.Redis:
    system = os.environ.get("SHAREDPOOL_BENCH_SYSTEM")
    protocol = int(os.environ.get("SHAREDPOOL_BENCH_PROTOCOL", "3"))
    if system == "shared":
        return sharedpool.Redis(socket_path=os.environ["SHAREDPOOL_BENCH_SOCKET"], protocol=protocol)
    if system == "plain":
        return redis.Redis.from_url(os.environ["SHAREDPOOL_BENCH_REDIS_URL"], protocol=protocol)
    raise RuntimeError(f"SHAREDPOOL_BENCH_SYSTEM={system!r}: this app is run by 'sharedpool bench' (E2E), "
                       "which sets it to 'plain' or 'shared'")


client = _client()
client.get(KEY_PREFIX + "0")  # the connection (or the fd of a slot) before the first request
_ready_dir = os.environ.get("SHAREDPOOL_BENCH_READY_DIR")
if _ready_dir:
    with open(os.path.join(_ready_dir, str(os.getpid())), "w"):
        pass


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    count = client.incr(KEY_PREFIX + "requests")
    key = f"{KEY_PREFIX}{count % KEYS}"
    client.get(key)
    client.set(key, count)
    body = b"%d\n" % count
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
