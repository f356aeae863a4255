"""``sharedpool.asyncio.RedisCluster``: ``redis.asyncio``'s ``RedisCluster`` whose node connections are leases.

redis.asyncio's cluster has no per-node pool to swap: each ``ClusterNode``
keeps its own list of connections, and ``NodesManager`` builds nodes in
half a dozen places (startup, discovery, a MOVED target, temporary
discovery nodes, a transaction's parser node). Two facts make a hook:

- every one of those places calls the ``ClusterNode`` name of the
  ``redis.asyncio.cluster`` module when it runs, and passes the cluster's
  ``connection_class`` through to the node;
- a node's ``execute_command`` and ``execute_pipeline`` take their
  connection with ``acquire_connection()`` as their first statement, before
  any await, and end it with ``release(connection)``.

So the first ``sharedpool.asyncio.RedisCluster`` made in a process puts
``SharedClusterNode``, a subclass with the same slots, in that module's
``ClusterNode``. A node whose ``connection_class`` is a ``NodeLeases`` (only
ours) takes a lease of its node's asyncio ``SharedConnectionPool`` before
the command and hands it to ``acquire_connection``; its ``release`` gives it
back. Any other node (a plain ``redis.asyncio.RedisCluster`` in the same
process) is ``ClusterNode`` unchanged, every method its parent's.

Paths that hold a node's connection across commands outside those two
methods, a transaction pipeline (WATCH / MULTI on one slot) and
``ClusterPubSub``, are refused with ``LeaseError``: the sync
``sharedpool.RedisCluster`` serves both.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import redis.asyncio.cluster as aiocluster
from redis.event import AsyncAfterSlotsCacheRefreshEvent, AsyncEventListenerInterface, EventDispatcher

from sharedpool import errors
from sharedpool.asyncio.async_pool import SharedConnectionPool
from sharedpool.asyncio.connection import AsyncLeasedConnection
from sharedpool.cluster import NodeDirectory, manager_primaries

__all__ = ["NodeLeases", "RedisCluster", "SharedClusterNode"]

_ORIGINAL_NODE = aiocluster.ClusterNode
# What of a node's connection options a lease's connection takes: the rest (address, auth,
# handshake labels, keepalive, maintenance handlers) is the manager's or the cluster's own.
_NODE_POOL_OPTIONS = ("decode_responses", "encoding", "encoding_errors", "socket_timeout",
                      "socket_read_size", "health_check_interval")
# The lease taken for the command this task is about to run on a node: set just before the
# parent's execute_command / execute_pipeline, taken by its first statement.
_HANDED: contextvars.ContextVar[list[AsyncLeasedConnection] | None] = contextvars.ContextVar(
    "sharedpool_cluster_handed", default=None)
# The node an ASKING was asked of, for this task's next command there (SharedClusterNode.execute_command).
_ASKING: contextvars.ContextVar[str | None] = contextvars.ContextVar("sharedpool_cluster_asking", default=None)
_install_lock = threading.Lock()


class NodeLeases:
    """The node pools of one ``RedisCluster``, put where redis-py keeps a node's ``connection_class``.

    Calling it (making a connection of its own) is what an unmanaged path
    would do: refused, so no connection bypasses the manager's cap."""

    def __init__(self, directory: NodeDirectory, acquire_timeout: float | None, manager_timeout: float | None,
                 options: dict[str, Any]) -> None:
        self.directory = directory
        self.acquire_timeout = acquire_timeout
        self.manager_timeout = manager_timeout
        self.options = options
        self.pools: dict[str, SharedConnectionPool] = {}

    def __call__(self, **kwargs: Any) -> Any:
        raise errors.LeaseError(
            "sharedpool.asyncio.RedisCluster leases a node's connection per command; a transaction "
            "pipeline or pub/sub, which hold one across commands, is not served: use the sync "
            "sharedpool.RedisCluster, or sharedpool.asyncio.Redis for one node")

    async def pool_for(self, node: aiocluster.ClusterNode) -> SharedConnectionPool:
        pool = self.pools.get(node.name)
        if pool is not None:
            return pool
        index = self.directory.known_index(node.name)
        if index is None:
            # A node the manager has not told us of yet: its NODES request blocks, so not on the loop.
            index = await asyncio.to_thread(self.directory.index_of, node.name)
        return self.pools.setdefault(node.name, SharedConnectionPool(
            socket_path=self.directory.socket_path, acquire_timeout=self.acquire_timeout,
            manager_timeout=self.manager_timeout, autopipeline=False, db=index, redis_location=node.name,
            **self.options))

    async def disconnect(self, name: str) -> None:
        pool = self.pools.get(name)
        if pool is not None:
            await pool.disconnect()


class SharedClusterNode(_ORIGINAL_NODE):
    """``ClusterNode``, whose commands run on a lease when its ``connection_class`` is a ``NodeLeases``."""

    __slots__ = ()

    def __eq__(self, obj: Any) -> bool:
        # The parent's test names the module's ClusterNode, which is now this class:
        # a node made before the swap must still equal its twin.
        return isinstance(obj, _ORIGINAL_NODE) and obj.name == self.name

    __hash__ = _ORIGINAL_NODE.__hash__

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        leases = self.connection_class
        if not isinstance(leases, NodeLeases):
            return await super().execute_command(*args, **kwargs)
        if len(args) == 1 and str(args[0]).upper() == "ASKING":
            # redis-py follows an ASK with ASKING and then the command, each a command of
            # its own: on a node's connection list both mostly land on one connection, on
            # leases mostly not, and ASKING counts only for the next command on its
            # connection (else the importing node answers MOVED, and the two bounce until
            # the cluster's TTL). So it is kept for this task's next command on this node,
            # and sent on that command's lease.
            _ASKING.set(self.name)
            return True
        await self._hand(leases)
        return await super().execute_command(*args, **kwargs)

    async def execute_pipeline(self, commands: list[Any]) -> bool:
        leases = self.connection_class
        if not isinstance(leases, NodeLeases):
            return await super().execute_pipeline(commands)
        await self._hand(leases)
        return await super().execute_pipeline(commands)

    async def _hand(self, leases: NodeLeases) -> None:
        asking = _ASKING.get() == self.name
        if asking:
            _ASKING.set(None)
        pool = await leases.pool_for(self)
        conn = await pool.get_connection()
        if asking:
            try:
                await conn.send_command("ASKING")
                await conn.read_response()
            except BaseException:
                pool.release_now(conn)
                raise
        # No await from here to the parent's acquire_connection: a cancellation cannot
        # land between the lease and the try whose finally gives it back.
        _HANDED.set([conn])

    def acquire_connection(self) -> Any:
        leases = self.connection_class
        if not isinstance(leases, NodeLeases):
            return super().acquire_connection()
        handed = _HANDED.get()
        if not handed:
            return leases()  # refused: see NodeLeases.__call__
        return handed.pop()

    def release(self, connection: Any) -> None:
        if isinstance(self.connection_class, NodeLeases) and isinstance(connection, AsyncLeasedConnection):
            connection.shared_pool.release_now(connection)
            return
        super().release(connection)

    async def disconnect(self) -> None:
        leases = self.connection_class
        if isinstance(leases, NodeLeases):
            await leases.disconnect(self.name)
            return
        await super().disconnect()


def _install() -> None:
    """Put ``SharedClusterNode`` in redis.asyncio.cluster's ``ClusterNode`` (once per process)."""
    with _install_lock:
        if aiocluster.ClusterNode is _ORIGINAL_NODE:
            aiocluster.ClusterNode = SharedClusterNode  # type: ignore[misc]
        elif not issubclass(aiocluster.ClusterNode, SharedClusterNode):
            raise errors.Misconfigured(
                f"redis.asyncio.cluster.ClusterNode is already replaced (by {aiocluster.ClusterNode!r}): "
                "sharedpool.asyncio.RedisCluster cannot lease its nodes' connections")


class RedisCluster(aiocluster.RedisCluster):
    """``redis.asyncio.RedisCluster`` over a sharedpool manager started with ``--cluster``.

    As ``sharedpool.RedisCluster``: the startup nodes are the manager's
    primaries (asked for here, bounded by ``manager_timeout``), and
    ``host``, ``port``, ``startup_nodes``, ``url``, ``password`` and
    ``username`` are refused. Other keyword arguments are redis.asyncio's.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        acquire_timeout: float | None = None,
        manager_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        _install()  # first: refused, nothing is opened
        directory, primaries = manager_primaries(socket_path, manager_timeout, kwargs)
        startup = [_ORIGINAL_NODE(host, port) for host, port in primaries]
        self.node_directory = directory
        dispatcher = kwargs.pop("event_dispatcher", None) or EventDispatcher()
        dispatcher.register_listeners({AsyncAfterSlotsCacheRefreshEvent: [_Noter(directory)]})
        super().__init__(startup_nodes=startup, event_dispatcher=dispatcher, **kwargs)
        options = {name: self.connection_kwargs[name] for name in _NODE_POOL_OPTIONS if name in self.connection_kwargs}
        self.node_leases = NodeLeases(directory, acquire_timeout, manager_timeout, options)
        # Nodes made from here on get it from the cluster's options; the startup nodes made above, now.
        self.connection_kwargs["connection_class"] = self.node_leases
        self.nodes_manager.connection_kwargs["connection_class"] = self.node_leases
        for node in (*self.nodes_manager.startup_nodes.values(), *self.nodes_manager.nodes_cache.values()):
            node.connection_class = self.node_leases  # type: ignore[assignment]  # called like a class

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            for pool in list(self.node_leases.pools.values()):
                await pool.disconnect()
            self.node_directory.close()


class _Noter(AsyncEventListenerInterface):
    """Tells the manager that redis-py's slot map changed (a MOVED to another node), off the loop."""

    def __init__(self, directory: NodeDirectory) -> None:
        self.directory = directory
        self._tasks: set[asyncio.Future[None]] = set()

    async def listen(self, event: object) -> None:
        task = asyncio.ensure_future(asyncio.to_thread(self.directory.note_change))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
