"""A real ``gunicorn -k uvicorn.workers.UvicornWorker`` fleet on sharedpool.asyncio: kills, recycling, the cap."""

from __future__ import annotations

import http.client
import itertools
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support.redis_view import manager_clients
from support.servers import MAX_CONNECTIONS, Server, base_env, gunicorn_server
from support.waiting import wait_for

from sharedpool.admin import stats as manager_stats
from sharedpool.dev.redis_server import RedisServer

# A raw ASGI app (no framework to install): each request runs several tasks
# that write values no other request writes and read them back.
ASGI_APP = '''
import asyncio, json, os, uuid
from urllib.parse import parse_qs

import sharedpool.asyncio

r = sharedpool.asyncio.Redis(decode_responses=True, acquire_timeout=30)


async def check(tag):
    key = "uvicorn-test:" + tag + ":" + uuid.uuid4().hex
    value = tag + ":" + uuid.uuid4().hex
    async with r.pipeline(transaction=False) as pipe:
        pipe.set(key, value, ex=60).get(key)
        got = (await pipe.execute())[1]
    wrong = [] if got == value else [key + ": wrote " + value + ", read " + str(got)]
    await r.set(key, value + "!", ex=60)
    got = await r.get(key)
    return wrong + ([] if got == value + "!" else [key + ": read " + str(got)])


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await r.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = parse_qs(scope.get("query_string", b"").decode())
    if scope["path"] == "/_stats":
        body = await r.connection_pool.stats()
    else:
        tag = query.get("rid", ["x"])[0]
        found = await asyncio.gather(*(check(tag + "-" + str(i)) for i in range(5)))
        body = {"pid": os.getpid(), "wrong": [w for f in found for w in f]}
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
'''

_names = itertools.count()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sp-uv-"))  # short: an AF_UNIX path has at most 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_uvicorn_workers_share_the_cap_through_kills_and_recycling(
    tmp_path: Path, run_dir: Path, redis_server: RedisServer, admin: redis.Redis,
) -> None:
    pool_name = f"uv{os.getpid()}x{next(_names)}"
    socket_path = str(run_dir / "sp.sock")
    env = base_env(redis_server, pool_name, SHAREDPOOL_EMBEDDED="1", SHAREDPOOL_SOCKET_PATH=socket_path)
    server = gunicorn_server(tmp_path, env, worker_class="uvicorn.workers.UvicornWorker", workers=4, max_requests=30,
                             config="python:sharedpool.integrations.gunicorn")
    (tmp_path / "app" / "asgi_app.py").write_text(ASGI_APP)
    server.argv[-1] = "asgi_app:app"
    server.start()
    try:
        _run_fleet(server, socket_path, admin, pool_name)
        assert server.stop() == 0
        log = server.log()
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()


def _run_fleet(server: Server, socket_path: str, admin: redis.Redis, pool_name: str) -> None:
    server.wait_ready(60, path="/check?rid=ready")
    manager_pid = manager_stats(socket_path)["manager_pid"]
    served: list[dict[str, Any]] = []
    failed: list[str] = []
    peak = 0
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(60):
            try:
                status, body = server.get(f"/check?rid={n}-{i}-{uuid.uuid4().hex[:8]}", timeout=30)
            except (OSError, http.client.HTTPException) as exc:  # a killed worker's request (cut mid-body: IncompleteRead)
                failed.append(repr(exc))
                continue
            if status == 200:
                served.append(body)
            else:
                failed.append(f"{status}: {body!r}"[:300])

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, len(manager_clients(admin, pool_name)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: len(served) >= 40, 60, "some requests served")
        for victim in server.workers(manager_pid)[:2]:
            server.descendants()
            os.kill(victim, signal.SIGKILL)  # mid-request, most likely: the clients never pause
        for thread in clients:
            thread.join(240)
    finally:
        stop.set()
        watcher.join()
    server.descendants()
    assert [w for body in served for w in body["wrong"]] == []
    assert len(served) >= 8 * 60 - 20, failed[:5]  # only requests of the killed workers may fail
    assert 1 <= peak <= MAX_CONNECTIONS
    # max_requests 30 (+ jitter) over 480 requests: workers were recycled, and killed ones replaced.
    assert len({body["pid"] for body in served}) > 4 + 2
    wait_for(lambda: manager_stats(socket_path)["leases"]["held"] == 0, 10, "every lease back")
    assert manager_stats(socket_path)["connections"]["open"] <= MAX_CONNECTIONS

