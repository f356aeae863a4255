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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sharedpool import errors
from sharedpool.asyncio.handoff import Handoff, LocalLine
from sharedpool.lease import queue as lease_queue
from sharedpool.lease.core import Lease, Taken, Taker, pressure

if TYPE_CHECKING:
    from sharedpool.shell.attachment import Attachment

Demander = Callable[["Attachment", float, int], Awaitable[None]]


async def wait_in_queue(
    att: Attachment,
    taker: Taker,
    handoff: Handoff,
    line: LocalLine,
    deadline: float,
    acquire_timeout: float,
    demand: Demander,
) -> Taken | Lease:
    """Every open slot is taken: queue in the table, and do what the lease core asks, awaiting.

    A task of this process may hand us its lease meanwhile (``handoff``): that ends the wait too.
    """
    wait = lease_queue.QueueWait(att, taker, handoff.site, handoff.started, deadline, acquire_timeout, att.db)
    line.in_table += 1
    handoff.in_table = True
    handoff.queued_at = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        while True:
            if handoff.lease is not None:
                return handoff.lease  # handed over between two steps of the wait
            step = wait.next_wait()
            if isinstance(step, lease_queue.Sleep):
                woken = await readable(loop, step.fd, step.seconds, handoff)
                if handoff.lease is not None:
                    return handoff.lease  # claimed by the caller, after leave() below
                if woken:
                    wait.on_wake()
            elif isinstance(step, lease_queue.Demand):
                await demand(att, step.deadline, step.db)
            else:
                return step
    finally:
        # Cancelled too: our entry leaves the queue and a wake meant for us
        # goes to the next waiter.
        line.in_table -= 1
        handoff.in_table = False
        wait.leave()


async def readable(loop: asyncio.AbstractEventLoop, fd: int, seconds: float, handoff: Handoff | None = None) -> bool:
    """Whether ``fd`` became readable within ``seconds`` (or a lease was handed over: see ``handoff.lease``)."""
    future: asyncio.Future[bool] = loop.create_future()
    loop.add_reader(fd, _settle, future, True)
    timer = loop.call_later(seconds, _settle, future, False)
    if handoff is not None:
        handoff.future = future
    try:
        return await future
    finally:
        if handoff is not None:
            handoff.future = None
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

    def anyone_waiting(self) -> bool:
        """``waiting > 0``, asked on every lease: drops the settled futures at the head instead of counting them all."""
        line = self._line
        while line and line[0].done():
            line.popleft()
        return bool(line)

    def take_free(self) -> bool:
        """A seat now if one is free and nobody is in line for one (no await: the uncontended way)."""
        if self.free > 0 and not self._line:
            self.free -= 1
            return True
        return False

    async def take(self, att: Attachment, deadline: float, acquire_timeout: float, handoff: Handoff) -> bool:
        """True with a seat (the caller gives it up with ``pass_on``); False when a lease
        was handed over (``handoff.lease``) first."""
        if self.take_free():
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._line.append(future)
        # A hand-over settles this same future: done, it is skipped by
        # _pass_on, so a task gets a seat or a lease, never both.
        handoff.future = future
        try:
            seated = await settled_within(future, deadline - time.monotonic())
        except BaseException:
            if future.done() and not future.cancelled() and handoff.lease is None:
                self.pass_on()  # handed a seat as we gave up: the next one gets it
            raise
        finally:
            handoff.future = None
        if handoff.lease is not None:
            if seated and future.result() is None:
                self.pass_on()  # granted a seat as well as handed a lease: the seat goes to the next
            return False
        if not seated:
            raise errors.PoolTimeout(
                f"no lease from pool {att.pool_name!r} within {acquire_timeout:.2f} s "
                f"({pressure(att)}; {self.waiting + 1} tasks of this process in line)"
            )
        return True

    def pass_on(self) -> None:
        while self._line:
            future = self._line.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.free += 1

