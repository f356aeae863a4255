"""Real libraries on the shared pool: django-redis's CONNECTION_POOL_CLASS and an rq worker with its scheduler.

Each runs in its own process, as in production (Django's settings and rq's
worker are process-wide), with only the manager's socket in its
environment. While it runs, the test watches Redis's CLIENT LIST: no
connection but the manager's may reach Redis. Afterwards each database
holds exactly the keys it should.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
import rq
from support.redis_view import strangers

import sharedpool
from sharedpool.dev.launch import ManagerProcess


@pytest.fixture
def manager(start_manager: Any) -> ManagerProcess:
    return start_manager(max_connections=3, min_idle=1)


def run_watching_redis(
    command: list[str], env: dict[str, str], admin: redis.Redis, manager: ManagerProcess, log: Any, timeout: float = 90
) -> tuple[int, str, list[str]]:
    """Run ``command`` (output to the file ``log``); meanwhile list every connection in Redis
    that is neither the manager's nor ``admin``. Returns exit code, output, strangers."""
    seen: set[str] = set()
    # The sharedpool under test, whatever the environment has installed.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(sharedpool.__file__)))
    path = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, env={**os.environ, **env, "PYTHONPATH": path}, stdout=output, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{command[:3]} did not finish within {timeout} s")
                seen.update(strangers(admin, manager))
                time.sleep(0.02)  # pacing of the CLIENT LIST poll, not a wait for a condition
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    with open(log) as output:
        return process.returncode, output.read(), sorted(seen)


DJANGO_APP = textwrap.dedent(
    """
    import os

    import django
    from django.conf import settings

    port = os.environ["TEST_REDIS_PORT"]
    settings.configure(CACHES={
        alias: {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{port}/{db}",
            "KEY_PREFIX": alias,
            "OPTIONS": {
                "CONNECTION_POOL_CLASS": "sharedpool.SharedConnectionPool",
                "CONNECTION_POOL_KWARGS": {"acquire_timeout": 5.0},
            },
        }
        for alias, db in (("default", 1), ("sessions", 2))
    })
    django.setup()
    from django.core.cache import caches

    pages, sessions = caches["default"], caches["sessions"]
    for i in range(200):
        pages.set(f"page:{i}", {"n": i}, timeout=300)
        sessions.set(f"user:{i}", f"session-{i}", timeout=300)
    for i in range(200):
        assert pages.get(f"page:{i}") == {"n": i}, i
        assert sessions.get(f"user:{i}") == f"session-{i}", i
    assert pages.get_many([f"page:{i}" for i in range(10)]) == {f"page:{i}": {"n": i} for i in range(10)}
    pages.set("hits", 0)
    assert pages.incr("hits", 5) == 5
    with pages.lock("page-lock", timeout=5):
        pages.set("locked", "yes")
    assert pages.get("locked") == "yes"
    assert sessions.delete_pattern("user:1*") == 111
    assert sessions.get("user:1") is None and sessions.get("user:2") == "session-2"
    pool = pages.client.get_client().connection_pool
    print("pool", type(pool).__name__, pool.db)
    """
)


def test_django_redis_connection_pool_class_on_two_databases(
    manager: ManagerProcess, redis_server: Any, admin: redis.Redis, tmp_path: Any
) -> None:
    script = tmp_path / "django_app.py"
    script.write_text(DJANGO_APP)
    env = {"SHAREDPOOL_SOCKET_PATH": manager.socket_path, "TEST_REDIS_PORT": str(redis_server.port)}
    code, output, others = run_watching_redis(
        [sys.executable, str(script)], env, admin, manager, tmp_path / "django.log"
    )
    assert code == 0, output
    assert "pool SharedConnectionPool 1" in output
    assert others == []
    by_db = {db: redis_server.client(db=db, decode_responses=True) for db in (0, 1, 2)}
    try:
        assert len(by_db[1].keys("default:1:page:*")) == 200
        assert by_db[1].keys("sessions:*") == []
        assert len(by_db[2].keys("sessions:1:user:*")) == 200 - 111
        assert by_db[2].keys("default:*") == []
        assert by_db[0].keys("default:*") == [] and by_db[0].keys("sessions:*") == []
    finally:
        for client in by_db.values():
            client.close()


JOBS = textwrap.dedent(
    """
    from rq import get_current_job


    def add(a, b):
        job = get_current_job()
        # The horse's own connection: where does it write?
        job.connection.set(f"rqtest:done:{job.id}", a + b)
        return a + b
    """
)


def test_an_rq_worker_with_its_scheduler_on_the_shared_pool(
    manager: ManagerProcess, redis_server: Any, admin: redis.Redis, tmp_path: Any
) -> None:
    (tmp_path / "rqtest_jobs.py").write_text(JOBS)
    sys.path.insert(0, str(tmp_path))
    connection = sharedpool.Redis(socket_path=manager.socket_path, db=2)
    db2 = redis_server.client(db=2, decode_responses=True)
    db0 = redis_server.client(db=0, decode_responses=True)
    try:
        import rqtest_jobs  # type: ignore[import-not-found]

        queue = rq.Queue(f"q{os.getpid()}", connection=connection)
        now_job = queue.enqueue(rqtest_jobs.add, 2, 3)
        # Due already: only the scheduler moves it to the queue.
        scheduled = queue.enqueue_at(datetime.now(timezone.utc) - timedelta(seconds=1), rqtest_jobs.add, 5, 6)
        assert scheduled.get_status() == "scheduled"
        command = [
            sys.executable, "-m", "rq.cli", "worker", "--burst", "--with-scheduler",
            "--connection-class", "sharedpool.SharedRedis",
            "--url", f"redis://127.0.0.1:{redis_server.port}/2", queue.name,
        ]
        env = {"SHAREDPOOL_SOCKET_PATH": manager.socket_path, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
        code, output, others = run_watching_redis(command, env, admin, manager, tmp_path / "rq.log")
        assert code == 0, output
        assert others == []
        for job, result in ((now_job, 5), (scheduled, 11)):
            job.refresh()
            assert job.get_status() == "finished", (job.id, job.get_status(), output[-2000:])
            assert job.return_value() == result
            assert db2.get(f"rqtest:done:{job.id}") == str(result)
        assert db0.keys("rq:*") == [] and db0.keys("rqtest:*") == []
    finally:
        sys.path.remove(str(tmp_path))
        connection.close()
        db2.close()
        db0.close()
