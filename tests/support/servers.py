"""gunicorn and uWSGI masters for the tests: built from the examples, started, asked over HTTP, stopped.

The app is examples/wsgi_app.py behind ``TRACED_APP``, a thin wrapper that
records which worker took each request, so that a failed request can be
checked against the workers a test killed.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from sharedpool.dev.redis_server import RedisServer, free_port
from support.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLES = REPO / "examples"
MAX_CONNECTIONS = 2

# examples/wsgi_app.py plus what the tests need to see inside the server.
TRACED_APP = '''
import json, os, subprocess, sys
from urllib.parse import parse_qs

import wsgi_app

HELD = []


def app(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    rid = query.get("rid", [""])[0]
    if rid:
        # Which worker took the request, written before any other work: a
        # request that then fails must have been taken by a killed worker.
        wsgi_app.r.set("sharedpool-test:rid:" + rid, os.getpid(), ex=600)
    path = environ.get("PATH_INFO")
    if path == "/_stats":
        body = wsgi_app.r.connection_pool.stats()
    elif path == "/_env":
        body = {k: v for k, v in os.environ.items() if k.startswith("SHAREDPOOL_")}
    elif path == "/_hold":
        # Take a lease and never give it back; a child keeps the control
        # connection and the lease's lock open, so the manager sees no EOF
        # and no free lock when we die.
        pool = wsgi_app.r.connection_pool
        conn = pool.get_connection()
        keeper = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            pass_fds=[conn.lease.lock_fd, pool._attachment.channel.sock.fileno()],
        )
        HELD.append((conn, keeper))
        body = {"pid": os.getpid(), "keeper": keeper.pid}
    else:
        return wsgi_app.app(environ, start_response)
    payload = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]
'''


@dataclass
class Server:
    """A server master we started, and everything it spawned."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    seen: set[int] = field(default_factory=set)

    def start(self) -> Server:
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")

    def wait_ready(self, timeout: float = 30.0, path: str = "/incr") -> None:
        """Wait until ``path`` answers 200; fail at once, with the log, if the server exited."""

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                status, _ = self.get(path, timeout=5.0)
            except OSError:
                return False
            return status == 200

        wait_for(answers, timeout, f"{self.name} to answer {path}")

    def descendants(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(p.pid for p in found)
        return found

    def workers(self, manager_pid: int) -> list[int]:
        """The master's children that serve requests (not the manager, nor a shell around it)."""
        try:
            manager_parent = psutil.Process(manager_pid).ppid()
        except psutil.NoSuchProcess:
            manager_parent = 0
        children = psutil.Process(self.pid).children()
        return [c.pid for c in children if c.pid not in (manager_pid, manager_parent)]

    def uwsgi_settled(self, manager_pid: int, processes: int, lazy_apps: bool) -> bool:
        """Every worker up, none on its way out, and (lazy-apps) each with its app loaded.

        uWSGI 2.0 can respawn a recycled worker after it has signalled the
        others to stop, then wait for that one forever: SIGTERM only a
        settled fleet.
        """
        workers = self.workers(manager_pid)
        log = self.log()
        if len(workers) != processes or any(f"work of process {pid} is done" in log for pid in workers):
            return False
        return not lazy_apps or all(f"pid: {pid} (default app)" in log for pid in workers)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the master; afterwards, SIGKILL whatever of ours is left."""
        if self.process is None:
            return None
        self.descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.seen:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        return self.process.returncode


def app_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "app"
    directory.mkdir(exist_ok=True)
    (directory / "traced_app.py").write_text(TRACED_APP)
    return directory


def base_env(redis_server: RedisServer, pool_name: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHAREDPOOL_", "GUNICORN_", "UWSGI_", "PYTEST_"))}
    env.update({
        "SHAREDPOOL_REDIS_URL": redis_server.url,
        "SHAREDPOOL_POOL_NAME": pool_name,
        "SHAREDPOOL_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "SHAREDPOOL_LOG_LEVEL": "INFO",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(EXAMPLES)]),
    })
    env.update(extra)
    return env


def gunicorn_server(
    tmp_path: Path, env: dict[str, str], *, worker_class: str = "sync", threads: int = 1,
    preload: bool = False, workers: int = 4, max_requests: int = 30, extra: tuple[str, ...] = (),
    config: str | None = None,
) -> Server:
    port = free_port()
    argv = [
        sys.executable, "-m", "gunicorn",
        "-c", config or str(EXAMPLES / "gunicorn.conf.py"),
        "--chdir", str(app_dir(tmp_path)),
        "--bind", f"127.0.0.1:{port}",
        "--workers", str(workers),
        "--worker-class", worker_class,
        "--threads", str(threads),
        "--max-requests", str(max_requests),
        "--max-requests-jitter", str(max_requests // 3),
        "--graceful-timeout", "10",
        "--no-control-socket",
        *(["--preload"] if preload else []),
        *extra,
        "traced_app:app",
    ]
    return Server("gunicorn", argv, env, port, tmp_path / "gunicorn.log")


def uwsgi_server(tmp_path: Path, env: dict[str, str], *, lazy_apps: bool, processes: int = 4,
                 max_requests: int = 30, ini_env: dict[str, str] | None = None) -> Server:
    port = free_port()
    ini = tmp_path / "uwsgi.ini"
    # The [sharedpool] section of the example is what is under test.
    ini.write_text(
        "[uwsgi]\n"
        f"http-socket = 127.0.0.1:{port}\n"
        f"processes = {processes}\n"
        f"chdir = {app_dir(tmp_path)}\n"
        f"pythonpath = {EXAMPLES}\n"
        f"pythonpath = {REPO}\n"
        "module = traced_app:app\n"
        f"max-requests = {max_requests}\n"
        "max-requests-delta = 3\n"
        # Else uWSGI recycles no worker younger than 10 s: none, in this test.
        "min-worker-lifetime = 0\n"
        f"lazy-apps = {'true' if lazy_apps else 'false'}\n"
        "reload-mercy = 8\n"
        "worker-reload-mercy = 8\n"
        f"sharedpool_serve = {sys.executable} -m sharedpool serve\n"
        + "".join(f"env = {key}={value}\n" for key, value in (ini_env or {}).items())
        + f"ini = {EXAMPLES / 'uwsgi.ini'}:sharedpool\n"
    )
    pyuwsgi = shutil.which("pyuwsgi", path=os.path.dirname(sys.executable)) or shutil.which("pyuwsgi")
    # pyuwsgi is in the test extra: missing, the uWSGI tests must fail, not vanish.
    assert pyuwsgi is not None, "pyuwsgi is not installed (pip install -e '.[test]')"
    return Server("uwsgi", [pyuwsgi, "--ini", str(ini)], env, port, tmp_path / "uwsgi.log")
