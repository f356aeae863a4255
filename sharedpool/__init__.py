"""sharedpool: one Redis connection pool shared by every worker process of a host.

In a worker::

    import sharedpool
    r = sharedpool.Redis()          # a redis.Redis over leases from the manager
    r.set("k", "v")
    with r.lease() as pinned:       # several commands on one connection
        pinned.get("k")
"""

__version__ = "0.1.0"

from sharedpool.client import (  # noqa: E402
    LeasedConnection,
    Redis,
    SharedConnectionPool,
    SharedRedis,
    after_fork_in_child,
    close_control_channels,
    release_process_state,
)
from sharedpool.config import ClientConfig, ManagerConfig, default_socket_path  # noqa: E402
from sharedpool.errors import (  # noqa: E402
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
    SharedPoolError,
    ShuttingDown,
    WorkerLimit,
)

__all__ = [
    "ClientConfig",
    "ConfigError",
    "DatabaseNotServed",
    "Forbidden",
    "LeaseError",
    "LeaseLost",
    "LeasedConnection",
    "ManagerConfig",
    "ManagerUnavailable",
    "Misconfigured",
    "PoolFull",
    "PoolTimeout",
    "ProtocolMismatch",
    "Redis",
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
