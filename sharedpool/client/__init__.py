"""What a worker imports: the pool, the client, the leased connection, and the hooks for servers.

The sync shell over the lease core (``sharedpool.lease``), sharing the
asyncio shell's other half (``sharedpool.shell``). Module map:
``sync_pool`` (``SharedConnectionPool``: redis-py's ``ConnectionPool``
interface, sync waits), ``process_state`` (a pool's per-process state:
attaching, each thread's taker, a fork), ``binding`` (a lease bound to
this process's connection object for its slot), ``channel`` (the blocking
control connection), ``connection`` (a redis-py connection over a lent
fd), ``shared_redis`` (``SharedRedis``, ``Redis()``, ``lease()``),
``process`` (hooks for servers, and for ``os.fork``).
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
