"""``SharedRedis`` and the ``Redis()`` shortcut: redis-py's client over a ``SharedConnectionPool``, plus ``lease()``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from sharedpool import errors
from sharedpool.client.connection import LeasedConnection
from sharedpool.client.pool import SharedConnectionPool


class _PinnedPool:
    """Hands out one already-leased connection, for ``SharedRedis.lease()``."""

    def __init__(self, pool: SharedConnectionPool, connection: LeasedConnection) -> None:
        self._pool = pool
        self._connection: LeasedConnection | None = connection

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> LeasedConnection:
        if self._connection is None:
            raise errors.LeaseError("this lease() block has ended; use the client it came from")
        if self._connection.pid != os.getpid():
            raise errors.LeaseLost("a lease() block's connection was inherited across fork: use the client in this process")
        return self._connection

    def release(self, connection: Any) -> None:
        pass  # the lease ends with the block, not with each command

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class SharedRedis(redis.Redis):
    """``redis.Redis`` over a ``SharedConnectionPool``, plus ``lease()``."""

    connection_pool: SharedConnectionPool

    @contextmanager
    def lease(self) -> Iterator[redis.Redis]:
        """Pin one lease for a block: every command and pipeline inside uses it.

        The yielded client is for this thread and this block only.
        """
        pool = self.connection_pool
        conn = pool.get_connection()
        pinned = _PinnedPool(pool, conn)
        client = object.__new__(type(self))
        client.__dict__.update(self.__dict__)
        client.connection_pool = pinned  # type: ignore[assignment]
        client.connection = None
        client._single_connection_client = False
        client.auto_close_connection_pool = False
        try:
            yield client
        finally:
            pinned._connection = None
            pool.release(conn)


def Redis(
    socket_path: str | None = None,
    *,
    acquire_timeout: float | None = None,
    manager_timeout: float | None = None,
    single_connection_client: bool = False,
    **redis_kwargs: Any,
) -> SharedRedis:
    """A ``redis.Redis`` whose connections are leased from the sharedpool manager.

    Keyword arguments are those of ``redis.Redis`` that concern the client
    (``decode_responses``, ``socket_timeout``, ``retry``, ``protocol``...).
    """
    pool = SharedConnectionPool(socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout, **redis_kwargs)
    client = SharedRedis(connection_pool=pool, single_connection_client=single_connection_client)
    client.auto_close_connection_pool = True
    return client
