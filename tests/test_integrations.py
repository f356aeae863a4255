"""Real gunicorn and uWSGI fleets sharing one manager: kills, recycling, the cap.

Each test starts the server as a subprocess on a free port, with its own
control socket and pool name (SHAREDPOOL_POOL_NAME), so that CLIENT LIST
tells its manager's connections apart. The load comes from this process: a
bounded number of requests from a few threads, with worker SIGKILLs at
fixed points of progress, while the servers also recycle their workers
(max_requests). The app is examples/wsgi_app.py behind a thin wrapper that
records which worker took each request, so that a failed request can be
checked against the workers the test killed.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

import sharedpool
from sharedpool import errors
from sharedpool.admin import stats as manager_stats
from sharedpool.integrations import close_control_channels, settings_from
from sharedpool.dev.redis_server import RedisServer, free_port

from conftest import manager_clients, wait_for

REPO = Path(__file__).resolve().parent.parent
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

# examples/gunicorn.conf.py, plus a hook of the user's chained to ours.
WARM_UP_CONFIG = '''
import runpy

globals().update({k: v for k, v in runpy.run_path(EXAMPLE_CONFIG).items() if not k.startswith("__")})

from sharedpool.integrations import gunicorn as sharedpool_hooks


def warm_up(server):
    # The master uses Redis, once the manager runs, before it forks: its
    # workers must inherit nothing of that. (Not at import time: gunicorn
    # imports a preloaded app before any hook could start the manager.)
    import wsgi_app

    wsgi_app.r.ping()


on_starting = sharedpool_hooks.chain(sharedpool_hooks.on_starting, warm_up)
'''

_names = iter(range(1_000_000))


# ----- servers ------------------------------------------------------------------------


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

    def wait_ready(self, timeout: float = 30.0) -> None:
        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                status, _ = self.get("/incr", timeout=5.0)
            except OSError:
                return False
            return status == 200

        wait_for(answers, timeout, f"{self.name} to answer /incr")

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


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short: an AF_UNIX path has at most 107 bytes, pytest's tmp_path may be longer.
    path = Path(tempfile.mkdtemp(prefix="sp-it-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


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


def new_pool_name() -> str:
    return f"it{os.getpid()}x{next(_names)}"


# ----- load ----------------------------------------------------------------------------------


@dataclass
class Result:
    rid: str
    path: str
    expect: str
    started: float
    ended: float = 0.0
    status: int | None = None
    body: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        if self.status != 200 or not isinstance(self.body, dict):
            return False
        if self.path == "/incr":
            return isinstance(self.body.get("incr"), int)
        return self.body.get("echo") == self.expect


@dataclass
class Kill:
    pid: int
    at: float


class Load:
    """``total`` requests from ``threads`` threads; SIGKILL a random worker at each of ``kill_at`` done."""

    def __init__(self, server: Server, manager_pid: int, total: int = 300, threads: int = 4,
                 kill_at: tuple[int, ...] = (30, 80, 130, 180, 230), budget: float = 60.0) -> None:
        self.server = server
        self.manager_pid = manager_pid
        self.total = total
        self.threads = threads
        self.kill_at = kill_at
        self.deadline = time.monotonic() + budget
        self.results: list[Result] = []
        self.kills: list[Kill] = []
        self.peak = 0
        self.samples = 0
        self._next = 0
        self._done = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._rng = random.Random(os.getpid() ^ server.port)

    def run(self, sampler: redis.Redis, pool_name: str) -> None:
        workers = [threading.Thread(target=self._client, daemon=True) for _ in range(self.threads)]
        helpers = [
            threading.Thread(target=self._killer, daemon=True),
            threading.Thread(target=self._sample, args=(sampler, pool_name), daemon=True),
        ]
        for thread in workers + helpers:
            thread.start()
        for thread in workers:
            thread.join(max(0.0, self.deadline - time.monotonic()) + 15)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in helpers:
            thread.join(15)
        assert not any(t.is_alive() for t in workers + helpers), "load threads did not finish"
        assert len(self.results) == self.total, f"only {len(self.results)} of {self.total} requests ran within the budget"

    def _client(self) -> None:
        while time.monotonic() < self.deadline:
            with self._cond:
                if self._next >= self.total:
                    return
                index = self._next
                self._next += 1
            rid = uuid.uuid4().hex
            if index % 2:
                path, expect = f"/echo?v=v{rid}&rid={rid}", f"v{rid}"
            else:
                path, expect = f"/incr?rid={rid}", ""
            result = Result(rid, path.split("?")[0], expect, time.monotonic())
            try:
                result.status, result.body = self.server.get(path)
            except (OSError, http.client.HTTPException) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            result.ended = time.monotonic()
            with self._cond:
                self.results.append(result)
                self._done += 1
                self._cond.notify_all()

    def _killer(self) -> None:
        for threshold in self.kill_at:
            with self._cond:
                if not self._cond.wait_for(lambda: self._done >= threshold or self._stop.is_set(), timeout=60):
                    return
                if self._stop.is_set():
                    return
            self.server.descendants()  # remember them all, for the cleanup
            for _attempt in range(20):
                candidates = self.server.workers(self.manager_pid)
                if not candidates:
                    break
                pid = self._rng.choice(candidates)
                at = time.monotonic()
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue  # recycled meanwhile: pick another
                self.kills.append(Kill(pid, at))
                break

    def _sample(self, sampler: redis.Redis, pool_name: str) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, len(manager_clients(sampler, pool_name)))
            self.samples += 1
            self._stop.wait(0.01)

    def unexplained_failures(self, admin: redis.Redis) -> list[str]:
        """Failed requests not taken by a killed worker, nor in flight when one was killed."""
        killed = {k.pid for k in self.kills}
        problems = []
        for result in self.results:
            if result.ok:
                continue
            if result.status is not None:
                problems.append(f"{result.path} answered {result.status}: {result.body!r}")
                continue
            taker = admin.get(f"sharedpool-test:rid:{result.rid}")
            if taker is not None:
                if int(taker) not in killed:
                    problems.append(f"{result.path} failed ({result.error}) on worker {taker}, which was not killed")
            elif not any(result.started - 0.5 <= k.at <= result.ended for k in self.kills):
                problems.append(f"{result.path} failed ({result.error}) with no worker killed while it ran")
        return problems


REPLACEMENT_COUNTERS = (
    "connections_recycled", "connections_idle_closed", "health_checks_failed", "connections_dead_at_grant",
)


def check_fleet_under_load(server: Server, socket_path: str, admin: redis.Redis, redis_server: RedisServer,
                           pool_name: str, baseline: int, threads_per_worker: int,
                           most_requests_per_worker: int) -> dict[str, Any]:
    """Run the load and make every check of the issue; return the final stats.

    ``most_requests_per_worker``: the most a worker serves before it is
    recycled, so that the test knows how many workers must have served.
    """
    stats = manager_stats(socket_path)
    load = Load(server, stats["manager_pid"])
    sampler = redis_server.client(decode_responses=True)
    try:
        load.run(sampler, pool_name)
    finally:
        sampler.close()

    # Every request succeeded unless a killed worker had it.
    failures = [r for r in load.results if not r.ok]
    assert load.unexplained_failures(admin) == []
    assert len(load.kills) == len(load.kill_at), f"kills: {load.kills}"
    assert len(failures) <= len(load.kills) * load.threads
    takers = {r.body["pid"] for r in load.results if r.ok}
    # Recycling really happened (else the growth check below proves nothing).
    lifetimes = math.ceil((len(load.results) - len(failures)) / most_requests_per_worker)
    assert lifetimes > 4
    assert len(takers) >= lifetimes, f"only {len(takers)} distinct workers answered"

    # The manager's connections never exceeded the cap.
    assert load.samples > 20
    assert 1 <= load.peak <= MAX_CONNECTIONS, f"peak {load.peak} manager connections in CLIENT LIST"

    # No lease is left once the load is over.
    wait_for(lambda: manager_stats(socket_path)["leases"]["held"] == 0, 10, "every lease to come back")
    stats = manager_stats(socket_path)
    counters = stats["counters"]
    reaped = sum(v for k, v in counters.items() if k.startswith("reaped_"))
    replaced = reaped + sum(counters.get(k, 0) for k in REPLACEMENT_COUNTERS)
    # Only leases in flight on a killed worker are reaped.
    assert reaped <= len(load.kills) * threads_per_worker, counters
    assert counters["connections_opened"] <= MAX_CONNECTIONS + replaced, counters

    # Redis saw no connection but the manager's (and this test's sampler):
    # the workers, however many were recycled or killed, opened none.
    received = connections_received(admin) - baseline
    assert received <= counters["connections_opened"] + 1, (received, counters, len(takers))
    return stats


def connections_received(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_connections_received"])


# ----- gunicorn -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("worker_class", "threads", "preload"),
    [("sync", 1, False), ("gthread", 4, False), ("sync", 1, True)],
    ids=["sync", "gthread", "preload"],
)
def test_gunicorn_fleet_shares_the_cap_through_kills_and_recycling(
    worker_class: str, threads: int, preload: bool, tmp_path: Path, run_dir: Path,
    redis_server: RedisServer, admin: redis.Redis, servers: list[Server],
) -> None:
    pool_name = new_pool_name()
    extra_env = {"SHAREDPOOL_EMBEDDED": "1"}
    config = None
    if preload:
        # No socket path given: the config file's configure() makes a private
        # one and exports it before gunicorn imports the app.
        config = tmp_path / "warm_up.conf.py"
        config.write_text(WARM_UP_CONFIG.replace("EXAMPLE_CONFIG", repr(str(EXAMPLES / "gunicorn.conf.py"))))
    else:
        extra_env["SHAREDPOOL_SOCKET_PATH"] = str(run_dir / "sp.sock")
    env = base_env(redis_server, pool_name, **extra_env)
    baseline = connections_received(admin)
    server = gunicorn_server(tmp_path, env, worker_class=worker_class, threads=threads, preload=preload,
                             config=str(config) if config else None)
    servers.append(server.start())
    server.wait_ready()
    status, stats = server.get("/_stats")
    assert status == 200
    socket_path = stats["config"]["socket_path"]
    if preload:
        assert Path(socket_path).parent.name.startswith("sharedpool-gunicorn-")
        # The master used Redis in its on_starting, then let go of it before
        # forking: it holds no control connection.
        wait_for(lambda: server.pid not in {w["pid"] for w in manager_stats(socket_path)["workers"]},
                 10, "the master to close its own control connection")
    else:
        assert socket_path == str(run_dir / "sp.sock")
    assert stats["pool"] == pool_name

    # max_requests 30 + jitter 10; a gthread worker finishes what it accepted.
    check_fleet_under_load(server, socket_path, admin, redis_server, pool_name, baseline, threads, 40 + threads)

    manager_pid = manager_stats(socket_path)["manager_pid"]
    assert server.stop() == 0
    assert not psutil.pid_exists(manager_pid) or psutil.Process(manager_pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(socket_path)
    if preload:
        assert not os.path.exists(os.path.dirname(socket_path)), "the private socket directory is left behind"
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert "could not report dead worker" not in log


@pytest.mark.slow
def test_gunicorn_child_exit_reaps_a_dead_workers_lease_at_once(
    tmp_path: Path, run_dir: Path, redis_server: RedisServer, servers: list[Server],
) -> None:
    socket_path = str(run_dir / "sp.sock")
    # The sweep would take a minute: only child_exit can reap within the deadline.
    env = base_env(redis_server, new_pool_name(), SHAREDPOOL_EMBEDDED="1", SHAREDPOOL_SOCKET_PATH=socket_path,
                   SHAREDPOOL_REAP_INTERVAL="60")
    server = gunicorn_server(tmp_path, env, workers=1, max_requests=0)
    servers.append(server.start())
    server.wait_ready()
    status, held = server.get("/_hold")
    assert status == 200
    keeper = psutil.Process(held["keeper"])
    try:
        assert manager_stats(socket_path)["leases"]["held"] == 1
        server.descendants()
        os.kill(held["pid"], signal.SIGKILL)
        wait_for(lambda: manager_stats(socket_path)["leases"]["held"] == 0, 5, "child_exit to reap the lease")
        assert keeper.is_running(), "the keeper's control connection stayed open: EOF could not have reaped it"
        assert manager_stats(socket_path)["counters"]["reaped_holder_dead"] == 1
        wait_for(lambda: f"took back 1 lease(s) of dead worker {held['pid']}" in server.log(), 5, "the report in the log")
    finally:
        keeper.kill()


@pytest.mark.slow
def test_gunicorn_restarts_a_dead_embedded_manager_and_cleans_up(
    tmp_path: Path, redis_server: RedisServer, servers: list[Server],
) -> None:
    # The hooks alone, no config file of ours; no socket path: a private one.
    env = base_env(redis_server, new_pool_name(), SHAREDPOOL_EMBEDDED="1")
    server = gunicorn_server(tmp_path, env, workers=2, max_requests=0,
                             config="python:sharedpool.integrations.gunicorn")
    servers.append(server.start())
    server.wait_ready()
    _, stats = server.get("/_stats")
    socket_path, first_pid = stats["config"]["socket_path"], stats["manager_pid"]

    os.kill(first_pid, signal.SIGKILL)

    def restarted() -> int:
        try:
            pid = int(manager_stats(socket_path)["manager_pid"])
        except errors.SharedPoolError:
            return 0
        return pid if pid != first_pid else 0

    second_pid = wait_for(restarted, 20, "the embedded manager to be restarted")
    assert psutil.Process(second_pid).ppid() == server.pid

    # A worker's first request after the restart may fail on its dead
    # control connection; within a few requests each serves again.
    def serves() -> bool:
        try:
            return server.get("/incr")[0] == 200
        except OSError:
            return False

    for _ in range(4):
        wait_for(serves, 15, "the workers to use the new manager")

    assert server.stop() == 0
    assert not psutil.pid_exists(second_pid) or psutil.Process(second_pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(os.path.dirname(socket_path))
    assert "was killed by SIGKILL" in server.log()


@pytest.mark.slow
def test_embedded_manager_does_not_outlive_a_killed_master(
    tmp_path: Path, run_dir: Path, redis_server: RedisServer, servers: list[Server],
) -> None:
    socket_path = str(run_dir / "sp.sock")
    env = base_env(redis_server, new_pool_name(), SHAREDPOOL_EMBEDDED="1", SHAREDPOOL_SOCKET_PATH=socket_path)
    server = gunicorn_server(tmp_path, env, workers=1, max_requests=0)
    servers.append(server.start())
    server.wait_ready()
    manager = psutil.Process(manager_stats(socket_path)["manager_pid"])
    server.descendants()
    assert server.process is not None
    server.process.kill()  # no on_exit, no atexit
    server.process.wait()

    def gone() -> bool:
        try:
            return manager.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, 15, "the orphaned manager to stop")


def test_worker_abort_ends_the_leases_of_a_live_worker(start_manager: Any, tmp_path: Path) -> None:
    """A stuck request's lease comes back while the worker still lives."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    manager = start_manager(max_connections=2, min_idle=1)
    report = tmp_path / "stuck.txt"
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            r = sharedpool.Redis(socket_path=manager.socket_path, socket_timeout=None, retry=Retry(NoBackoff(), 0))
            started = threading.Event()

            def stuck() -> None:
                with r.lease() as pinned:
                    started.set()
                    try:
                        pinned.blpop(["sharedpool-test:never"], timeout=0)  # blocks until the lease ends
                        report.write_text("returned")
                    except Exception as exc:
                        report.write_text(type(exc).__name__)

            thread = threading.Thread(target=stuck, daemon=True)
            thread.start()
            started.wait(10)
            # What gunicorn's SIGABRT handler runs (any worker object will do).
            from sharedpool.integrations import gunicorn as hooks

            hooks.worker_abort(object())
            thread.join(10)
            code = 0 if not thread.is_alive() else 2
            threading.Event().wait(30)  # stay alive: the test kills us
        finally:
            os._exit(code)
    try:
        wait_for(lambda: report.exists() and report.read_text(), 10, "the stuck command to end")
        assert report.read_text() == "ConnectionError"
        assert psutil.pid_exists(child)
        stats = manager.stats()
        assert stats["leases"]["held"] == 0
        assert stats["counters"]["reaped_holder_closed"] == 1
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


# ----- uWSGI -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("lazy_apps", [False, True], ids=["preforked-app", "lazy-apps"])
def test_uwsgi_fleet_shares_the_cap_through_kills_and_recycling(
    lazy_apps: bool, tmp_path: Path, run_dir: Path, redis_server: RedisServer, admin: redis.Redis,
    servers: list[Server],
) -> None:
    pool_name = new_pool_name()
    socket_path = str(run_dir / "sp.sock")
    # The example's own 'env =' lines defer to the environment uWSGI starts with.
    env = base_env(redis_server, pool_name, SHAREDPOOL_SOCKET_PATH=socket_path)
    baseline = connections_received(admin)
    # Each lazy worker imports the app after its fork: recycle less often.
    max_requests = 50 if lazy_apps else 30
    server = uwsgi_server(tmp_path, env, lazy_apps=lazy_apps, max_requests=max_requests,
                          ini_env={"SHAREDPOOL_TEST_FROM_INI": "yes"})
    servers.append(server.start())
    server.wait_ready()
    # pyuwsgi started Python before it read 'env =': the integration copied it.
    assert server.get("/_env")[1].get("SHAREDPOOL_TEST_FROM_INI") == "yes"
    stats = manager_stats(socket_path)
    assert stats["pool"] == pool_name
    assert psutil.Process(stats["manager_pid"]).ppid() in (server.pid, *[c.pid for c in server.descendants()])

    # uWSGI adds worker_id * max-requests-delta to each worker's max-requests.
    check_fleet_under_load(server, socket_path, admin, redis_server, pool_name, baseline, 1, max_requests + 4 * 3)

    manager_pid = manager_stats(socket_path)["manager_pid"]
    wait_for(lambda: server.uwsgi_settled(manager_pid, 4, lazy_apps), 20, "uWSGI to finish recycling workers")
    assert server.stop() == 0
    assert not psutil.pid_exists(manager_pid) or psutil.Process(manager_pid).status() == psutil.STATUS_ZOMBIE
    assert "Traceback" not in server.log(), server.log()[-3000:]


# ----- the hooks themselves ------------------------------------------------------------------------------


def test_hooks_have_the_arity_gunicorn_checks() -> None:
    from gunicorn.config import Config

    from sharedpool.integrations import gunicorn as hooks

    config = Config()
    for name in hooks.__all__:
        config.set(name, getattr(hooks, name))  # raises on a wrong arity


def test_chain_calls_every_hook_in_order_with_gunicorn_arity() -> None:
    from gunicorn.config import Config

    from sharedpool.integrations import gunicorn as hooks

    calls: list[tuple[str, int]] = []

    def mine(server: Any, worker: Any) -> None:
        calls.append(("mine", worker))

    def also(server: Any, worker: Any) -> None:
        calls.append(("also", worker))

    chained = hooks.chain(mine, also)
    Config().set("post_fork", chained)
    chained(None, 7)
    assert calls == [("mine", 7), ("also", 7)]
    with pytest.raises(TypeError, match="different numbers of arguments"):
        hooks.chain(hooks.post_fork, hooks.worker_abort)


def test_settings_are_checked_and_name_what_is_wrong() -> None:
    settings = settings_from({"SHAREDPOOL_EMBEDDED": "yes"}, max_connections=3, manager_log="/tmp/m.log")
    assert settings.embedded and settings.manager == {"max_connections": 3}
    assert settings_from({}).embedded is False
    with pytest.raises(errors.ConfigError, match="max_connections"):
        settings_from({}, max_connections=0)
    with pytest.raises(errors.ConfigError, match="embeded"):
        settings_from({}, embeded=True)
    with pytest.raises(errors.ConfigError, match="SHAREDPOOL_EMBEDDED"):
        settings_from({"SHAREDPOOL_EMBEDDED": "maybe"})


def test_configure_exports_the_socket_path_for_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from sharedpool.integrations import gunicorn as hooks

    for name in ("SHAREDPOOL_SOCKET_PATH", "SHAREDPOOL_SOCKET"):
        monkeypatch.setenv(name, "x")  # so that monkeypatch restores the original state
        monkeypatch.delenv(name)
    monkeypatch.setattr(hooks, "_settings", None)
    monkeypatch.setattr(hooks, "_private_path", "")
    settings = hooks.configure(embedded=True)
    try:
        assert os.environ["SHAREDPOOL_SOCKET_PATH"] == settings.socket_path
        directory = Path(settings.socket_path).parent
        assert directory.is_dir() and (directory.stat().st_mode & 0o777) == 0o700
        assert sharedpool.SharedConnectionPool().config.socket_path == settings.socket_path
    finally:
        shutil.rmtree(Path(settings.socket_path).parent, ignore_errors=True)


def test_uwsgi_module_imports_and_registers_nothing_outside_uwsgi() -> None:
    from sharedpool.integrations import uwsgi

    assert uwsgi.register() is False
    assert uwsgi.import_uwsgi_environment() == []
    uwsgi.postfork()  # harmless in a process that did not fork


def test_close_control_channels_then_the_next_command_reconnects(manager: Any) -> None:
    r = sharedpool.Redis(socket_path=manager.socket_path)
    try:
        r.ping()
        assert close_control_channels() >= 1
        assert r.ping()  # a new channel on next use
    finally:
        r.close()

