"""Moved to ``sharedpool.dev.redis_server``; this name stays for imports written before the move."""

from sharedpool.dev.redis_server import RedisServer

__all__ = ["RedisServer"]
