"""Clean leases nobody waits for, kept by their asyncio pool until the loop's next turn.

A task's next command comes in the same loop turn as its last reply (there
is no await between redis-py's release and its next get_connection). So a
lease given back clean while nobody waits, in this process or in the
table, is parked instead: the next command of that turn, of that task or
of another one, takes a parked lease back (``take_back``) with no unlock,
lock, selector change or fcntl, its row renewed in place as in a
hand-over. With many tasks, each on a lease of its own, their replies
arrive in one turn and each task's next command takes a parked lease: no
lease goes back to the table and out again between two commands of a
request.

By the loop's next turn a parked lease nobody took back ends as any other
would (``end``: to a waiter of this process if fair, else to the table).
One callback, queued by the first park after the last one ran, ends
whatever is parked when it runs: the steps that park in one turn pay for
one callback between them. Nothing is parked, or taken back, while the
table is waited on or paused: a waiter always gets the lease it would have
had, and a lease the manager asked back is never parked: it is given back
at once, the ordinary way that tells its holder.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

from sharedpool.asyncio.connection import AsyncLeasedConnection, SlotEntry
from sharedpool.lease.core import Lease
from sharedpool.lease.state import LeaseState
from sharedpool.shell.attachment import Attachment


class Parking:
    """The parked leases of one pool (at most the leases it holds)."""

    __slots__ = ("leases", "_end", "_give_back", "_turn_on")

    def __init__(self, end: Callable[[Lease], None], give_back: Callable[[Lease], None]) -> None:
        self.leases: list[Lease] = []  # the last parked last: taken back first, its connection the warmest
        self._end = end  # hand over or give back: a parked lease nobody took back
        self._give_back = give_back  # to the table, clean
        # The loop our end-of-turn callback is queued on, until it runs.
        self._turn_on: asyncio.AbstractEventLoop | None = None

    def park(self, lease: Lease, loop: asyncio.AbstractEventLoop | None, current: Attachment | None) -> bool:
        """Keep ``lease`` until the loop's next turn; True if kept (else the caller gives it back)."""
        att = lease.attachment
        if loop is None or att is not current or att.detached or lease.taker is None:
            return False
        try:
            if not att.table.core.quiet(lease.slot, lease.generation, lease.seq):
                return False
        except ValueError:
            return False  # the table was unmapped under us (the manager is gone)
        if asyncio._get_running_loop() is not loop:
            return False  # released outside the loop (a finalizer, another thread): nothing would unpark it
        self.leases.append(lease)
        if self._turn_on is not loop:
            # Queued on another loop (one this pool left) it may never run: queue one here.
            self._turn_on = loop
            loop.call_soon(self._next_turn)
        return True

    def _next_turn(self) -> None:
        """Queued in an earlier step than any lease it now finds parked: each one's
        own step, where its holder's next command could take it back, is over."""
        self._turn_on = None
        self._end_all(self._end)

    def take_back(self, att: Attachment, site: int, started: float) -> AsyncLeasedConnection | None:
        """A parked lease for this call, renewed (a new lease number, start and call site), or None.

        One that cannot be renewed ends now, the ordinary way that says why;
        the table waited on or paused, every one does, and so does the rest.
        """
        parked = self.leases
        while parked:
            lease = parked.pop()
            conn = self._renewed(lease, att, site, started)
            if conn is not None:
                return conn
            self._end(lease)
        return None

    def _renewed(self, lease: Lease, att: Attachment, site: int, started: float) -> AsyncLeasedConnection | None:
        entry = cast("SlotEntry | None", att.conns.get(lease.slot))
        cached = entry.conn if entry is not None else None
        if (
            lease.attachment is not att or cached is None or cached.generation != lease.generation
            or cached._transport is None or cached.state is not LeaseState.FREE or lease.db != att.db
        ):
            return None  # its connection is gone, or it is another attachment's or database's
        now = time.monotonic()
        try:
            # One call: the table idle, the row still our lease, renewed, its hold and wait counted.
            seq = att.table.core.renew(
                lease.slot, lease.generation, lease.seq, att.pid, att.start, site, lease.taken_at, started, now, True
            )
        except ValueError:
            return None  # the table was unmapped under us (the manager is gone)
        if not seq:
            return None  # someone waits, or it was revoked, repaired or expired
        cached.begin(Lease(att, lease.slot, lease.generation, seq, lease.lock_fd, now, lease.db, lease.taker), kept=True)
        return cached

    def give_back(self) -> None:
        """Now, to the table (an abort: clean, and in no one's hands, so not reported)."""
        self._end_all(self._give_back)

    def give_back_if_of(self, att: Attachment) -> None:
        """A detach: the leases parked from ``att`` go back before ``att`` does."""
        mine = [lease for lease in self.leases if lease.attachment is att]
        if mine:
            self.leases = [lease for lease in self.leases if lease.attachment is not att]
            for lease in mine:
                self._give_back(lease)

    def _end_all(self, end: Callable[[Lease], None]) -> None:
        # Taken out of the list first: an ending that re-enters the pool finds nothing parked.
        leases, self.leases = self.leases, []
        for lease in leases:
            end(lease)
