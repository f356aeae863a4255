"""Waiting for a lease without blocking the loop: the table's queue, and this process's turn to join it.

``wait_in_queue`` drives ``lease_queue.QueueWait``: its ``Sleep`` is the
taker's wake socket watched with ``loop.add_reader`` for at most the step's
seconds. ``QueueWait`` itself takes the table's header lock with short
bounded waits (joining: up to the deadline; re-queueing 0.1 s; leaving
0.2 s) that do block the loop, but only while another process is frozen
in its microseconds holding that lock (SIGSTOP, swap).

``Seats`` lets a few tasks of this process into the table's queue at once
and keeps the rest in line here: the manager's ``max_waiting`` counts
queue entries, and a worker's hundreds of tasks would otherwise fill it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sharedpool import errors
from sharedpool.client import lease_queue
from sharedpool.client.lease_core import Taken, Taker, pressure

if TYPE_CHECKING:
    from sharedpool.client.attachment import Attachment

Demander = Callable[["Attachment", float, int], Awaitable[None]]


async def wait_in_queue(
    att: Attachment, taker: Taker, site: int, started: float, deadline: float, acquire_timeout: float, demand: Demander
) -> Taken:
    """Every open slot is taken: queue in the table, and do what the lease core asks, awaiting."""
    wait = lease_queue.QueueWait(att, taker, site, started, deadline, acquire_timeout, att.db)
    loop = asyncio.get_running_loop()
    try:
        while True:
            step = wait.next_step()
            if isinstance(step, tuple):
                return step
            if isinstance(step, lease_queue.Sleep):
                if await readable(loop, step.fd, step.seconds):
                    wait.on_wake()
            elif isinstance(step, lease_queue.Demand):
                await demand(att, step.deadline, step.db)
            else:
                for frame in step.frames:
                    att.channel.notify(frame)
    finally:
        # Cancelled too: our entry leaves the queue and a wake meant for us
        # goes to the next waiter.
        wait.leave()


async def readable(loop: asyncio.AbstractEventLoop, fd: int, seconds: float) -> bool:
    """Whether ``fd`` became readable within ``seconds``."""
    future: asyncio.Future[bool] = loop.create_future()
    loop.add_reader(fd, _settle, future, True)
    timer = loop.call_later(seconds, _settle, future, False)
    try:
        return await future
    finally:
        loop.remove_reader(fd)
        timer.cancel()


async def settled_within(future: asyncio.Future[Any], seconds: float) -> bool:
    """Await ``future`` for at most ``seconds``: False if the time ran out (the future is then cancelled).

    Not ``asyncio.wait_for``: up to Python 3.11 it swallows the caller's
    cancellation when the future completes in the same turn, and a task
    that was cancelled while waiting must stop.
    """
    loop = asyncio.get_running_loop()
    expired = False

    def expire() -> None:
        nonlocal expired
        if not future.done():
            expired = True
            future.cancel()

    timer = loop.call_later(max(0.0, seconds), expire)
    try:
        await future
        return True
    except asyncio.CancelledError:
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # 3.11+: whether the caller was cancelled too
        if expired and not (cancelling is not None and cancelling()):
            return False
        raise
    finally:
        timer.cancel()


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class Seats:
    """At most ``count`` tasks of this process in the table's queue; the others wait here, first come first served."""

    def __init__(self, count: int) -> None:
        self.free = count
        self._line: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for future in self._line if not future.done())

    @asynccontextmanager
    async def seat(self, att: Attachment, deadline: float, acquire_timeout: float) -> AsyncIterator[None]:
        await self._take(att, deadline, acquire_timeout)
        try:
            yield
        finally:
            self._pass_on()

    async def _take(self, att: Attachment, deadline: float, acquire_timeout: float) -> None:
        if self.free > 0 and not self._line:
            self.free -= 1
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._line.append(future)
        try:
            seated = await settled_within(future, deadline - time.monotonic())
        except BaseException:
            if future.done() and not future.cancelled():
                self._pass_on()  # handed a seat as we gave up: the next one gets it
            raise
        if not seated:
            raise errors.PoolTimeout(
                f"no lease from pool {att.pool_name!r} within {acquire_timeout:.2f} s "
                f"({pressure(att)}; {self.waiting + 1} tasks of this process in line)"
            )

    def _pass_on(self) -> None:
        while self._line:
            future = self._line.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.free += 1

