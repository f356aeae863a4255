"""The manager process: start, socket ownership, permissions, stop."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from support.cli import run_cli
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool
from sharedpool.dev.launch import ManagerProcess


def test_socket_dir_0700_socket_0600_and_min_idle_open_at_start(start_manager, admin: redis.Redis, tmp_path) -> None:
    path = tmp_path / "fresh" / "dir" / "sp.sock"
    manager = start_manager(socket_path=str(path), max_connections=4, min_idle=3)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    wait_for(lambda: len(manager_clients(admin, manager.pool_name)) == 3, what="min_idle connections")
    names = sorted(c["name"] for c in manager_clients(admin, manager.pool_name))
    assert names == [f"sharedpool:{manager.pool_name}:{i}" for i in range(3)]


def test_acceptance_many_processes_at_most_max_connections(start_manager, admin: redis.Redis, tmp_path) -> None:
    manager = start_manager(socket_path=str(tmp_path / "x" / "sp.sock"), max_connections=4, min_idle=1)
    script = (
        "import sharedpool, sys\n"
        "r = sharedpool.Redis(socket_path=sys.argv[1], acquire_timeout=30)\n"
        "for i in range(200):\n"
        "    r.set(f'acc:{sys.argv[2]}:{i}', i)\n"
        "    assert int(r.get(f'acc:{sys.argv[2]}:{i}')) == i\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, manager.socket_path, str(n)]) for n in range(10)]
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max(peak, len(manager_clients(admin, manager.pool_name)))
    assert [p.wait() for p in procs] == [0] * 10
    assert 1 <= peak <= 4


def test_second_manager_on_the_same_socket_is_refused(manager: ManagerProcess, redis_server) -> None:
    second = run_cli("serve", "--socket", manager.socket_path, "--redis-url", redis_server.url)
    assert second.returncode == 1
    assert f"another manager (pid {manager.pid}) already serves {manager.socket_path}" in second.stderr
    assert sharedpool.Redis(socket_path=manager.socket_path).ping() is True


def test_stale_socket_file_is_replaced(start_manager, tmp_path) -> None:
    path = tmp_path / "stale" / "sp.sock"
    path.parent.mkdir(mode=0o700)
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    leftover.bind(str(path))
    leftover.close()  # the file stays, nobody listens: what a SIGKILLed manager leaves
    manager = start_manager(socket_path=str(path))
    assert sharedpool.Redis(socket_path=manager.socket_path).ping() is True


def test_manager_restarts_after_sigkill_on_the_same_path(start_manager) -> None:
    first = start_manager()
    first.kill()
    second = start_manager(socket_path=first.socket_path)
    assert sharedpool.Redis(socket_path=second.socket_path).ping() is True


def test_sigterm_waits_for_leases_then_removes_the_socket(start_manager) -> None:
    manager = start_manager(max_connections=2, shutdown_grace=30)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    held = pool.get_connection()
    manager.signal(signal.SIGTERM)
    wait_for(lambda: manager.stats()["state"] == "draining", what="draining state")
    other = sharedpool.SharedConnectionPool(manager.socket_path)
    with pytest.raises(sharedpool.ShuttingDown):
        other.get_connection()
    assert manager.process.poll() is None  # still waiting for our lease
    held.send_command("PING")
    assert held.read_response() == b"PONG"  # the lease still works during the grace period
    pool.release(held)
    assert manager.process.wait(15) == 0
    assert not os.path.exists(manager.socket_path)
    pool.disconnect()
    other.disconnect()


def test_sigterm_grace_period_ends_held_leases(start_manager) -> None:
    manager = start_manager(max_connections=1, shutdown_grace=0.5)
    pool = sharedpool.SharedConnectionPool(manager.socket_path)
    held = pool.get_connection()
    manager.signal(signal.SIGTERM)
    assert manager.process.wait(15) == 0
    with pytest.raises(redis.ConnectionError):
        held.send_command("PING")
        held.read_response()
    assert not os.path.exists(manager.socket_path)
    pool.disconnect()


def test_socket_group_shares_socket_and_directory(start_manager, tmp_path) -> None:
    import grp

    group = grp.getgrgid(os.getgid()).gr_name if os.getgid() else "root"
    path = tmp_path / "shared" / "sp.sock"
    start_manager(socket_path=str(path), socket_group=group, socket_mode="660")
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert os.stat(path).st_gid == grp.getgrnam(group).gr_gid


def test_unknown_socket_group_is_refused(tmp_path) -> None:
    result = run_cli("serve", "--socket", str(tmp_path / "s.sock"), "--socket-group", "no-such-group-x")
    assert result.returncode == 2
    assert "invalid socket_group='no-such-group-x': an existing group name or a numeric gid" in result.stderr


def test_sighup_reloads_limits_and_a_new_redis_url_replaces_connections(start_manager, tmp_path, admin, redis_server) -> None:
    from sharedpool.dev.redis_server import RedisServer

    config_file = tmp_path / "sharedpool.toml"
    config_file.write_text(f'max_connections = 2\nmin_idle = 1\nredis_url = "{redis_server.url}"\n')
    os.chmod(config_file, 0o600)
    # Started by hand: the factory passes the URL by environment, which
    # would outrank the file we are about to change.
    manager = ManagerProcess(
        socket_path=str(tmp_path / "reload" / "sp.sock"), redis_url="",
        log_path=str(tmp_path / "reload.log"), config=str(config_file), pool_name=f"reload{os.getpid()}",
    )
    manager.pool_name = f"reload{os.getpid()}"
    start_manager.started.append(manager)
    manager.start()
    assert manager.stats()["config"]["max_connections"] == 2
    wait_for(lambda: manager_clients(admin, manager.pool_name), what="the first connection")

    other = RedisServer(directory=str(tmp_path / "other")).start()
    try:
        config_file.write_text(f'max_connections = 3\nmin_idle = 2\nredis_url = "{other.url}"\n')
        manager.signal(signal.SIGHUP)
        wait_for(lambda: manager.stats()["config"]["max_connections"] == 3, what="limits applied live")
        other_admin = other.client(decode_responses=True)
        wait_for(lambda: len(manager_clients(other_admin, manager.pool_name)) == 2, what="connections on the new Redis")
        wait_for(lambda: not manager_clients(admin, manager.pool_name), what="old connections drained")
        r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
        r.set("moved", "yes")
        assert other_admin.get("moved") == "yes"
        r.close()
        other_admin.close()
        # A bad file is refused and the running configuration kept.
        config_file.write_text("max_connections = -1\n")
        manager.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in Path(manager.log_path).read_text(), what="refusal logged")
        assert manager.stats()["config"]["max_connections"] == 3 and manager.process.poll() is None
    finally:
        other.cleanup()
