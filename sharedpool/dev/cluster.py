"""A throwaway Redis Cluster on loopback, for the tests and the benchmark.

``LocalCluster(primaries=3, replicas=1)`` starts that many ``redis-server``
children (``--cluster-enabled yes``, each its own port and directory, the
binary ``find_redis_server`` picks), joins them (``CLUSTER MEET``), gives
each primary an equal share of the 16384 slots (``CLUSTER ADDSLOTSRANGE``),
makes the replicas replicate, and waits until every node says
``cluster_state:ok`` (with replicas: until ``CLUSTER SLOTS`` lists them,
as clients discover replicas from it). Every wait has a deadline. ``migrate_slot`` and
``failover`` do by hand what an operator's resharding and failover do.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import redis

from sharedpool.dev.redis_server import RedisServer, free_port

SLOTS = 16384
BUS_OFFSET = 10000  # Redis Cluster's node-to-node port is the client port + 10000


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster: {what} not within {timeout:.0f} s")
        time.sleep(0.02)


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too."""
    for _ in range(1000):
        port = free_port()
        if port + BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        return port
    raise OSError("no free port pair (port, port + 10000) found")


class LocalCluster:
    """``primaries`` primaries and ``replicas`` replicas each, on 127.0.0.1."""

    def __init__(self, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        self.primaries_wanted = primaries
        self.replicas_wanted = replicas
        extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no",
                 # A replica is listed in CLUSTER SLOTS once its first sync is done; Redis waits
                 # 5 s by default before a diskless sync, for more replicas to share it.
                 "--repl-diskless-sync-delay", "0")
        self.servers = [RedisServer(port=cluster_port(), extra_args=extra) for _ in range(primaries * (1 + replicas))]
        self.ids: dict[int, str] = {}  # port -> node id

    @property
    def seed_url(self) -> str:
        return self.servers[0].url

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    def client(self, port: int) -> Any:  # redis-py's execute_command is untyped
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)

    def start(self, timeout: float = 20.0) -> LocalCluster:
        try:
            for server in self.servers:
                server.start()
            self._form(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _form(self, timeout: float) -> None:
        for port in self.ports:
            with self.client(port) as c:
                self.ids[port] = c.execute_command("CLUSTER", "MYID")
        first = self.ports[0]
        for port in self.ports[1:]:
            with self.client(port) as c:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", first)
        primaries = self.ports[: self.primaries_wanted]
        share = SLOTS // len(primaries)
        for n, port in enumerate(primaries):
            start, end = n * share, (SLOTS - 1 if n == len(primaries) - 1 else (n + 1) * share - 1)
            with self.client(port) as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
        _wait("every node knows every other", lambda: all(self._known(p) == len(self.ports) for p in self.ports), timeout)
        for n, port in enumerate(self.ports[len(primaries):]):
            primary = primaries[n % len(primaries)]
            with self.client(port) as c:
                c.execute_command("CLUSTER", "REPLICATE", self.ids[primary])
        self.wait_ok(timeout)
        if self.replicas_wanted:
            _wait("every replica synced and listed", self._replicas_listed, timeout)

    def _replicas_listed(self) -> bool:
        """Every slot range of CLUSTER SLOTS names its replicas (a client discovers only those)."""
        with self.client(self.ports[0]) as c:
            ranges = c.execute_command("CLUSTER", "SLOTS")
        return len(ranges) >= self.primaries_wanted and all(len(r) >= 3 + self.replicas_wanted for r in ranges)

    def _known(self, port: int) -> int:
        with self.client(port) as c:
            return len([line for line in c.execute_command("CLUSTER", "NODES").splitlines() if "handshake" not in line])

    def wait_ok(self, timeout: float = 20.0, ports: list[int] | None = None) -> None:
        """Until every live node (or ``ports``) says cluster_state:ok and agrees on who serves every slot."""
        def ok() -> bool:
            for port in ports or self.live_ports():
                with self.client(port) as c:
                    if c.execute_command("CLUSTER", "INFO").find("cluster_state:ok") < 0:
                        return False
            return True

        _wait("cluster_state:ok", ok, timeout)

    def live_ports(self) -> list[int]:
        return [s.port for s in self.servers if s.process is not None and s.process.poll() is None]

    def primary_ports(self) -> list[int]:
        """Primaries by the first live node's CLUSTER SHARDS-free view (CLUSTER NODES)."""
        with self.client(self.live_ports()[0]) as c:
            lines = c.execute_command("CLUSTER", "NODES").splitlines()
        return sorted(int(line.split()[1].split("@")[0].rsplit(":", 1)[1]) for line in lines
                      if "master" in line.split()[2] and "fail" not in line.split()[2] and len(line.split()) > 8)

    def owner_of(self, slot: int) -> int:
        with self.client(self.live_ports()[0]) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        raise LookupError(f"slot {slot} is served by nobody")

    def migrate_slot(self, slot: int, target_port: int, between: Callable[[], None] | None = None) -> int:
        """Move ``slot`` with its keys to the primary at ``target_port``, the way redis-cli
        --cluster reshard does; ``between`` runs while the slot is MIGRATING/IMPORTING, after
        half of its keys moved (so clients meet ASK then). Returns the keys moved."""
        source_port = self.owner_of(slot)
        src: Any = self.client(source_port)
        dst: Any = self.client(target_port)
        try:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[source_port])
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[target_port])
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100_000)
            half = len(keys) // 2
            for n, key in enumerate(keys):
                if n == half and between is not None:
                    between()
                src.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", key)
            if between is not None and not keys:
                between()
            # The rest that arrived meanwhile.
            while True:
                rest = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
                if not rest:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *rest)
            # The target first, then the source (Redis's CLUSTER SETSLOT documentation):
            # a source that names the target while the target is still only IMPORTING
            # sends a client there that the target sends straight back (MOVED both ways,
            # until redis-py's redirect TTL runs out), unless the client came with ASKING.
            others = [p for p in self.live_ports() if p not in (target_port, source_port)]
            for port in [target_port, source_port, *others]:
                with self.client(port) as c:
                    if self._is_primary(c):
                        c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.ids[target_port])
            return len(keys)
        finally:
            src.close()
            dst.close()

    @staticmethod
    def _is_primary(c: Any) -> bool:
        return str(c.execute_command("ROLE")[0]) == "master"

    def replica_of(self, primary_port: int) -> int:
        for port in self.live_ports():
            with self.client(port) as c:
                role = c.execute_command("ROLE")
                if role[0] == "slave" and int(role[2]) == primary_port:
                    return port
        raise LookupError(f"no replica of {primary_port}")

    def kill(self, port: int) -> None:
        """SIGKILL a node, as a crash would."""
        next(s for s in self.servers if s.port == port).kill()

    def failover(self, replica_port: int, timeout: float = 20.0) -> None:
        """``CLUSTER FAILOVER FORCE`` on the replica, then wait until it is primary and the cluster ok."""
        with self.client(replica_port) as c:
            c.execute_command("CLUSTER", "FAILOVER", "FORCE")
        def promoted() -> bool:
            with self.client(replica_port) as c:
                return self._is_primary(c)

        _wait(f"replica {replica_port} promoted", promoted, timeout)
        self.wait_ok(timeout)

    def cleanup(self) -> None:
        for server in self.servers:
            server.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
