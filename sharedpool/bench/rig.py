"""What the runs share: a Redis, a manager and a twemproxy per C, gunicorns for E2E; one ExitStack stops all."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from urllib.parse import unquote, urlsplit

import psutil
import redis

from sharedpool import admin
from sharedpool import table as tbl
from sharedpool.bench.e2e import Gunicorn
from sharedpool.bench.jobs import KEY_PREFIX, Job
from sharedpool.bench.report import SHARED, TWEMPROXY
from sharedpool.bench.settings import BenchSettings
from sharedpool.dev.launch import ManagerProcess
from sharedpool.dev.redis_server import RedisServer, free_port


class Skipped(Exception):
    """The time limit is spent: the remaining runs are skipped, the table still prints."""


class Twemproxy:
    """A nutcracker child listening on a unix socket, ``connections`` server connections."""

    def __init__(self, binary: str, directory: str, redis_url: str, connections: int) -> None:
        self.binary, self.redis_url, self.connections = binary, redis_url, connections
        self.path = os.path.join(directory, f"twemproxy-c{connections}.sock")
        self.config_path = os.path.join(directory, f"twemproxy-c{connections}.yml")
        self.log_path = os.path.join(directory, f"twemproxy-c{connections}.log")
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        url = urlsplit(self.redis_url)
        if url.scheme == "unix":
            server, db = url.path, int(dict(p.split("=", 1) for p in url.query.split("&") if "=" in p).get("db", 0))
        else:
            server, db = f"{url.hostname or '127.0.0.1'}:{url.port or 6379}", int(url.path.strip("/") or 0)
        lines = ["bench:", f"  listen: {self.path} 0600", "  redis: true", "  preconnect: true",
                 f"  server_connections: {self.connections}", "  auto_eject_hosts: false", "  timeout: 5000"]
        if url.password:
            lines.append(f"  redis_auth: {unquote(url.password)}")
        if db:
            lines.append(f"  redis_db: {db}")
        return "\n".join(lines + ["  servers:", f"   - {server}:1", ""])

    def start(self, timeout: float = 10.0) -> Twemproxy:
        # The file may hold the Redis password: only we may read it.
        with open(os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
            handle.write(self._config())
        self.process = subprocess.Popen(
            [self.binary, "-c", self.config_path, "-s", str(free_port()), "-a", "127.0.0.1", "-o", self.log_path,
             "-p", self.config_path + ".pid", "-v", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(unix_socket_path=self.path, protocol=2, driver_info=None, socket_timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, redis.TimeoutError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"twemproxy did not start; see {self.log_path}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def established(self) -> int:
        """Its Redis connections now: its only established TCP sockets (a unix-socket Redis shows 0)."""
        assert self.process is not None
        conns = psutil.Process(self.process.pid).net_connections(kind="inet")
        return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def _version_of(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].replace("This is ", "") if text else "?"


class Rig:
    """Redis, the managers (one per C) and twemproxies of a run, all stopped by ``stack``."""

    def __init__(self, settings: BenchSettings, args: argparse.Namespace, stack: ExitStack) -> None:
        self.settings, self.stack = settings, stack
        self.started = time.perf_counter()
        self.workdir = tempfile.mkdtemp(prefix="sharedpool-bench-")
        stack.callback(shutil.rmtree, self.workdir, True)
        self.external_manager: str | None = args.socket_path
        self._managers: dict[int, str] = {}
        self._twemproxies: dict[int, Twemproxy] = {}
        self.protocol = 3
        self._external_pid = 0
        redis_url: str | None = args.redis_url
        if self.external_manager:
            welcome = admin.welcome(self.external_manager)
            self.protocol = int(welcome.get("protocol", 3))
            self._managers[int(welcome["max_connections"])] = self.external_manager
            # Its C is the only one we can measure: the report shows that one.
            self.settings = replace(settings, max_connections=int(welcome["max_connections"]))
            self._external_pid = _local_pid(int(welcome.get("manager_pid", 0)), ("python", "sharedpool"))
            if not redis_url:
                redis_url = _url_from_label(str(welcome.get("redis", "")), int(welcome.get("db", 0)))
        if redis_url:
            self.redis_where = "given by --redis-url" if args.redis_url else "the manager's, from its WELCOME"
        else:
            server = RedisServer(directory=os.path.join(self.workdir, "redis"))
            os.makedirs(server.directory, mode=0o700, exist_ok=True)
            stack.callback(server.cleanup)
            server.start()
            redis_url, self.redis_where = server.url, f"started by bench: {server.binary}, {server.origin}"
        self.redis_url = redis_url
        self.admin = redis.Redis.from_url(redis_url, socket_timeout=5)
        stack.callback(self.admin.close)
        server_info = self.admin.info("server")
        self.redis_version = str(server_info.get("redis_version", "?"))
        self.redis_pid = _local_pid(int(server_info.get("process_id", 0)), ("redis", "valkey"))
        self._manager_pids: dict[str, int] = {}
        for i in range(16):
            self.admin.set(f"{KEY_PREFIX}k{i}", b"v" * 16)
        self.admin.set(KEY_PREFIX + "small", b"v" * 16)
        self.nutcracker = shutil.which("nutcracker") if "s4" in settings.scenarios and not args.no_twemproxy else None
        self.twemproxy_version = _version_of(self.nutcracker) if self.nutcracker else ""
        self.wrk = shutil.which("wrk") if {"e2e", "tls"} & set(settings.scenarios) else None
        self.has_gunicorn = importlib.util.find_spec("gunicorn") is not None
        self._gunicorns = 0

    @property
    def e2e_missing(self) -> str | None:
        """Why E2E cannot run here, or None."""
        if self.wrk is None:
            return "wrk is not on PATH (Debian: apt-get install wrk)"
        if not self.has_gunicorn:
            return "gunicorn is not installed (pip install gunicorn, or the test extra)"
        return None

    def check_time(self, runs: int = 1, seconds: float | None = None) -> None:
        """Raise ``Skipped`` when ``runs`` more windows (of ``seconds``, else the duration) would pass the limit."""
        limit = self.settings.time_limit
        window = self.settings.duration if seconds is None else seconds
        if limit and time.perf_counter() - self.started + runs * (window + 1.0) > limit:
            raise Skipped(f"time limit of {limit:g} s reached")

    # ----- systems ----------------------------------------------------------

    def sizes(self, wanted: list[int]) -> list[int]:
        """The C values that can run: all wanted ones, or the external manager's only."""
        if self.external_manager:
            return list(self._managers)
        return sorted(set(wanted))

    def manager(self, connections: int) -> str:
        if self.external_manager:
            return self.external_manager
        if connections not in self._managers:
            path = os.path.join(self.workdir, f"manager-c{connections}.sock")
            manager = ManagerProcess(path, self.redis_url, log_path=path + ".log", max_connections=connections,
                                     min_idle=connections, pool_name=f"bench-c{connections}", log_level="WARNING")
            self.stack.callback(manager.stop, 5.0)  # registered first: a half-started one is stopped too
            manager.start(timeout=15.0)
            self._managers[connections] = path
            self._manager_pids[path] = manager.pid
            deadline = time.monotonic() + 10.0
            while self.manager_open(path) < connections:  # min_idle: all open before any window
                if time.monotonic() > deadline:
                    raise RuntimeError(f"manager with max_connections={connections} did not open them within 10 s")
                time.sleep(0.02)
        return self._managers[connections]

    def manager_open(self, path: str) -> int:
        return int(admin.stats(path)["connections"]["open"])

    def wait_histogram(self, path: str) -> list[int]:
        """The manager's lease wait-time histogram, the one ``stats()["wait_time"]`` summarises.

        Read from the lease table it hands every client, so that a run can
        take the difference over its own window: the snapshot's p50/p99 are
        over the manager's whole life.
        """
        with admin.channel(path) as channel:
            geometry = channel.welcome["table"]
            table = tbl.Table(os.dup(channel.table_fd), int(geometry["capacity"]), int(geometry["waiter_capacity"]))
            try:
                return table.histograms(table.capacity)[0]
            finally:
                table.close()

    def twemproxy(self, connections: int) -> str:
        if connections not in self._twemproxies:
            assert self.nutcracker is not None
            proxy = Twemproxy(self.nutcracker, self.workdir, self.redis_url, connections)
            self.stack.callback(proxy.stop)
            self._twemproxies[connections] = proxy.start()
        return self._twemproxies[connections].path

    def gunicorn(self, system: str, address: str) -> Gunicorn:
        """E2E: a launched gunicorn whose workers use ``system`` at ``address``; stopped by the stack at the latest."""
        env = {"SHAREDPOOL_BENCH_SYSTEM": system, "SHAREDPOOL_BENCH_PROTOCOL": str(self.protocol)}
        env["SHAREDPOOL_BENCH_SOCKET" if system == SHARED else "SHAREDPOOL_BENCH_REDIS_URL"] = address
        self._gunicorns += 1
        server = Gunicorn(self.workdir, f"{system}-{self._gunicorns}", self.settings.http_workers, env)
        self.stack.callback(server.stop)
        return server.launch()

    def manager_pid(self, path: str) -> int:
        return self._manager_pids.get(path) or self._external_pid

    def with_duration(self, seconds: float) -> Rig:
        """The same rig with another window length (S1 runs its three modes in one window)."""
        other = copy.copy(self)
        other.settings = replace(self.settings, duration=seconds)
        return other

    def sidecar_pids(self, job: Job) -> list[int]:
        """Processes besides the workers that spend CPU on this system's requests."""
        pids = [self.redis_pid] if self.redis_pid else []
        if job.system == SHARED:
            pid = self.manager_pid(job.address)
            pids += [pid] if pid else []
        elif job.system == TWEMPROXY:
            pids += [p.process.pid for p in self._twemproxies.values() if p.path == job.address and p.process]
        return pids

    def own_connections(self, job: Job) -> int:
        """Redis connections the system under test holds before its workers start."""
        if job.system == SHARED:
            return self.manager_open(job.address)
        if job.system == TWEMPROXY:
            return next(p.established() for p in self._twemproxies.values() if p.path == job.address)
        return 0

    # ----- Redis INFO -----------------------------------------------------------

    def connected_clients(self) -> int:
        return int(self.admin.info("clients")["connected_clients"])

    def connections_received(self) -> int:
        return int(self.admin.info("stats")["total_connections_received"])


def _local_pid(pid: int, names: tuple[str, ...]) -> int:
    """``pid`` when it is a process of that kind on this host (a remote Redis's pid means nothing here)."""
    try:
        name = psutil.Process(pid).name().lower() if pid else ""
    except psutil.Error:
        return 0
    return pid if any(n in name for n in names) else 0


def _url_from_label(label: str, db: int) -> str:
    if not label:
        raise ValueError("the manager did not say which Redis it serves: pass --redis-url")
    return f"unix://{label}?db={db}" if label.startswith("/") else f"redis://{label}/{db}"
