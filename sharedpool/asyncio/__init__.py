"""The shared pool for ``redis.asyncio``: ASGI workers (uvicorn under gunicorn, FastAPI) on the manager's leases.

The asyncio shell over the lease core (``sharedpool.lease``), sharing the
sync shell's other half (``sharedpool.shell``). Module map:
``async_pool`` (``SharedConnectionPool``: the lease core driven by the
event loop), ``waiting`` (the table's queue awaited on the wake socket,
and a process's seats in it), ``handoff`` (a lease handed to the next task
of this process), ``parking`` (a clean lease kept until the loop's
next turn for that turn's next command), ``channel`` (the control connection on the loop),
``connection`` (a ``redis.asyncio`` connection over a lent fd),
``autopipeline`` (simple commands of concurrent tasks batched on one
lease), ``client`` (``SharedRedis``, ``Redis()``, ``lease()``),
``cluster`` (``RedisCluster``: redis.asyncio's cluster client on node leases),
``process`` (fork and server hooks reach these pools through
``sharedpool.client.process``).
"""

from sharedpool.asyncio.async_pool import SharedConnectionPool
from sharedpool.asyncio.client import Redis, SharedRedis
from sharedpool.asyncio.cluster import RedisCluster
from sharedpool.asyncio.connection import AsyncLeasedConnection

__all__ = ["AsyncLeasedConnection", "Redis", "RedisCluster", "SharedConnectionPool", "SharedRedis"]
