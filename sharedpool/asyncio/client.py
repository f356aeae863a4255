"""``SharedRedis`` and the ``Redis()`` shortcut for asyncio: ``redis.asyncio.Redis`` over the shared pool, plus ``lease()``."""

from __future__ import annotations

import copy
import inspect
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio

from sharedpool.asyncio.async_pool import SharedConnectionPool
from sharedpool.asyncio.autopipeline import AutoPipeline
from sharedpool.asyncio.connection import AsyncLeasedConnection
from sharedpool.shell import clone
from sharedpool.shell.pinning import PinnedPool, pinned_client

_REDIS_DEFAULT_RETRY = inspect.signature(redis.asyncio.Redis.__init__).parameters["retry"].default


class _PinnedPool(PinnedPool[AsyncLeasedConnection]):
    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> AsyncLeasedConnection:
        return self.pinned()

    async def release(self, connection: Any) -> None:
        pass  # the lease ends with the block, not with each command


class SharedRedis(redis.asyncio.Redis):
    """``redis.asyncio.Redis`` over an asyncio ``SharedConnectionPool``, plus ``lease()``."""

    connection_pool: SharedConnectionPool
    autopipeline: AutoPipeline | None = None  # see sharedpool.asyncio.autopipeline

    def __init__(self, *args: Any, autopipeline: bool | None = None, **kwargs: Any) -> None:
        """As ``redis.asyncio.Redis``; ``autopipeline``: batch this client's simple commands
        (None: as its pool says, which is on unless made with ``autopipeline=False``)."""
        # Made like Redis() (SharedRedis(socket_path=..., db=...)): the pool is built from the options.
        if kwargs.get("connection_pool") is None and not args:
            kwargs.pop("connection_pool", None)
            single = bool(kwargs.pop("single_connection_client", False))
            if autopipeline is not None:
                kwargs["autopipeline"] = autopipeline
            super().__init__(connection_pool=SharedConnectionPool(**kwargs), single_connection_client=single)
            self.auto_close_connection_pool = True
        else:
            super().__init__(*args, **kwargs)
        if autopipeline is None:
            autopipeline = getattr(self.connection_pool, "autopipeline", False)
        self.autopipeline = AutoPipeline() if autopipeline else None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SharedRedis:  # type: ignore[override]
        """A client for the database and options of a ``redis://`` or ``unix://`` URL
        (``SharedConnectionPool.from_url``: the manager owns where Redis is and the password)."""
        client: SharedRedis = clone.client_from_url(cls, SharedConnectionPool, url, kwargs)
        return client

    def __reduce__(self) -> tuple[Any, ...]:
        return clone.reduce_client(self, self.single_connection_client)

    def execute_command(self, *args: Any, **options: Any) -> Awaitable[Any]:  # type: ignore[override]
        # Not a coroutine of its own: it returns the one that does the work, so an
        # unbatched command's every suspension and resumption passes one frame fewer.
        batcher = self.autopipeline
        if batcher is not None and not self.single_connection_client and batcher.takes(args[0]):
            return batcher.execute(self, args, options)
        return super().execute_command(*args, **options)

    def lock(self, *args: Any, **kwargs: Any) -> Any:
        """``redis.asyncio.Redis.lock``, its commands each on a lease of its own as in
        redis.asyncio, never batched: a lock's SET NX is timed against its own
        timeouts and must not wait behind other tasks' replies in a batch."""
        lock = super().lock(*args, **kwargs)
        lock.redis = self._unbatched()
        return lock

    def _unbatched(self) -> SharedRedis:
        """This client, sharing everything but its batcher."""
        twin: SharedRedis = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.autopipeline = None
        twin.auto_close_connection_pool = False
        return twin

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[redis.asyncio.Redis]:
        """Pin one lease for a block: every command, pipeline and pub/sub inside uses it.

        The yielded client is for this task and this block only. Cancelled
        inside, the lease ends as any other: broken if a reply was in flight.
        """
        pool = self.connection_pool
        conn = await pool.get_connection()
        with _PinnedPool(pool, conn, pool.release_now) as pinned:
            client = pinned_client(self, pinned, "single_connection_client")
            client.autopipeline = None  # the block's commands are this task's, in order, on its lease
            yield client


def Redis(
    socket_path: str | None = None,
    *,
    acquire_timeout: float | None = None,
    manager_timeout: float | None = None,
    single_connection_client: bool = False,
    autopipeline: bool = True,
    **redis_kwargs: Any,
) -> SharedRedis:
    """A ``redis.asyncio.Redis`` whose connections are leased from the sharedpool manager.

    Keyword arguments are those of ``redis.asyncio.Redis`` that concern the
    client (``decode_responses``, ``socket_timeout``, ``retry``, ``protocol``, ``db``...).
    Concurrent tasks' simple commands share leases and round trips
    (``sharedpool.asyncio.autopipeline``); ``autopipeline=False`` gives
    every command a lease of its own. Unless given, ``retry`` is redis-py's
    own default for ``redis.asyncio.Redis``.
    """
    if "retry" not in redis_kwargs:
        redis_kwargs["retry"] = copy.deepcopy(_REDIS_DEFAULT_RETRY)
    return SharedRedis(
        socket_path=socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout,
        single_connection_client=single_connection_client, autopipeline=autopipeline, **redis_kwargs,
    )
