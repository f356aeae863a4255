"""What a worker imports: the pool, the client, the leased connection, and the hooks for servers.

Module map: ``pool`` (redis-py's ``ConnectionPool`` interface, sync waits),
``lease_core`` (taking and giving back leases in the table, sans I/O),
``lease_state`` (a connection's lease state, release, a lost lease's end:
for both clients), ``pinning`` (``lease()``'s pinned client, for both),
``attachment`` (this process's view of one manager epoch), ``channel`` (the
control connection), ``connection`` (a redis-py connection over a lent fd),
``shared_redis`` (``SharedRedis``, ``Redis()``, ``lease()``), ``callsite``
(where a lease was asked for), ``process`` (hooks for servers).
"""

from sharedpool.client.connection import LeasedConnection
from sharedpool.client.process import after_fork_in_child, all_pools, close_control_channels, release_process_state
from sharedpool.client.shared_redis import Redis, SharedRedis
from sharedpool.client.sync_pool import SharedConnectionPool

__all__ = [
    "LeasedConnection",
    "Redis",
    "SharedConnectionPool",
    "SharedRedis",
    "after_fork_in_child",
    "all_pools",
    "close_control_channels",
    "release_process_state",
]
