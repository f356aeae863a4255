"""Real gunicorn and uWSGI fleets sharing one manager: kills, recycling, the cap.

Each test starts the server as a subprocess on a free port, with its own
control socket and pool name (SHAREDPOOL_POOL_NAME), so that CLIENT LIST
tells its manager's connections apart. The load comes from this process: a
bounded number of requests from a few threads, with worker SIGKILLs at
fixed points of progress, while the servers also recycle their workers
(max_requests). The harnesses are in ``support.servers`` and ``support.load``.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from support.load import Load
from support.servers import EXAMPLES, MAX_CONNECTIONS, Server, base_env, gunicorn_server, uwsgi_server
from support.waiting import wait_for

import sharedpool
from sharedpool import errors
from sharedpool.admin import stats as manager_stats
from sharedpool.dev.redis_server import RedisServer
from sharedpool.integrations import close_control_channels, settings_from

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


def new_pool_name() -> str:
    return f"it{os.getpid()}x{next(_names)}"


# ----- load ----------------------------------------------------------------------------------


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
        # Taken back by the manager: LeaseLost, a redis.ConnectionError.
        assert report.read_text() == "LeaseLost"
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

