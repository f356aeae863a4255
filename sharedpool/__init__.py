"""sharedpool: one Redis connection pool shared by every worker process of a host.

In a worker::

    import sharedpool
    r = sharedpool.Redis()          # a redis.Redis over leases from the manager
    r.set("k", "v")
    with r.lease() as pinned:       # several commands on one connection
        pinned.get("k")
"""

from sharedpool.client import (
    LeasedConnection,
    Redis,
    SharedConnectionPool,
    SharedRedis,
    after_fork_in_child,
    close_control_channels,
    release_process_state,
)
from sharedpool.cluster import RedisCluster
from sharedpool.config import ClientConfig, ManagerConfig, default_socket_path
from sharedpool.errors import (
    ConfigError,
    DatabaseNotServed,
    Forbidden,
    LeaseError,
    LeaseLost,
    ManagerUnavailable,
    Misconfigured,
    PoolFull,
    PoolTimeout,
    ProtocolMismatch,
    RedisUnavailable,
    ReplicaAnswered,
    SharedPoolError,
    ShuttingDown,
    WorkerLimit,
)
from sharedpool.version import __version__

__all__ = [
    "ClientConfig",
    "ConfigError",
    "DatabaseNotServed",
    "Forbidden",
    "LeaseError",
    "LeaseLost",
    "ReplicaAnswered",
    "LeasedConnection",
    "ManagerConfig",
    "ManagerUnavailable",
    "Misconfigured",
    "PoolFull",
    "PoolTimeout",
    "ProtocolMismatch",
    "Redis",
    "RedisCluster",
    "RedisUnavailable",
    "SharedConnectionPool",
    "SharedPoolError",
    "SharedRedis",
    "ShuttingDown",
    "WorkerLimit",
    "__version__",
    "after_fork_in_child",
    "close_control_channels",
    "release_process_state",
    "default_socket_path",
]
