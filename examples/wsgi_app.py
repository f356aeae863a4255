"""A tiny WSGI app whose workers share the host's Redis connections.

Start a manager, then serve the app with any number of workers::

    sharedpool serve --redis-url redis://127.0.0.1:6379/0 \\
        --socket-path /tmp/sharedpool-example/sp.sock --max-connections 2 &
    export SHAREDPOOL_SOCKET=/tmp/sharedpool-example/sp.sock
    gunicorn --workers 8 --chdir examples wsgi_app:app     # or, with no server installed:
    python examples/wsgi_app.py 8000                        # wsgiref, one process

    curl localhost:8000/count          # -> {"hits": 1, "pid": 4242}
    curl localhost:8000/incr           # -> {"incr": 2, "pid": 4242}   (same counter)
    curl 'localhost:8000/echo?v=hi'    # -> {"echo": "hi", "pid": 4242}  (or ?msg=hi)
    curl localhost:8000/pid            # -> {"pid": 4242}
    curl localhost:8000/pool           # -> what the manager reports

Under gunicorn, examples/gunicorn.conf.py adds the sharedpool hooks (and
can run the manager inside gunicorn's master); under uWSGI,
examples/uwsgi.ini runs the manager with attach-daemon2.

The client is made once, at import time, as an app module usually does.
A pre-fork server imports the module in its master and forks the
workers; the client sees the fork and each worker takes its own leases
over its own control connection, so nothing in this file is
fork-specific.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import redis

import sharedpool
import sharedpool.integrations.uwsgi  # noqa: F401  (uWSGI's @postfork hook; a no-op elsewhere)

r = sharedpool.Redis(decode_responses=True)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def count() -> dict[str, Any]:
    return {"hits": r.incr("sharedpool-example:hits"), "pid": os.getpid()}


def incr() -> dict[str, Any]:
    return {"incr": r.incr("sharedpool-example:hits"), "pid": os.getpid()}


def echo(query: dict[str, list[str]]) -> dict[str, Any]:
    # A round trip through Redis, read back under the same lease.
    key = f"sharedpool-example:echo:{uuid.uuid4().hex}"
    value = (query.get("v") or query.get("msg") or [""])[0]
    with r.lease() as pinned:
        pinned.set(key, value, ex=30)
        message = pinned.getdel(key)
    return {"echo": message, "pid": os.getpid()}


def pid() -> dict[str, Any]:
    return {"pid": os.getpid()}


def pool() -> dict[str, Any]:
    stats = r.connection_pool.stats()
    return {"pool": stats["pool"], "connections": stats["connections"], "leases": stats["leases"],
            "worker_pids": [worker["pid"] for worker in stats["workers"]]}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    routes: dict[str, Callable[[], dict[str, Any]]] = {
        "/count": count, "/incr": incr, "/echo": lambda: echo(query), "/pid": pid, "/pool": pool,
    }
    handler = routes.get(path)
    if handler is None:
        status, body = "404 Not Found", {"error": f"no route {path}", "routes": sorted(routes)}
    else:
        try:
            status, body = "200 OK", handler()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # The manager or Redis is away: say so instead of a bare 500.
            status, body = "503 Service Unavailable", {"error": f"{type(exc).__name__}: {exc}"}
    payload = json.dumps(body).encode() + b"\n"
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    print(f"serving on http://127.0.0.1:{port}/count, /incr, /echo?v=..., /pid, /pool")
    make_server("127.0.0.1", port, app).serve_forever()
