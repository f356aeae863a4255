"""Handing a lease from one task of this process straight to the next, the slot's lock kept.

With hundreds of tasks on a few connections nearly every lease is
contended, and giving one back through the table costs a datagram to a
waiter and a process wake-up per command. When the next taker is a task of
this very process, the releaser rewrites the row for it (a new lease
number, acquired-at and call site: the table core's ``renew``) and passes
the ``Lease`` on, its ``Taker`` with it: the lock belongs to that taker's
open file description, so only that description can give it back.

``LocalLine`` is this process's tasks waiting for a lease, oldest first.
Each holds a ``Handoff``, whose ``future`` is whatever the task awaits at
the moment (its turn for a seat, its wake socket): a hand-over settles it,
so the task resumes whichever of the two it was waiting on. A handed lease
is the task's until it ``claim``s it; a task that ends otherwise (a
cancellation, a timeout) gives back what was handed to it when it leaves
the line (psycopg_pool's rule: a hand-off must be accepted).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from sharedpool.lease.core import Lease
from sharedpool.shell.attachment import Attachment

# A lease is handed to the next task of this process, rather than given back
# through the table, unless a task of another process has been queued for
# its database longer than this: then it is given back and that one woken.
# Measured (4 workers x 64 tasks on 4 connections, 2 loaded vCPUs): 2 ms
# hands over almost never (a round trip there takes longer, so some other
# worker always qualifies) and gains nothing; 50 ms took a lease per command
# from ~170 to ~270 requests/s and a lease per request from ~340 to ~530;
# 250 ms or unbounded gained no more and let one worker hog the slots. It is
# also the waiters' own rescan period.
HAND_OVER_FAIRNESS_S = 0.05


class Handoff:
    """One waiting task's place in ``LocalLine``."""

    __slots__ = ("future", "in_line", "in_table", "lease", "queued_at", "site", "started")

    def __init__(self, site: int, started: float) -> None:
        self.future: asyncio.Future[Any] | None = None
        self.lease: Lease | None = None
        self.site = site
        self.started = started
        self.in_line = True  # in LocalLine (until handed a lease, or it leaves)
        self.in_table = False  # queued in the table too (it holds one of the process's seats)
        self.queued_at = 0.0  # when it joined the table's queue

    def claim(self) -> Lease | None:
        lease, self.lease = self.lease, None
        return lease


class LocalLine:
    """This process's tasks waiting for a lease, and how many of them are in the table's queue."""

    def __init__(self) -> None:
        self._line: collections.deque[Handoff] = collections.deque()
        self.in_table = 0

    def __len__(self) -> int:
        return len(self._line)

    def join(self, site: int, started: float) -> Handoff:
        handoff = Handoff(site, started)
        self._line.append(handoff)
        return handoff

    def leave(self, handoff: Handoff) -> Lease | None:
        """Out of the line; a lease handed over and not claimed is returned, to be given back."""
        if handoff.in_line:  # else handed a lease: already out (no ValueError raised and caught per hand-over)
            handoff.in_line = False
            self._line.remove(handoff)
        return handoff.claim()

    def next_taker(self, now: float, patience: float) -> Handoff | None:
        """The task in line to hand a lease to: the oldest not yet handed one, unless it is
        queued in the table and has been there less than ``patience``: then the oldest not queued there.

        A task queued in the table that is handed a lease leaves the queue,
        and the next one in line joins it: a queue entry written and removed
        under the table's header lock, a wake socket added to the selector and
        removed, per command. Passing over it for a while keeps the process's
        few entries in the queue (they stand for it there), and bounds how
        long a younger task may go first. The while counts from its joining
        the table's queue, not from its call: under load a task reaches a
        seat after more than ``patience`` in this process's line, and counted
        from the call it would be handed the very next lease, its fresh
        entry removed again (measured: a queue entry written and removed for
        every third command, 4 workers x 64 tasks on 4 connections).

        Whether a task is awaiting right now does not matter: a task whose
        timer just fired (its future done, the task not yet resumed), or
        one between two steps of its wait, looks at ``lease`` before it
        waits again. Only a task that is awaiting is woken by the hand-over.
        """
        oldest: Handoff | None = None
        for handoff in self._line:
            if handoff.lease is not None:
                continue
            if oldest is None:
                oldest = handoff
                if not handoff.in_table or now - handoff.queued_at >= patience:
                    return handoff
            elif not handoff.in_table:
                return handoff
        return oldest

    def hand(self, handoff: Handoff, lease: Lease) -> None:
        self._line.remove(handoff)
        handoff.in_line = False
        handoff.lease = lease
        future = handoff.future
        if future is not None and not future.done():
            future.set_result(True)

    def offer(self, lease: Lease, current: Attachment | None, used: bool) -> bool:
        """Hand ``lease`` to the next task in line if fair; True if handed (else the caller gives it back)."""
        att = lease.attachment
        if att is not current or att.detached or lease.taker is None or lease.db != att.db:
            return False
        table = att.table
        try:
            flags, waiters = table.hot()
            if flags:
                return False  # paused or stopping: the manager decides who gets what
            if waiters > self.in_table:
                # Someone else may be queued: hand over only while it has
                # not waited long (a context switch per command otherwise,
                # with every worker queued for more all the time).
                since = table.oldest_waiter_since(att.db, att.pid)
                if since is not None and time.monotonic() - since >= HAND_OVER_FAIRNESS_S:
                    return False
            handoff = self.next_taker(time.monotonic(), HAND_OVER_FAIRNESS_S)
            if handoff is None:
                return False
            now = time.monotonic()
            seq = table.core.renew(
                lease.slot, lease.generation, lease.seq, att.pid, att.start, handoff.site,
                lease.taken_at if used else -1.0, handoff.started, now, False,
            )
            if not seq:
                return False  # revoked, repaired or expired: the ordinary way says so
        except ValueError:
            return False  # the table was unmapped under us (the manager is gone)
        self.hand(handoff, Lease(att, lease.slot, lease.generation, seq, lease.lock_fd, now, lease.db, lease.taker))
        return True
