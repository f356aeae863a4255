"""``SharedRedis`` and the ``Redis()`` shortcut: redis-py's client over a ``SharedConnectionPool``, plus ``lease()``."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from sharedpool import errors
from sharedpool.client.connection import LeasedConnection
from sharedpool.client.sync_pool import SharedConnectionPool
from sharedpool.shell import clone
from sharedpool.shell.pinning import PinnedPool, pinned_client

# What redis.Redis retries with when not told otherwise, read from the
# installed redis-py so that Redis() follows it across versions.
_REDIS_DEFAULT_RETRY = inspect.signature(redis.Redis.__init__).parameters["retry"].default


class _PinnedPool(PinnedPool[LeasedConnection]):
    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> LeasedConnection:
        return self.pinned()

    def release(self, connection: Any) -> None:
        pass  # the lease ends with the block, not with each command


class SharedRedis(redis.Redis):
    """``redis.Redis`` over a ``SharedConnectionPool``, plus ``lease()``.

    Made like ``sharedpool.Redis()`` (``SharedRedis(socket_path=..., db=...,
    decode_responses=...)``), from a URL (``SharedRedis.from_url``), or
    around a pool. Given a plain ``redis.ConnectionPool`` whose connection
    class is ``LeasedConnection`` (how rq rebuilds a client from
    ``connection.__class__`` and the pool's ``connection_kwargs``), it uses
    the shared pool those options name instead.
    """

    connection_pool: SharedConnectionPool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pool = kwargs.get("connection_pool")
        if pool is None and not args:
            kwargs.pop("connection_pool", None)
            single = bool(kwargs.pop("single_connection_client", False))
            super().__init__(connection_pool=SharedConnectionPool(**kwargs), single_connection_client=single)
            self.auto_close_connection_pool = True
            return
        if pool is not None and not isinstance(pool, SharedConnectionPool):
            connection_class = getattr(pool, "connection_class", None)
            if isinstance(connection_class, type) and issubclass(connection_class, LeasedConnection):
                kwargs["connection_pool"] = SharedConnectionPool(**clone.clone_kwargs(pool.connection_kwargs))
                super().__init__(*args, **kwargs)
                self.auto_close_connection_pool = True
                return
        super().__init__(*args, **kwargs)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SharedRedis:  # type: ignore[override]
        """A client for the database and options of a ``redis://`` or ``unix://`` URL (see
        ``SharedConnectionPool.from_url``: the manager owns where Redis is and the password)."""
        client: SharedRedis = clone.client_from_url(cls, SharedConnectionPool, url, kwargs)
        return client

    def __reduce__(self) -> tuple[Any, ...]:
        return clone.reduce_client(self, self._single_connection_client)

    @contextmanager
    def lease(self) -> Iterator[redis.Redis]:
        """Pin one lease for a block: every command and pipeline inside uses it.

        The yielded client is for this thread and this block only.
        """
        pool = self.connection_pool
        conn = pool.get_connection()
        with _PinnedPool(pool, conn, pool.release) as pinned:
            yield pinned_client(self, pinned, "_single_connection_client")


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
    (``db``, ``decode_responses``, ``socket_timeout``, ``retry``,
    ``protocol``...). Unless given, ``retry`` is redis-py's own default for
    ``redis.Redis``.
    """
    if "retry" not in redis_kwargs:
        redis_kwargs["retry"] = copy.deepcopy(_REDIS_DEFAULT_RETRY)
    if redis_kwargs.get("connection_pool") is not None:
        # As redis.Redis(connection_pool=...): the pool says where and how; the
        # pool's own options here would reach redis.Redis, which knows none of them.
        if socket_path is not None or acquire_timeout is not None or manager_timeout is not None:
            raise errors.ConfigError(
                "connection_pool", redis_kwargs["connection_pool"],
                "a pool alone: socket_path, acquire_timeout and manager_timeout are the pool's, give them to it",
            )
        return SharedRedis(single_connection_client=single_connection_client, **redis_kwargs)
    return SharedRedis(
        socket_path=socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout,
        single_connection_client=single_connection_client, **redis_kwargs,
    )

