"""One test body for both clients: the asyncio client driven as a sync one.

Where the sync and the asyncio client promise the same thing, a test takes
``kind`` ("sync" or "asyncio") and makes its client with ``shared_redis``:
the asyncio client's coroutines run to completion on a loop of its own, so
the scenario, its timings and its assertions are written once. A pool is
bound to one event loop, so every call of one client uses the same loop.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import sharedpool
import sharedpool.asyncio as spa

KINDS = ("sync", "asyncio")


class Blocking:
    """``target``, its coroutine methods run to completion on ``loop`` (and its pool's, likewise)."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name == "connection_pool":
            return Blocking(value, self._loop)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            result = value(*args, **kwargs)
            return self._loop.run_until_complete(result) if inspect.isawaitable(result) else result

        return call

    def close(self) -> None:
        """The client's ``aclose()`` and its pool's ``disconnect()``, then the loop's end."""
        try:
            self._loop.run_until_complete(self._target.aclose())
            self._loop.run_until_complete(self._target.connection_pool.disconnect())
        finally:
            self._loop.close()


def shared_redis(kind: str, **options: Any) -> Any:
    """``sharedpool.Redis(**options)``, or the asyncio one driven as a sync one."""
    if kind == "sync":
        return sharedpool.Redis(**options)
    return Blocking(spa.Redis(**options), asyncio.new_event_loop())
