"""A clean lease nobody waits for, kept by its asyncio pool until the loop's next turn.

A task's next command comes in the same loop turn as its last reply (there
is no await between redis-py's release and its next get_connection). So a
lease given back clean while nobody waits, in this process or in the
table, is parked instead: the next command of that turn takes it back
(``take_back``) with no unlock, lock, selector change or fcntl, its row
renewed in place as in a hand-over. By the loop's next turn a parked lease
nobody took back ends as any other would (``end``: to a waiter of this
process if fair, else to the table). One callback, queued by the first
park after the last one ran, ends whatever is parked when it runs: the
steps that park in one turn pay for one callback between them. A waiter always gets the lease it
would have had, and a lease the manager asked back is never parked: it is
given back at once, the ordinary way that tells its holder.
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
    """At most one parked lease of one pool."""

    __slots__ = ("lease", "_end", "_give_back", "_turn_on")

    def __init__(self, end: Callable[[Lease], None], give_back: Callable[[Lease], None]) -> None:
        self.lease: Lease | None = None
        self._end = end  # hand over or give back: a parked lease nobody took back
        self._give_back = give_back  # to the table, clean
        # The loop our end-of-turn callback is queued on, until it runs: one
        # callback serves every lease parked before it runs (many tasks'
        # commands in one turn cost one callback, not one each).
        self._turn_on: asyncio.AbstractEventLoop | None = None

    def park(self, lease: Lease, loop: asyncio.AbstractEventLoop | None, current: Attachment | None) -> bool:
        """Keep ``lease`` until the loop's next turn; True if kept (else the caller gives it back)."""
        att = lease.attachment
        if self.lease is not None or loop is None or att is not current or att.detached or lease.taker is None:
            return False
        try:
            if not att.table.core.quiet(lease.slot, lease.generation, lease.seq):
                return False
        except ValueError:
            return False  # the table was unmapped under us (the manager is gone)
        if asyncio._get_running_loop() is not loop:
            return False  # released outside the loop (a finalizer, another thread): nothing would unpark it
        self.lease = lease
        if self._turn_on is not loop:
            # Queued on another loop (one this pool left) it may never run: queue one here.
            self._turn_on = loop
            loop.call_soon(self._next_turn)
        return True

    def _next_turn(self) -> None:
        """Queued in an earlier step than any lease it now finds parked: that lease's
        own step, where its holder's next command could take it back, is over."""
        self._turn_on = None
        lease, self.lease = self.lease, None
        if lease is not None:
            self._end(lease)

    def take_back(self, att: Attachment, site: int, started: float) -> AsyncLeasedConnection | None:
        """The parked lease for this call, renewed (a new lease number, start and call site), or None."""
        lease = self.lease
        assert lease is not None
        self.lease = None
        entry = cast("SlotEntry | None", att.conns.get(lease.slot))
        cached = entry.conn if entry is not None else None
        now = time.monotonic()
        seq = 0
        try:
            if (
                lease.attachment is att and cached is not None and cached.generation == lease.generation
                and cached._transport is not None and cached.state is LeaseState.FREE and lease.db == att.db
            ):
                # One call: the table idle, the row still our lease, renewed, its hold and wait counted.
                seq = att.table.core.renew(
                    lease.slot, lease.generation, lease.seq, att.pid, att.start, site, lease.taken_at, started, now, True
                )
        except ValueError:
            seq = 0  # the table was unmapped under us (the manager is gone)
        if not seq:
            # Someone waits, its connection is gone, or it was revoked, repaired
            # or expired: it ends the ordinary way, which says so.
            self._end(lease)
            return None
        assert cached is not None
        cached.begin(Lease(att, lease.slot, lease.generation, seq, lease.lock_fd, now, lease.db, lease.taker), kept=True)
        return cached

    def give_back(self) -> None:
        """Now, to the table (an abort: clean, and in no one's hands, so not reported)."""
        lease, self.lease = self.lease, None
        if lease is not None:
            self._give_back(lease)

    def give_back_if_of(self, att: Attachment) -> None:
        """A detach: a lease parked from ``att`` goes back before ``att`` does."""
        if self.lease is not None and self.lease.attachment is att:
            self.give_back()
