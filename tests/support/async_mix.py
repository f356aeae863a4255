"""The asyncio request mix: a pipeline, a pinned lease, plain commands, each read checked (as ``mix``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any


async def checked_round_trip(r: Any, key: str, value: str, turn: int) -> str:
    """Write ``value`` at ``key`` and read it back, by the ``turn % 3``-th way; '' or what went wrong."""
    try:
        if turn % 3 == 0:
            async with r.pipeline() as pipe:
                got = (await pipe.set(key, value).get(key).execute())[1]
        elif turn % 3 == 1:
            async with r.lease() as pinned:
                await pinned.set(key, value)
                got = await pinned.get(key)
        else:
            await r.set(key, value)
            got = await r.get(key)
    except Exception as exc:
        return f"{key}: {type(exc).__name__}: {exc}"
    return "" if got == value else f"{key}: wrote {value!r}, read {got!r}"


async def many_tasks(r: Any, tasks: int, rounds: int, tag: str) -> list[str]:
    """``tasks`` concurrent tasks, each ``rounds`` checked round trips with values no other task writes."""

    async def body(task: int) -> list[str]:
        prefix = f"amix:{tag}:{task}:{uuid.uuid4().hex}"
        failures = []
        for i in range(rounds):
            failure = await checked_round_trip(r, f"{prefix}:{i}", f"{tag}-{task}-{i}", task + i)
            if failure:
                failures.append(failure)
        return failures

    results = await asyncio.gather(*(body(t) for t in range(tasks)))
    return [f for failures in results for f in failures]


def report_from_async_worker(
    out: Any, socket_path: str, check: Callable[[Any], Awaitable[list[str]]], **client_options: Any
) -> None:
    """In a worker process: run ``check`` on a fresh ``sharedpool.asyncio.Redis`` and put its failures on ``out``."""
    import sharedpool.asyncio as spa

    async def main() -> list[str]:
        r = spa.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=60, **client_options)
        try:
            return await check(r)
        finally:
            await r.aclose()

    try:
        out.put(asyncio.run(main()))
    except Exception as exc:
        out.put([repr(exc)])
