"""The pinned copy of a client that ``SharedRedis.lease()`` yields, sync and asyncio alike.

The copy shares everything with its client but its pool: a ``PinnedPool``
hands every command the one connection leased for the block, and the
lease ends with the block, not with each command.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from sharedpool import errors
from sharedpool.lease.state import LeaseHolder

ConnT = TypeVar("ConnT", bound=LeaseHolder)
ClientT = TypeVar("ClientT")


class PinnedPool(Generic[ConnT]):
    """One already-leased connection for a ``lease()`` block; anything else is the pool's.

    Each client's subclass adds ``get_connection`` and ``release`` in its own
    colour (def or async def) around ``pinned()``. As a context manager, it
    ends the lease with the block, through ``release`` (sync in both clients:
    a cancelled task must not cut it in half).
    """

    def __init__(self, pool: Any, connection: ConnT, release: Callable[[ConnT], None]) -> None:
        self._pool = pool
        self._connection: ConnT | None = connection
        self._end = release

    def __enter__(self) -> PinnedPool[ConnT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        connection = self._connection
        self._connection = None  # the block's client refuses commands from now on
        if connection is not None:
            self._end(connection)

    def pinned(self) -> ConnT:
        if self._connection is None:
            raise errors.LeaseError("this lease() block has ended; use the client it came from")
        if self._connection.owner_pid != os.getpid():
            raise errors.LeaseLost("a lease() block's connection was inherited across fork: use the client in this process")
        return self._connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def pinned_client(client: ClientT, pinned: PinnedPool[Any], single_connection_attr: str) -> ClientT:
    """A shallow copy of ``client`` whose commands all go through ``pinned``.

    ``single_connection_attr`` is where this redis-py client class keeps
    its single-connection flag (the sync and the asyncio ones differ).
    """
    copy: Any = object.__new__(type(client))
    copy.__dict__.update(client.__dict__)
    copy.connection_pool = pinned
    copy.connection = None
    setattr(copy, single_connection_attr, False)
    copy.auto_close_connection_pool = False
    return cast(ClientT, copy)
