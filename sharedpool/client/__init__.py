"""What a worker process imports: the shared pool and its redis-py client."""

from sharedpool.client.connection import LeasedConnection
from sharedpool.client.pool import Redis, SharedConnectionPool, SharedRedis

__all__ = ["LeasedConnection", "Redis", "SharedConnectionPool", "SharedRedis"]
