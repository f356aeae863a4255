"""A throwaway Sentinel group on loopback for the tests and the benchmark:
one master, one replica, three Sentinels, each our own child process.

The Sentinels are the same server binary started with ``--sentinel`` and a
config file (Sentinel needs one on disk: it rewrites it with what it
learns). Their timings are cut to seconds (``down_after_ms``,
``failover_timeout_ms``) so that a failover under test takes seconds, not
the production minutes. ``failover()`` forces one with ``SENTINEL
FAILOVER`` and waits until the Sentinels name the new master.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import redis

from sharedpool.dev.redis_server import RedisServer, ServerBinary, ServerProcess, find_redis_server, free_port


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except redis.RedisError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class SentinelProcess(ServerProcess):
    """One Sentinel (``<server> <config> --sentinel``) on 127.0.0.1:<port>."""

    def __init__(
        self, binary: str, directory: str, service: str, master_port: int, *, password: str = "", master_password: str = "",
        quorum: int = 2, down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
    ) -> None:
        self.binary = binary
        self.port = free_port()
        self.directory = directory
        self.password = password
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.config_path = os.path.join(directory, "sentinel.conf")
        lines = [
            f"port {self.port}", "bind 127.0.0.1", "daemonize no", f"dir {directory}", "loglevel notice",
            f"logfile {os.path.join(directory, 'sentinel.log')}",
            f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
        ]
        if master_password:
            lines.append(f"sentinel auth-pass {service} {master_password}")
        if password:
            # Its own clients' password, and the one it gives the other Sentinels.
            lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> SentinelProcess:
        self.process = subprocess.Popen(
            [self.binary, self.config_path, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = self.client()
        try:
            _wait(client.ping, timeout, f"sentinel on port {self.port}")
        finally:
            client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password or None, socket_timeout=5,
                           decode_responses=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class SentinelGroup:
    """A master, a replica of it and three Sentinels watching ``service``."""

    def __init__(
        self, directory: str | None = None, *, service: str = "mymaster", password: str = "", sentinel_password: str = "",
        binary: str | None = None, sentinels: int = 3,
    ) -> None:
        found = ServerBinary(binary, "given") if binary else find_redis_server()
        self.binary = found.path
        self.service = service
        self.password = password
        self.sentinel_password = sentinel_password
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="sharedpool-sentinel-")
        self.master = RedisServer(directory=os.path.join(self.directory, "a"), binary=self.binary, password=password)
        self.replica = RedisServer(
            directory=os.path.join(self.directory, "b"), binary=self.binary, password=password,
            extra_args=("--replicaof", "127.0.0.1", str(self.master.port)),
        )
        self.sentinels = [
            SentinelProcess(self.binary, os.path.join(self.directory, f"s{i}"), service, self.master.port,
                            password=sentinel_password, master_password=password)
            for i in range(sentinels)
        ]

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    @property
    def sentinel_addresses(self) -> str:
        """The ``--sentinels`` value: host:port,host:port,..."""
        return ",".join(sentinel.address for sentinel in self.sentinels)

    def start(self, timeout: float = 30.0) -> SentinelGroup:
        try:
            self.master.start()
            self.replica.start()
            replica = self.replica.client(decode_responses=True)
            def in_sync() -> bool:
                return bool(replica.info("replication").get("master_link_status") == "up")

            try:
                _wait(in_sync, timeout, "the replica in sync")
            finally:
                replica.close()
            for sentinel in self.sentinels:
                sentinel.start()
            # A failover needs a Sentinel that knows the replica (it learns it from the master's INFO).
            for sentinel in self.sentinels:
                client = sentinel.client()
                try:
                    _wait(functools.partial(self._knows_replica, client), timeout, f"{sentinel.address} to see the replica")
                finally:
                    client.close()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _knows_replica(self, client: redis.Redis) -> bool:
        replicas = client.execute_command("SENTINEL", "REPLICAS", self.service)
        return any(
            int(entry.get("port", 0)) in (self.master.port, self.replica.port)
            and "disconnected" not in entry.get("flags", "") and "s_down" not in entry.get("flags", "")
            for entry in _as_dicts(replicas)
        )

    def master_port(self, sentinel: int = 0) -> int:
        """The port of the master as Sentinel ``sentinel`` names it."""
        client = self.sentinels[sentinel].client()
        try:
            _host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            return int(port)
        finally:
            client.close()

    def _names(self, sentinel: int, port: int) -> bool:
        return self.master_port(sentinel) == port

    def current_master(self) -> RedisServer:
        port = self.master_port()
        return self.master if port == self.master.port else self.replica

    def failover(self, timeout: float = 30.0) -> tuple[RedisServer, RedisServer]:
        """Force a failover (``SENTINEL FAILOVER``); return (old master, new master) once every Sentinel names the new one."""
        old = self.current_master()
        new = self.replica if old is self.master else self.master
        deadline = time.monotonic() + timeout
        client = self.sentinels[0].client()
        try:
            while True:
                # NOGOODSLAVE while the Sentinel has not seen the replica fresh enough yet; INPROG while one runs.
                _wait(lambda: client.execute_command("SENTINEL", "FAILOVER", self.service),
                      deadline - time.monotonic(), "SENTINEL FAILOVER accepted")
                try:
                    # On a loaded machine the promotion can outlast failover-timeout: the Sentinel
                    # then aborts the forced failover and never retries it by itself, so we do.
                    _wait(functools.partial(self._names, 0, new.port), min(10.0, deadline - time.monotonic()),
                          f"sentinel 0 to name port {new.port}")
                    break
                except RuntimeError:
                    if time.monotonic() >= deadline:
                        raise
        finally:
            client.close()
        for index in range(1, len(self.sentinels)):
            _wait(functools.partial(self._names, index, new.port), timeout, f"sentinel {index} to name port {new.port}")
        return old, new

    def wait_replica_of(self, server: RedisServer, master: RedisServer, timeout: float = 30.0) -> None:
        """Wait until ``server`` replicates ``master`` (Sentinel reconfigures a demoted master after a while)."""
        client = server.client(decode_responses=True)

        def replicates() -> bool:
            info = client.info("replication")
            return bool(info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port)

        try:
            _wait(replicates, timeout, f"port {server.port} to replicate {master.port}")
        finally:
            client.close()

    def cleanup(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()
        for server in self.servers:
            server.cleanup()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _as_dicts(reply: Any) -> list[dict[str, str]]:
    """SENTINEL REPLICAS as dicts, whether redis-py parsed it (RESP3, or its response callback) or not."""
    entries: list[dict[str, str]] = []
    for entry in reply or []:
        if isinstance(entry, dict):
            entries.append({str(k): str(v) for k, v in entry.items()})
        else:
            items = list(entry)
            entries.append({str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)})
    return entries
