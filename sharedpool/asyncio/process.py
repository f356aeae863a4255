"""The asyncio pools of this process, reached by ``os.fork`` and the server hooks of ``client.process``."""

from __future__ import annotations

import logging
import weakref

from sharedpool.client import process as client_process
from sharedpool.client.process import ProcessHooks

log = logging.getLogger("sharedpool.client")

# Each asyncio ``SharedConnectionPool`` (``asyncio.async_pool``) answers the hooks itself, all sync.
_POOLS: weakref.WeakSet[ProcessHooks] = weakref.WeakSet()


def register(pool: ProcessHooks) -> None:
    _POOLS.add(pool)


def all_pools() -> list[ProcessHooks]:
    """Every live asyncio ``SharedConnectionPool`` of this process."""
    return list(_POOLS)


class _Hooks:
    """What ``client.process`` calls for the asyncio pools; all sync, as a fork or a dying worker needs."""

    def after_fork_in_child(self) -> None:
        for pool in all_pools():
            pool.after_fork_in_child()

    def release_process_state(self) -> None:
        for pool in all_pools():
            pool.release_process_state()

    def abort(self) -> int:
        return sum(pool.abort() for pool in all_pools())


client_process.register_hooks(_Hooks())
