"""Serving a Redis Cluster (``--cluster``): which nodes there are, and a number for each.

A Redis Cluster has only database 0, so a lease table row's database field
is free to name a *node* instead: the manager gives every node it learns of
a small number (its index, never reused for another address while the
manager runs), and the per-database machinery (``databases.py``, the
row's db, FETCH_FD, DEMAND, the per-database cap) becomes per-node: a
slot of node 3 connects to that node's host:port and never SELECTs.

The node list comes from ``CLUSTER SHARDS`` (Redis 7+, Valkey), else
``CLUSTER SLOTS``, asked of any node already known (the seed first): at
start (a non-cluster Redis is refused there), every
``cluster_refresh_interval``, after a node's connection failed, and when a
worker reports that its view changed (a MOVED it followed). Every known
node is served; ``min_idle`` applies to primaries only, so replicas cost
nothing until a ``read_from_replicas`` client asks for one. A node that
leaves the list (or is marked failed) stops being served: its idle
connections close at the next sweep, leased ones when they come back,
and its number is not given to anybody else.

Discovery is blocking redis-py I/O: the loop runs it in its thread pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import redis
from redis.connection import Connection

from sharedpool.manager.actions import Wake
from sharedpool.manager.backend import RedisTarget, describe_error

if TYPE_CHECKING:
    from sharedpool.manager.context import ManagerContext

log = logging.getLogger("sharedpool.manager")

PRIMARY = "primary"
REPLICA = "replica"
# Refreshes a worker asks for are taken at most this often: a MOVED storm is one refresh.
_MIN_REFRESH_GAP_S = 0.2
# A node whose last connect failed this recently, with nothing open to it, refuses DEMANDs at
# once: its waiters fail over to redis-py's own refresh instead of waiting out acquire_timeout.
# After it, one DEMAND goes through again, which is the next attempt.
_DOWN_REFUSES_S = 1.0
# CLUSTER SHARDS health of a node worth connecting to ("loading": a replica still syncing).
_HEALTHY = ("online", "loading")


class NotACluster(Exception):
    """The seed node answers, but is no Redis Cluster node (``cluster_enabled:0``)."""


@dataclass(frozen=True, slots=True)
class FoundNode:
    """One node as a discovery saw it."""

    addr: str  # host:port as the cluster announces it
    role: str  # PRIMARY or REPLICA
    slots: tuple[tuple[int, int], ...] = ()  # ranges, for a primary
    primary: str = ""  # a replica's primary's addr


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(value: Any) -> dict[str, Any]:
    """A CLUSTER SHARDS map, which RESP2 sends as a flat list and RESP3 as a map."""
    if isinstance(value, dict):
        return {_text(k): v for k, v in value.items()}
    items = list(value)
    return {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def parse_shards(reply: Any) -> list[FoundNode]:
    """Nodes from a ``CLUSTER SHARDS`` reply; failed nodes left out."""
    found: list[FoundNode] = []
    for shard in reply:
        fields = _pairs(shard)
        flat = [int(v) for v in fields.get("slots", [])]
        ranges = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2))
        nodes = [_pairs(node) for node in fields.get("nodes", [])]
        primary = ""
        for node in nodes:
            if _text(node.get("role", "")) == "master" and _text(node.get("health", "online")) in _HEALTHY:
                primary = _address(node)
        for node in nodes:
            if _text(node.get("health", "online")) not in _HEALTHY:
                continue
            addr = _address(node)
            if addr == primary:
                found.append(FoundNode(addr, PRIMARY, ranges))
            elif _text(node.get("role", "")) == "replica":
                found.append(FoundNode(addr, REPLICA, (), primary))
    return found


def _address(node: dict[str, Any]) -> str:
    host = _text(node.get("endpoint") or node.get("ip") or "")
    if host in ("", "?"):
        host = _text(node.get("ip", ""))
    return f"{host}:{int(node.get('port') or node.get('tls-port') or 0)}"


def parse_slots(reply: Any) -> list[FoundNode]:
    """Nodes from a ``CLUSTER SLOTS`` reply (Redis before 7)."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    replicas: dict[str, str] = {}
    for entry in reply:
        start, end, primary, *others = entry
        addr = f"{_text(primary[0])}:{int(primary[1])}"
        ranges.setdefault(addr, []).append((int(start), int(end)))
        for other in others:
            replicas[f"{_text(other[0])}:{int(other[1])}"] = addr
    found = [FoundNode(addr, PRIMARY, tuple(sorted(r))) for addr, r in ranges.items()]
    found += [FoundNode(addr, REPLICA, (), primary) for addr, primary in replicas.items() if addr not in ranges]
    return found


def discover(target: RedisTarget, addrs: Sequence[str]) -> list[FoundNode]:
    """Ask the first node of ``addrs`` that answers for the cluster's nodes (blocking; each
    attempt bounded by the manager's ``redis_timeout``, and all of them by twice that, so a
    NODES request that waits for it is answered within a client's reply timeout)."""
    errors: list[str] = []
    deadline = time.monotonic() + 2 * float(target.kwargs["socket_timeout"])
    for addr in addrs:
        if time.monotonic() > deadline:
            errors.append("no time left for the other nodes")
            break
        conn: Any = Connection(**node_kwargs(target, addr))  # type: ignore[no-untyped-call]
        try:
            conn.connect()
            try:
                conn.send_command("CLUSTER", "SHARDS")
                nodes = parse_shards(conn.read_response())
            except redis.ResponseError as exc:
                if "cluster support disabled" in str(exc).lower() or "cluster mode" in str(exc).lower():
                    raise NotACluster(f"Redis at {addr} is not a cluster node (cluster_enabled is no): {exc}") from None
                conn.send_command("CLUSTER", "SLOTS")
                nodes = parse_slots(conn.read_response())
            if any(node.role == PRIMARY for node in nodes):
                return nodes
            errors.append(f"{addr}: no primary serves any slot yet")
        except redis.RedisError as exc:
            errors.append(f"{addr}: {describe_error(exc)}")
        finally:
            conn.disconnect()
    raise redis.ConnectionError("no cluster node answered: " + "; ".join(errors))


def node_kwargs(target: RedisTarget, addr: str) -> dict[str, Any]:
    host, _, port = addr.rpartition(":")
    kwargs = dict(target.kwargs, host=host, port=int(port), db=0)
    kwargs.pop("client_name", None)
    return kwargs


class NodeMap:
    """Node numbers by address, and what the last discovery said of each."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self.nodes: dict[int, FoundNode] = {}  # served now
        self.version = 0  # bumped by every change a client may need to hear of

    def index_of(self, addr: str) -> int:
        if addr not in self._index:
            self._index[addr] = len(self._index)
        return self._index[addr]

    def apply(self, found: Sequence[FoundNode]) -> bool:
        """Take a discovery's result; True when anything changed. Numbers are given in
        address order, so a restarted manager numbers an unchanged cluster the same way."""
        for node in sorted(found, key=lambda n: n.addr):
            self.index_of(node.addr)
        nodes = {self._index[node.addr]: node for node in found}
        if nodes == self.nodes:
            return False
        self.nodes = nodes
        self.version += 1
        return True

    def addr_of(self, index: int) -> str | None:
        node = self.nodes.get(index)
        return node.addr if node is not None else None

    def primaries(self) -> tuple[int, ...]:
        return tuple(sorted(i for i, node in self.nodes.items() if node.role == PRIMARY))

    def serving(self) -> tuple[int, ...]:
        """Primaries that serve slots: those ``min_idle`` keeps connections to."""
        return tuple(sorted(i for i, node in self.nodes.items() if node.role == PRIMARY and node.slots))

    def describe(self) -> list[dict[str, Any]]:
        """The node list as WELCOME, NODES_REPLY and stats carry it."""
        return [
            {"index": i, "addr": n.addr, "role": n.role, "slots": [list(r) for r in n.slots], "primary": n.primary}
            for i, n in sorted(self.nodes.items())
        ]


class ClusterKeeper:
    """The manager's cluster half: discovery, refreshes, and the pool limits they set."""

    def __init__(self, manager: ManagerContext) -> None:
        self.manager = manager
        self.map = NodeMap()
        self.seed = manager.target.label
        self.refreshes = 0
        self._running = False
        self._next_refresh = 0.0
        self._last_refresh = 0.0
        self._again = False  # asked for while one ran
        self._waiting: list[Callable[[], None]] = []  # replies to send once the running refresh ends
        self._down: dict[int, tuple[float, str]] = {}  # node -> (when its last connect failed, why)

    def start(self) -> None:
        """The first discovery, before serving: a seed that is no cluster node stops the start;
        one that does not answer is asked again at every refresh (as a manager of one Redis
        starts while that Redis is down)."""
        try:
            found = discover(self.manager.target, [self.seed])
        except redis.ConnectionError as exc:
            log.warning("cluster seed %s unreachable, retrying every %g s: %s", self.seed,
                        self.manager.config.cluster_refresh_interval, exc)
            self.apply_limits()
            return
        self._take(found)
        log.info("cluster of %d nodes (%d primaries) found from %s", len(self.map.nodes), len(self.map.primaries()), self.seed)

    def target_of(self, index: int) -> RedisTarget | None:
        addr = self.map.addr_of(index)
        if addr is None:
            return None
        node = self.map.nodes[index]
        return replace(self.manager.target, kwargs=node_kwargs(self.manager.target, addr) | {
            "client_name": None}, label=addr, node_readonly=node.role == REPLICA, selects=False)

    def apply_limits(self) -> None:
        """Put the node list in the pool's limits (at start, after a refresh, after a reload)."""
        limits = self.manager.pool.limits
        served = tuple(sorted(self.map.nodes)) or (0,)
        limits.databases = served
        limits.warm_databases = self.map.serving()
        limits.default_db = limits.warm_databases[0] if limits.warm_databases else served[0]
        limits.max_per_database = self.manager.config.max_connections_per_node

    def _take(self, found: Sequence[FoundNode]) -> None:
        before = dict(self.map.nodes)
        if not self.map.apply(found):
            return
        for index, node in self.map.nodes.items():
            old = before.get(index)
            if old is None or old.role != node.role:
                log.info("cluster node %d at %s is a %s", index, node.addr, node.role)
                if old is not None:
                    self._retire_node(index)  # a replica's connections are READONLY, a primary's not
        for index, node in before.items():
            if index not in self.map.nodes:
                log.warning("cluster node %d at %s left the cluster (or failed): its connections are retired",
                            index, node.addr)
                self.manager.perform([Wake(-1, index)])  # its waiters' next DEMAND is refused: they fail over
        self.apply_limits()

    def _retire_node(self, index: int) -> None:
        pool = self.manager.pool
        self.manager.perform(pool.retire_db(index))

    def tick(self, now: float) -> None:
        if now >= self._next_refresh:
            self.refresh(now)

    def refresh(self, now: float, then: Callable[[], None] | None = None) -> None:
        """Discover again now (or right after the running refresh); ``then`` runs once it ended."""
        if then is not None:
            self._waiting.append(then)
        if self._running:
            self._again = True
            return
        if then is None and now - self._last_refresh < _MIN_REFRESH_GAP_S:
            self._next_refresh = min(self._next_refresh, self._last_refresh + _MIN_REFRESH_GAP_S)
            return
        self._running = True
        self._last_refresh = now
        self._next_refresh = now + self.manager.config.cluster_refresh_interval
        known = [self.seed, *(n.addr for n in self.map.nodes.values() if n.role == PRIMARY)]
        addrs = list(dict.fromkeys(known + [n.addr for n in self.map.nodes.values()]))
        target = self.manager.target
        self.manager.submit(lambda: discover(target, addrs), self._refreshed)

    def _refreshed(self, now: float, future: Any) -> list[Any]:
        self._running = False
        self.refreshes += 1
        try:
            self._take(future.result())
        except Exception as exc:  # the cluster may be down for a moment: keep what we know
            log.warning("cluster refresh failed, keeping the last node list: %s", describe_error(exc))
        waiting, self._waiting = self._waiting, []
        for reply in waiting:
            reply()
        if self._again:
            self._again = False
            self.refresh(now)
        self.manager.redispatch(now)
        return []

    def connect_failed(self, now: float, index: int, error: str) -> None:
        """A node refused a connection: maybe it failed over; look soon, not at the next interval."""
        self._down[index] = (now, error)
        self._next_refresh = min(self._next_refresh, now + _MIN_REFRESH_GAP_S)

    def connected(self, index: int) -> None:
        self._down.pop(index, None)

    def refusal(self, index: int, now: float) -> str:
        """Why a DEMAND for node ``index`` is refused now ('' when it is not): the node left,
        or it is unreachable and nothing is open to it."""
        if not self.manager.pool.serves(index):
            return f"cluster node {index} is no longer served (it left the cluster or failed)"
        down = self._down.get(index)
        if down is not None and now - down[0] < _DOWN_REFUSES_S and not self.manager.pool.in_db(index):
            return f"cluster node {index} at {self.map.addr_of(index)} is unreachable: {down[1]}"
        return ""

    def stats(self) -> dict[str, Any]:
        return {"seed": self.seed, "version": self.map.version, "refreshes": self.refreshes, "nodes": self.map.describe()}
