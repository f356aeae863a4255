"""Waiting for a lease in the table's FIFO queue, sans I/O: the lease core's slow path.

``QueueWait.next_step()`` returns what to do next:

* ``Taken`` (a tuple): the lease is ours; done.
* ``Notify``: send these frames to the manager (no reply).
* ``Demand``: ask the manager for a connection of ``db`` (DEMAND, then ACK) before ``deadline``.
* ``Sleep``: wait until ``fd`` (the taker's wake socket) is readable, then
  call ``on_wake()``, or until ``seconds`` pass. A sync pool ``poll``s; an
  asyncio pool uses ``loop.add_reader`` on the same fd.

Call ``next_step()`` again after each, and ``leave()`` always, at the end.
A driver that sends through the attachment's channel calls ``next_wait()``
instead: it sends the ``Notify`` frames itself (``notify`` waits on no
reply, on either client's channel), leaving the driver the steps that block.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sharedpool import errors, protocol
from sharedpool import table as tbl
from sharedpool.lease.core import RESCAN_S, STOPPING, Taken, Taker, pressure, try_slots, wake_one
from sharedpool.protocol import ReportCause
from sharedpool.table import Flag, Outcome, RowState

if TYPE_CHECKING:
    from sharedpool.lease.context import LeaseContext

log = logging.getLogger("sharedpool.client")

_PAUSED = int(Flag.PAUSED)
_REDIS_DOWN = int(Flag.REDIS_DOWN)
_OPEN_STATES = frozenset({int(RowState.READY), int(RowState.HELD)})


@dataclass(frozen=True, slots=True)
class Notify:
    """Send these frames to the manager (no reply), then ``next_step()``."""

    frames: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Demand:
    """Ask the manager for a connection of ``db`` (DEMAND, then its ACK) before ``deadline``, then ``next_step()``."""

    deadline: float
    db: int


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait until ``fd`` is readable (then ``on_wake()``) or ``seconds`` pass, then ``next_step()``."""

    fd: int
    seconds: float


Step = Taken | Notify | Demand | Sleep


class QueueWait:
    """One taker's turn in the table's FIFO queue, while every open slot is taken.

    Joining the queue is the constructor (``PoolFull`` when ``max_waiting``
    are queued); each ``next_step()`` looks at the table once and says what
    to do next. ``leave()``, whatever ended the wait (a timeout, a signal
    handler that raised, a cancelled task), takes the entry out and passes a
    wake meant for it on to the next waiter: nothing of the wait is left.
    """

    _LOOK, _CHORES, _SLEEP = range(3)

    def __init__(
        self, att: LeaseContext, taker: Taker, site: int, started: float, deadline: float, acquire_timeout: float, db: int
    ) -> None:
        self.att = att
        self.db = db
        self.taker = taker
        self.site = site
        self.started = started
        self.deadline = deadline
        self.acquire_timeout = acquire_timeout
        self.taken: Taken | None = None
        self._wake = taker.wake_socket()
        self._phase = self._LOOK
        self._flags = 0
        self._now = 0.0
        self._demanded_at = 0.0
        self._failed_before_demand = -1
        self._abandoned_checked = 0.0
        self._woken = False
        table = att.table
        if not tbl.lock_within(taker.lock_fd, tbl.HEADER_LOCK, max(0.0, deadline - time.monotonic())):
            raise errors.PoolTimeout(
                f"no lease from pool {att.pool_name!r} within {acquire_timeout:.2f} s (the lease table's queue stayed locked)"
            )
        try:
            self.index = table.enqueue(att.pid, taker.token, time.monotonic(), db)
        finally:
            tbl.unlock(taker.lock_fd, tbl.HEADER_LOCK)
        if self.index < 0:
            raise errors.PoolFull(
                f"pool {att.pool_name!r} refused to queue another waiter (max_waiting={table.max_waiting}; {pressure(att)})"
            )

    def next_step(self) -> Step:
        att, table, taker = self.att, self.att.table, self.taker
        if self._phase == self._LOOK:
            flags = self._flags = table.hot()[0]
            if flags & STOPPING:
                raise errors.ShuttingDown(f"pool {att.pool_name!r} is shutting down")
            if not flags & _PAUSED:
                taken = try_slots(att, taker, self.site, self.started, self.db)
                if taken is not None:
                    self.taken = taken
                    return taken
            if self._woken:
                # Woken, but the slot went to someone else: wait again,
                # keeping our place in line.
                self._woken = False
                if tbl.lock_within(taker.lock_fd, tbl.HEADER_LOCK, 0.1):
                    try:
                        table.requeue(self.index, att.pid, taker.token)
                    finally:
                        tbl.unlock(taker.lock_fd, tbl.HEADER_LOCK)
            now = self._now = time.monotonic()
            self._phase = self._CHORES
            if now - self._abandoned_checked >= RESCAN_S * 4:
                self._abandoned_checked = now
                reports = find_abandoned(att, taker)
                if reports:
                    return Notify(reports)
        if self._phase == self._CHORES:
            flags, now = self._flags, self._now
            self._phase = self._SLEEP
            failed_before = self._failed_before_demand
            if flags & _REDIS_DOWN and failed_before >= 0 and table.failed_connects != failed_before and not any_open(att):
                # We asked for a connection and the manager's attempt
                # failed too: Redis is down, do not wait it out.
                since, error = table.outage()
                down_for = f"{time.monotonic() - since:.1f} s" if since else "a moment"
                raise errors.RedisUnavailable(
                    f"Redis at {att.welcome.get('redis')} unreachable for {down_for} (last error: {error}); "
                    f"pool {att.pool_name!r} has no open connection (this request waited "
                    f"{time.monotonic() - self.started:.2f} s for the manager's new attempt)"
                )
            if not flags & _PAUSED and now - self._demanded_at >= 0.5 and room_to_open(att, self.db):
                self._demanded_at = now
                self._failed_before_demand = table.failed_connects
                return Demand(self.deadline, self.db)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise errors.PoolTimeout(
                f"no lease from pool {att.pool_name!r} within {self.acquire_timeout:.2f} s "
                f"({pressure(att, waiting_self=True)})"
            )
        self._phase = self._LOOK
        return Sleep(self._wake.fileno(), min(remaining, RESCAN_S))

    def next_wait(self) -> Taken | Demand | Sleep:
        """``next_step()``, with the frames of each ``Notify`` sent on the way."""
        while True:
            step = self.next_step()
            if not isinstance(step, Notify):
                return step
            for frame in step.frames:
                self.att.channel.notify(frame)

    def on_wake(self) -> None:
        """The wake socket was readable: take one datagram (others make the next wait return at once)."""
        try:
            self._wake.recv(16)
        except BlockingIOError:
            pass
        self._woken = True

    def leave(self) -> None:
        att, taker = self.att, self.taker
        if att.detached or taker.lock_fd < 0:
            return  # that manager's table was dropped (it died mid-wait): no queue left to leave
        was_woken = False
        # Bounded even here: a frozen holder of the queue's lock must not
        # hold us past our deadline; the manager's sweep drops entries of
        # the dead, and a stale entry of a live process costs a wake.
        if tbl.lock_within(taker.lock_fd, tbl.HEADER_LOCK, 0.2):
            try:
                was_woken = att.table.dequeue(self.index, att.pid, taker.token)
            finally:
                tbl.unlock(taker.lock_fd, tbl.HEADER_LOCK)
        if was_woken and self.taken is None:
            wake_one(att, taker.lock_fd, self.db)  # the slot meant for us goes to the next


def any_open(att: LeaseContext) -> bool:
    table = att.table
    return any(table.state_of(slot) in _OPEN_STATES for slot in range(table.slots_in_use))


def room_to_open(att: LeaseContext, db: int) -> bool:
    """Whether a DEMAND for ``db`` can help: a slot to open, or an idle one of
    another database the manager may rebind (when max_connections are open)."""
    table = att.table
    for slot in range(table.slots_in_use):
        state = table.state_of(slot)
        if state == RowState.CLOSED or (state == RowState.READY and table.db_of(slot) != db):
            return True
    return False


def find_abandoned(att: LeaseContext, taker: Taker) -> tuple[bytes, ...]:
    """Mark BROKEN each row HELD whose lock is free (its holder died mid-lease, DESIGN fact 2).

    Returns the reports for the manager, to send once the locks are given
    back: the manager takes them to repair.
    """
    table = att.table
    reports: list[bytes] = []
    for slot in range(table.slots_in_use):
        if table.state_of(slot) != RowState.HELD or slot in taker.held:
            continue
        generation = table.generation_of(slot)
        offset = tbl.slot_lock(slot, generation)
        if not tbl.try_lock(taker.lock_fd, offset):
            continue
        try:
            row = table.row(slot)
            if row.state is RowState.HELD and row.generation == generation:
                table.write_row(slot, tbl.found_abandoned(row))
                log.warning(
                    "slot %d was left held by pid %d without being given back (the holder died or dropped "
                    "its lock): reported for replacement", slot, row.holder_pid,
                )
                reports.append(protocol.encode_report(slot, generation, row.lease_seq, Outcome.BROKEN, ReportCause.HOLDER_GONE))
        except tbl.RowError:
            pass
        finally:
            tbl.unlock(taker.lock_fd, offset)
    return tuple(reports)


