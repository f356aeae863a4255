"""A manager behind Sentinels: a real group on loopback (one master, one replica, three
Sentinels: the server binary with ``--sentinel``), a forced ``SENTINEL FAILOVER`` under a
fleet of writer processes, and Redis's own CLIENT LIST as the witness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import multiprocess
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool
from sharedpool.config import ManagerConfig, build
from sharedpool.dev.redis_server import RedisServer, free_port
from sharedpool.dev.sentinel import SentinelGroup
from sharedpool.errors import ConfigError

ctx = multiprocess.get_context("fork")

MASTER_PASSWORD = "master-secret-4711"
SENTINEL_PASSWORD = "sentinel-secret-0815"
MAX_CONNECTIONS = 4
REDIS_TIMEOUT = 2.0
# The README's bound ("Sentinel"): once the Sentinels name the new master, errors stop within
# redis_timeout (the revocation of a lease still on the old master) plus one second.
ERRORS_STOP_WITHIN = REDIS_TIMEOUT + 1.0


def _writer(socket_path: str, index: int, stop: Any, report: Any) -> None:
    """SET w<index>:<n> = n for n = 0, 1, ...; report (acked at, n, outcome) for each."""
    # No retries: every failure must surface, so the test sees each one and when.
    r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, retry=Retry(NoBackoff(), 0), manager_timeout=2)
    outcomes: list[tuple[float, int, str]] = []
    parent = os.getppid()
    n = 0
    while not stop.is_set() and os.getppid() == parent:  # never outlive a killed test run
        try:
            r.set(f"w{index}:{n}", n)
            outcomes.append((time.monotonic(), n, "ok"))
        except redis.RedisError as exc:
            outcomes.append((time.monotonic(), n, f"{type(exc).__name__}: {exc}"))
            time.sleep(0.01)
        n += 1
    report.put((index, outcomes))


class CapWatch(threading.Thread):
    """Samples the manager's stats and each server's CLIENT LIST until stopped; keeps the peaks."""

    def __init__(self, manager: Any, servers: list[RedisServer]) -> None:
        super().__init__(daemon=True)
        self.manager = manager
        self.clients = [server.client(decode_responses=True, socket_timeout=5) for server in servers]
        self.stopping = threading.Event()
        self.peak_manager = 0
        self.peak_server = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            connections = self.manager.stats()["connections"]
            self.peak_manager = max(self.peak_manager, connections["open"] + connections["connecting"])
            for client in self.clients:
                self.peak_server = max(self.peak_server, len(manager_clients(client, self.manager.pool_name)))
            self.samples += 1
            self.stopping.wait(0.02)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        for client in self.clients:
            client.close()


@pytest.fixture
def group(tmp_path: Any) -> Any:
    with SentinelGroup(str(tmp_path / "group"), password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD) as started:
        yield started


def _sentinel_manager(start_manager: Any, group: SentinelGroup, **settings: Any) -> Any:
    return start_manager(
        # The master's password and database; its host and port come from the Sentinels.
        redis_url=f"redis://:{MASTER_PASSWORD}@localhost/0",
        sentinels=group.sentinel_addresses, sentinel_service=group.service, sentinel_password=SENTINEL_PASSWORD,
        **settings,
    )


@pytest.mark.slow
def test_failover_under_a_fleet_of_writers(group: SentinelGroup, start_manager: Any) -> None:
    manager = _sentinel_manager(
        start_manager, group, max_connections=MAX_CONNECTIONS, min_idle=1, reap_interval=0.2, redis_timeout=REDIS_TIMEOUT,
    )
    old_address = f"127.0.0.1:{group.master.port}"
    assert wait_for(lambda: manager.stats()["sentinel"]["master"] == old_address, what="the master found")
    watch = CapWatch(manager, group.servers)
    watch.start()
    stop, report = ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(manager.socket_path, index, stop, report)) for index in range(6)]
    for writer in writers:
        writer.start()
    try:
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > 300, what="writes before the failover")
        failover_at = time.monotonic()
        old, new = group.failover()
        named_at = time.monotonic()  # every Sentinel names the new master now
        new_address = f"127.0.0.1:{new.port}"
        assert old is group.master
        wait_for(lambda: manager.stats()["sentinel"]["master"] == new_address, timeout=ERRORS_STOP_WITHIN,
                 what="the manager on the new master")
        # Sentinel demotes the old master only about 10 s later (and then kills its clients):
        # until then it still takes writes, so only the manager's drain can empty it.
        old_admin = old.client(decode_responses=True)
        try:
            wait_for(lambda: not manager_clients(old_admin, manager.pool_name), timeout=ERRORS_STOP_WITHIN,
                     what="no manager connection left on the old master")
            drained_at = time.monotonic()
            assert old_admin.execute_command("ROLE")[0] == "master", "drained by Sentinel's demotion, not by the manager"
        finally:
            old_admin.close()
        # Writes past the bound, to check where they land.
        past_bound = named_at + ERRORS_STOP_WITHIN + 1.0
        wait_for(lambda: time.monotonic() > past_bound, what="writes past the bound")
        granted = manager.stats()["counters"]["leases_granted"]
        wait_for(lambda: manager.stats()["counters"]["leases_granted"] > granted + 500, timeout=30,
                 what="writes after the failover")
    finally:
        stop.set()
        results = dict(report.get(timeout=60) for _ in writers)
        for writer in writers:
            writer.join(10)
        watch.stop()
    assert manager.process.poll() is None  # the manager followed the failover without restarting
    assert all(writer.exitcode == 0 for writer in writers)  # the workers changed nothing either

    errors = [(at, text) for outcomes in results.values() for at, _n, text in outcomes if text != "ok"]
    print(f"failover: Sentinels named the new master {named_at - failover_at:.2f} s after SENTINEL FAILOVER, "
          f"old master drained {drained_at - named_at:.2f} s later; {len(errors)} errors, the last "
          f"{max((at for at, _ in errors), default=named_at) - named_at:.2f} s after: {sorted(set(t for _, t in errors))[:5]}")
    assert all(text.startswith(("ConnectionError", "ReplicaAnswered", "LeaseLost", "RedisUnavailable", "TimeoutError"))
               for _at, text in errors), errors[:5]
    assert all(at > failover_at for at, _text in errors), errors[:5]
    late = [(round(at - named_at, 3), text) for at, text in errors if at > named_at + ERRORS_STOP_WITHIN]
    assert not late, f"errors more than {ERRORS_STOP_WITHIN} s after the Sentinels named the new master: {late[:5]}"

    # Every write acknowledged after that is on the new master.
    new_admin = new.client(decode_responses=True)
    try:
        checked = 0
        for index, outcomes in results.items():
            after = [n for at, n, text in outcomes if text == "ok" and at > named_at + ERRORS_STOP_WITHIN]
            assert after, f"writer {index} wrote nothing after the failover"
            for start in range(0, len(after), 500):
                batch = after[start:start + 500]
                found = new_admin.mget([f"w{index}:{n}" for n in batch])
                missing = [n for n, value in zip(batch, found, strict=True) if value != str(n)]
                assert not missing, f"writer {index}: {len(missing)} acknowledged writes not on the new master: {missing[:5]}"
            checked += len(after)
        assert checked > 500
        assert len(manager_clients(new_admin, manager.pool_name)) >= 1
    finally:
        new_admin.close()

    # The cap held throughout, in the manager's count and in each server's CLIENT LIST.
    assert watch.samples > 20
    assert 1 <= watch.peak_manager <= MAX_CONNECTIONS
    assert 1 <= watch.peak_server <= MAX_CONNECTIONS

    stats = manager.stats()
    assert stats["sentinel"]["failovers"] == 1 == stats["counters"]["failovers"]
    assert stats["redis"] == new_address
    check = subprocess.run([sys.executable, "-m", "sharedpool", "check", "--socket-path", manager.socket_path],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"master {new_address}" in check.stdout and "failovers 1" in check.stdout, check.stdout
    shown = subprocess.run([sys.executable, "-m", "sharedpool", "stats", "--socket-path", manager.socket_path],
                           capture_output=True, text=True, timeout=30)
    assert f"sentinel     service 'mymaster'  master {new_address}  failovers 1" in shown.stdout, shown.stdout
    # Neither password in the log, the stats or what check prints.
    with open(manager.log_path, encoding="utf-8", errors="replace") as handle:
        seen = handle.read() + json.dumps(stats) + check.stdout + shown.stdout
    assert "failover: master of 'mymaster' moved" in seen
    assert MASTER_PASSWORD not in seen and SENTINEL_PASSWORD not in seen


def test_sentinels_unreachable_at_start(start_manager: Any) -> None:
    """Like Redis down at start: the manager runs, retries, and says why in one line."""
    nobody = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    manager = start_manager(sentinels=nobody, sentinel_service="mymaster", sentinel_timeout=0.2,
                            sentinel_password=SENTINEL_PASSWORD)
    r = sharedpool.Redis(socket_path=manager.socket_path, retry=Retry(NoBackoff(), 0), acquire_timeout=2)
    try:
        with pytest.raises(sharedpool.RedisUnavailable, match="no Sentinel named a master of 'mymaster'"):
            r.ping()
    finally:
        r.close()
    stats = manager.stats()
    assert stats["sentinel"]["master"] is None
    assert "Connection refused" in stats["last_redis_error"] or "Connection refused" in stats["sentinel"]["last_error"]
    assert manager.process.poll() is None
    assert SENTINEL_PASSWORD not in json.dumps(stats)
    assert stats["config"]["sentinel_password"] == "***"
    check = subprocess.run([sys.executable, "-m", "sharedpool", "check", "--socket-path", manager.socket_path],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 1
    assert check.stdout.startswith("not ok:") and "no Sentinel named a master of 'mymaster'" in check.stdout, check.stdout


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"sentinels": "127.0.0.1:26379"}, "sentinels"),
        ({"sentinel_service": "mymaster"}, "sentinel_service"),
        ({"sentinels": "127.0.0.1", "sentinel_service": "m"}, "sentinels"),
        ({"sentinels": "127.0.0.1:0", "sentinel_service": "m"}, "sentinels"),
        ({"sentinel_password": "x"}, "sentinel_password"),
        ({"sentinels": "127.0.0.1:26379", "sentinel_service": "m", "redis_url": "unix:///tmp/r.sock"}, "redis_url"),
    ],
)
def test_bad_sentinel_settings_are_refused(settings: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        build(ManagerConfig, environ={}, overrides=settings)
    assert refused.value.field == field
    if field == "sentinel_password":
        assert "'***'" in str(refused.value)


def test_sentinel_settings_from_every_source(tmp_path: Any) -> None:
    toml = {"sentinels": ["10.0.0.1:26379", "[::1]:26380"], "sentinel_service": "cache"}
    config = build(ManagerConfig, toml=toml, environ={"SHAREDPOOL_SENTINEL_PASSWORD": SENTINEL_PASSWORD},
                   overrides={"sentinel_timeout": "0.5"})
    assert config.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert config.sentinel_service == "cache" and config.sentinel_timeout == 0.5
    assert config.sentinel_password == SENTINEL_PASSWORD
    assert SENTINEL_PASSWORD not in repr(config)
    assert config.safe_dict()["sentinels"] == "10.0.0.1:26379,[::1]:26380"


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["revoked", "demoted"])
def test_a_lease_held_across_the_failover(group: SentinelGroup, start_manager: Any, ending: str) -> None:
    """A lease on the old master ends once: revoked after redis_timeout, or READONLY when the old
    master is demoted first (here by hand, sooner than Sentinel would). The next lease is on the new master."""
    redis_timeout = REDIS_TIMEOUT if ending == "revoked" else 60.0
    manager = _sentinel_manager(start_manager, group, max_connections=2, min_idle=1, reap_interval=0.2,
                                redis_timeout=redis_timeout)
    r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, retry=Retry(NoBackoff(), 0))
    try:
        with r.lease() as pinned:
            pinned.set("before", "1")
            old, new = group.failover()
            new_address = f"127.0.0.1:{new.port}"
            wait_for(lambda: manager.stats()["sentinel"]["master"] == new_address, what="the manager on the new master")
            old_admin = old.client(decode_responses=True)
            try:
                if ending == "demoted":
                    old_admin.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
                    expected: type[Exception] = sharedpool.ReplicaAnswered
                else:
                    wait_for(lambda: not manager_clients(old_admin, manager.pool_name), timeout=redis_timeout + 2,
                             what="the held lease revoked and its connection gone")
                    expected = sharedpool.LeaseLost
                with pytest.raises(expected):
                    pinned.set("during", "1")
                if ending == "demoted":
                    wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="still held until the block ends")
            finally:
                old_admin.close()
        assert r.set("after", "1") is True
        new_admin = new.client(decode_responses=True)
        try:
            assert new_admin.get("after") == "1"
            assert manager_clients(new_admin, manager.pool_name)
        finally:
            new_admin.close()
        stats = manager.stats()
        assert stats["sentinel"]["failovers"] == 1
        assert stats["counters"]["reaped_revoked"] == (1 if ending == "revoked" else 0)
        wait_for(lambda: manager.stats()["sentinel"]["draining"] == 0, what="nothing left of the old master")
    finally:
        r.close()


def test_a_spawned_manager_gets_the_sentinel_password_by_environment() -> None:
    from sharedpool.spawn import ServeCommand

    command = ServeCommand("/tmp/sp.sock", {"sentinels": (("10.0.0.1", 26379), ("::1", 26380)), "sentinel_service": "m",
                                            "sentinel_password": SENTINEL_PASSWORD})
    argv = command.arguments()
    assert argv[argv.index("--sentinels") + 1] == "10.0.0.1:26379,[::1]:26380"
    assert SENTINEL_PASSWORD not in " ".join(command.argv())  # argv is world-readable in /proc
    assert command.environ({})["SHAREDPOOL_SENTINEL_PASSWORD"] == SENTINEL_PASSWORD


@pytest.mark.slow
def test_asyncio_lease_on_a_demoted_master(group: SentinelGroup, start_manager: Any) -> None:
    """The asyncio client's READONLY is the same broken lease and ConnectionError as the sync one's."""
    import asyncio

    from redis.asyncio.retry import Retry as AsyncRetry

    import sharedpool.asyncio as spa

    manager = _sentinel_manager(start_manager, group, max_connections=2, min_idle=1, reap_interval=0.2, redis_timeout=60)

    async def run() -> None:
        r = spa.Redis(socket_path=manager.socket_path, decode_responses=True, retry=AsyncRetry(NoBackoff(), 0))
        try:
            async with r.lease() as pinned:
                await pinned.set("before", "1")
                old, new = await asyncio.to_thread(group.failover)
                new_address = f"127.0.0.1:{new.port}"
                await asyncio.to_thread(wait_for, lambda: manager.stats()["sentinel"]["master"] == new_address)
                old_admin = old.client()
                try:
                    old_admin.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
                finally:
                    old_admin.close()
                with pytest.raises(sharedpool.ReplicaAnswered):
                    await pinned.set("during", "1")
            assert await r.set("after", "1") is True
        finally:
            await r.aclose()

    asyncio.run(run())
    assert manager.stats()["sentinel"]["failovers"] == 1
