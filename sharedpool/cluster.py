"""``sharedpool.RedisCluster``: redis-py's ``RedisCluster`` whose node connections are leases.

redis-py keeps its routing, MOVED / ASK handling, pipelines and topology
refreshes; what changes is where a node's connections come from. Every
node's pool is a ``SharedConnectionPool`` for that node's number in the
manager's node list (``manager/cluster.py``: a row's db names a node), so
W workers x N nodes become at most the manager's ``max_connections``.

The hook is redis-py's ``connection_pool_class``: ``NodesManager`` calls it
with the node's host and port for every node it learns of. ``NodeDirectory``
maps host:port to the manager's number, asking the manager (a NODES
request) for a node it does not know yet, and tells the manager when
redis-py's slot map changed (a MOVED it followed, a refresh it ran), so the
manager's node list follows without waiting for its periodic refresh.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
from redis.cluster import ClusterNode
from redis.event import AfterSlotsCacheRefreshEvent, EventDispatcher, EventListenerInterface

from sharedpool import admin, errors, protocol
from sharedpool.client.channel import ControlChannel
from sharedpool.client.sync_pool import SharedConnectionPool
from sharedpool.protocol import FrameType

__all__ = ["NodeDirectory", "NodePool", "RedisCluster", "manager_primaries"]

# Options redis-py's cluster passes each node's pool that are its own business or the manager's:
# a lease is set up by the manager (READONLY on a replica included), retries are the cluster's.
_CLUSTER_OWNED = frozenset({
    "host", "port", "redis_connect_func", "cache", "metadata_resolver", "maint_notifications_config",
    "connection_pool", "connection_class", "retry", "read_from_replicas", "load_balancing_strategy",
})
# How often one process tells the manager its cluster view changed.
_NOTE_EVERY_S = 0.2
# A thread that already holds a lease of one node and asks for another's (a pipeline over
# several nodes) waits this long at most: see NodePool.
NESTED_WAIT_S = 0.05


class NodeDirectory:
    """The manager's cluster nodes as this process knows them: host:port -> node number.

    One per ``RedisCluster``; fork-safe (a child opens its own channel)."""

    def __init__(self, socket_path: str | None = None, timeout: float = 5.0) -> None:
        self.socket_path = admin.resolve_socket_path(socket_path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._channel: ControlChannel | None = None
        self._pid = os.getpid()
        self._noted_at = 0.0
        self.nodes: list[dict[str, Any]] = []
        self.version = -1

    def _request(self, refresh: bool, wait: bool) -> dict[str, Any]:
        body = protocol.encode_json(FrameType.NODES, {"refresh": refresh, "wait": wait})
        with self._lock:
            if self._pid != os.getpid():
                self._channel, self._pid = None, os.getpid()  # the parent's: never used, never closed here
            for attempt in (1, 2):
                if self._channel is None or self._channel.closed:
                    self._channel = ControlChannel(self.socket_path, connect_timeout=self.timeout, reply_timeout=self.timeout)
                try:
                    reply = self._channel.request(body, FrameType.NODES_REPLY, timeout=self.timeout)
                    break
                except errors.ManagerUnavailable:
                    self._channel.close()
                    self._channel = None
                    if attempt == 2:
                        raise
        if int(reply.get("version", -1)) >= self.version:
            self.nodes, self.version = list(reply.get("nodes") or []), int(reply.get("version", -1))
        return reply

    def refresh(self, wait: bool = True) -> list[dict[str, Any]]:
        """The manager's node list; ``wait``: after the manager looked at the cluster again."""
        self._request(refresh=True, wait=wait)
        return self.nodes

    def load(self) -> list[dict[str, Any]]:
        self._request(refresh=False, wait=False)
        return self.nodes

    def known_index(self, addr: str) -> int | None:
        """The manager's number for ``addr`` if this process knows it already (no request)."""
        for node in self.nodes:
            if node["addr"] == addr:
                return int(node["index"])
        return None

    def index_of(self, addr: str) -> int:
        """The manager's number for the node at ``addr``; asks the manager once when unknown."""
        for known in (self.nodes, None):
            if known is None:
                self.refresh(wait=True)
            for node in self.nodes:
                if node["addr"] == addr:
                    return int(node["index"])
        served = ", ".join(str(n["addr"]) for n in self.nodes) or "none"
        raise redis.ConnectionError(
            f"cluster node {addr} is not served by the sharedpool manager at {self.socket_path} (it serves {served})"
        )

    def note_change(self) -> None:
        """redis-py's slot map changed (a MOVED, a refresh): the manager looks again, soon."""
        now = time.monotonic()
        if now - self._noted_at < _NOTE_EVERY_S:
            return
        self._noted_at = now
        try:
            self._request(refresh=True, wait=False)
        except errors.SharedPoolError:
            pass  # the manager refreshes on its own anyway

    def primaries(self) -> list[tuple[str, int]]:
        found = []
        for node in self.nodes:
            if node.get("role") == "primary":
                host, _, port = str(node["addr"]).rpartition(":")
                found.append((host, int(port)))
        return found

    def close(self) -> None:
        with self._lock:
            if self._channel is not None and self._pid == os.getpid():
                self._channel.close()
            self._channel = None


class NodePool(SharedConnectionPool):
    """One node's pool, which never waits long while its thread holds another node's lease.

    redis-py's cluster pipeline takes a connection of each node it needs in
    turn, holding the ones it has: with a bounded number of connections per
    node, two pipelines can each hold what the other waits for (hold and
    wait). Such a second lease is asked of a twin pool with a short
    ``acquire_timeout`` (``NESTED_WAIT_S``); its ``PoolTimeout`` is a
    ``TimeoutError``, on which the pipeline gives back what it holds and
    retries after redis-py's backoff, so nobody waits for ``acquire_timeout``.
    """

    def __init__(self, held: threading.local, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._twin_kwargs = dict(kwargs, acquire_timeout=NESTED_WAIT_S)
        self._held = held  # shared by the node pools of one RedisCluster: leases this thread holds
        self._twin: SharedConnectionPool | None = None

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        count = getattr(self._held, "count", 0)
        if count:
            if self._twin is None:
                self._twin = SharedConnectionPool(**self._twin_kwargs)
            conn = self._twin.get_connection(command_name, *keys, **options)
        else:
            conn = super().get_connection(command_name, *keys, **options)
        self._held.count = count + 1
        return conn

    def release(self, connection: Any) -> None:
        self._held.count = max(0, getattr(self._held, "count", 0) - 1)
        twin = self._twin
        if twin is not None and twin.owns_connection(connection):
            twin.release(connection)
        else:
            super().release(connection)

    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if self._twin is not None:
            self._twin.disconnect(inuse_connections)


def manager_primaries(
    socket_path: str | None, manager_timeout: float | None, kwargs: dict[str, Any]
) -> tuple[NodeDirectory, list[tuple[str, int]]]:
    """Both cluster clients' start: refuse being told where the cluster is, and ask the manager
    for its primaries (the startup nodes), bounded by ``manager_timeout``."""
    for name in ("host", "port", "startup_nodes", "url", "password", "username"):
        if kwargs.get(name) is not None:
            raise errors.ConfigError(name, "***" if name == "password" else kwargs[name],
                                     "not settable: the sharedpool manager (--cluster) knows the cluster")
    directory = NodeDirectory(socket_path, timeout=manager_timeout or 5.0)
    directory.load()
    primaries = directory.primaries()
    if not primaries:
        directory.close()
        raise errors.RedisUnavailable(
            f"the sharedpool manager at {directory.socket_path} knows no cluster primary yet (its seed is unreachable)")
    return directory, primaries


def node_pool_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What of redis-py's per-node pool options a shared pool takes (the rest is the cluster's or the manager's)."""
    return {name: value for name, value in kwargs.items() if name not in _CLUSTER_OWNED}


class RedisCluster(redis.cluster.RedisCluster):
    """redis-py's ``RedisCluster`` over a sharedpool manager started with ``--cluster``.

    ``socket_path``, ``acquire_timeout`` and ``manager_timeout`` are
    ``SharedConnectionPool``'s; the startup nodes are the manager's primaries
    (``host``, ``port``, ``startup_nodes`` and ``url`` are refused: the
    manager knows where the cluster is). Other keyword arguments are
    redis-py's (``decode_responses``, ``read_from_replicas``, ...).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        acquire_timeout: float | None = None,
        manager_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        directory, primaries = manager_primaries(socket_path, manager_timeout, kwargs)
        startup = [ClusterNode(host, port) for host, port in primaries]  # type: ignore[no-untyped-call]
        self.node_directory = directory
        socket_path = directory.socket_path

        held = threading.local()

        def node_pool(**options: Any) -> SharedConnectionPool:
            addr = f"{options['host']}:{options['port']}"
            return NodePool(
                held, socket_path=socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout,
                db=directory.index_of(addr), redis_location=addr, **node_pool_options(options),
            )

        dispatcher = kwargs.pop("event_dispatcher", None) or EventDispatcher()
        dispatcher.register_listeners({AfterSlotsCacheRefreshEvent: [_Noter(directory)]})
        super().__init__(startup_nodes=startup, connection_pool_class=node_pool, event_dispatcher=dispatcher, **kwargs)

    def close(self) -> None:
        super().close()
        self.node_directory.close()


class _Noter(EventListenerInterface):
    """The slot-map listener: redis-py calls ``listen(event)``."""

    def __init__(self, directory: NodeDirectory) -> None:
        self.directory = directory

    def listen(self, event: object) -> None:
        self.directory.note_change()
