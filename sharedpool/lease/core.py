"""The lease core: taking and giving back leases in the table, sans I/O.

Everything here decides and acts without blocking on anything but a lock
held for microseconds: scanning rows for a READY slot and try-locking it,
the spin before queueing, the FIFO waiter queue and the hand-off of a freed
slot to its oldest waiter, finding rows abandoned by a dead holder, giving
a lease back, the pressure text of errors. What needs the manager or a wait
is returned to the caller to do in its own way, so that the sync pool
(blocking ``poll``, blocking channel) and an asyncio pool (``add_reader``
on the same wake socket, an async channel) share it:

* ``take_spinning`` -> a lease, or None: queue with ``lease_queue.QueueWait``,
  which says step by step what to do while waiting.
* ``give_back`` -> ``(report, drop)``: a report frame to send (or b""), and
  the slot's cached connection to disconnect (or None).

Each taker takes leases of one database, named by the ``db`` argument of
every function that takes or wakes: a row or a waiter of another database
is never this taker's (the manager writes a row's database; it may rebind
an idle slot to another one while it holds the slot's lock).

Header-lock waits are bounded by their callers' arguments: a holder frozen
inside its microseconds (SIGSTOP, swap) must not freeze a taker with it.
"""

from __future__ import annotations

import atexit
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sharedpool import errors, protocol
from sharedpool import table as tbl
from sharedpool.protocol import ReportCause
from sharedpool.table import Flag, Outcome, RowState

if TYPE_CHECKING:
    from sharedpool.lease.context import CachedConnection, LeaseContext

# (slot, generation, lease seq, acquired at): a lease just taken, its lock held and its row written.
Taken = tuple[int, int, int, float]
# What giving a lease back leaves to do: (a report frame or b"", a cached connection to disconnect or None).
GivenBack = tuple[bytes, "CachedConnection | None"]

# A waiter looks at the table this often even unwoken: a wake lost to a
# waker that died between picking us and sending costs at most this much.
RESCAN_S = 0.05
# Header flags as plain ints: IntFlag arithmetic is Python code, and the hot path reads them.
STOPPING = int(Flag.STOPPING)
# Yields before queueing when no slot is free. Measured with 8 Redis-bound
# workers on 2 connections (2 cores): 0 spins 0.41x plain throughput, 4
# 0.67x, 16 0.81x, 64 0.80x; the price is fairness (a spinning newcomer
# may take a slot before a queued waiter: p99 wait 10 -> 20 ms there).
SPINS = 16


class Taker:
    """One taker's own description of the table and its wake socket: a thread's, or a task's.

    Locks of one open file description do not exclude each other (DESIGN
    fact 11), so two takers never share one.
    """

    def __init__(self, attachment: LeaseContext) -> None:
        self.lock_fd = -1  # set before anything can raise: close() runs from __del__
        self.wake: socket.socket | None = None
        self.token = 0
        self.attachment = attachment
        self.pid = os.getpid()
        self.lock_fd = tbl.own_description(attachment.table.fd)
        attachment.takers.add(self)
        # Slots this taker holds: its own description does not exclude
        # itself, so these must never be taken for abandoned rows.
        self.held: set[int] = set()
        self.last_slot = -1
        # (slot, generation) the manager refused an fd for: not to be taken again.
        self.avoid: set[tuple[int, int]] = set()

    def wake_socket(self) -> socket.socket:
        """The datagram socket a waker sends to; bound at the first wait."""
        if self.wake is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            for _ in range(8):
                token = random.getrandbits(32) or 1
                try:
                    sock.bind(tbl.wake_address(self.attachment.epoch, self.pid, token))
                    break
                except OSError:
                    continue
            else:
                sock.close()
                raise errors.SharedPoolError("could not bind a wake socket for waiting")
            self.wake, self.token = sock, token
        return self.wake

    def close(self) -> None:
        # In a forked child these are the parent's descriptions too: closing
        # our copy never unlocks what the parent holds (DESIGN fact 12).
        if self.lock_fd >= 0:
            try:
                os.close(self.lock_fd)
            except OSError:
                pass
            self.lock_fd = -1
        if self.wake is not None:
            self.wake.close()
            self.wake = None

    def __del__(self) -> None:
        self.close()


@dataclass(eq=False, slots=True)
class Lease:
    """One lease: the slot lock a taker took, and the row it wrote."""

    attachment: LeaseContext
    slot: int
    generation: int
    seq: int  # the row's lease number
    lock_fd: int  # the taker's own open file description of the table
    taken_at: float
    db: int  # the database the row said when it was taken
    taker: Taker | None = None
    revoked: bool = False  # set by give_back: the manager had asked for it back

    @property
    def id(self) -> int:
        return (self.slot << 40) | (self.seq & 0xFFFFFFFFFF)


# ----- taking ------------------------------------------------------------------


def call_bounds(
    att: LeaseContext, started: float, manager_timeout: float, acquire_timeout: float, budget: float
) -> tuple[float, float]:
    """(final, deadline) of a call begun at ``started``: when it must be done in all, and when waiting
    for a lease must end. ``WorkerLimit`` when this process holds ``max_leases_per_worker`` already."""
    final = started + manager_timeout + acquire_timeout
    deadline = started + acquire_timeout
    if budget:
        # redis-py's retries re-enter after each failure: together they get
        # no more than one call's worth of time (the budget).
        final, deadline = min(final, budget), min(deadline, budget)
    limit = att.lease_limit
    if limit and att.held >= limit:
        raise errors.WorkerLimit(
            f"pid {att.pid} already holds {limit} leases of pool {att.pool_name!r} (max_leases_per_worker={limit})"
        )
    return final, deadline


def skip_stale(taker: Taker, lease: Lease, deadline: float, acquire_timeout: float) -> None:
    """The manager refused an fd for ``lease``'s row, READY for a generation it has not opened
    (scribbled): ``taker`` skips that row until the manager repairs it. ``PoolTimeout`` past ``deadline``."""
    taker.avoid.add((lease.slot, lease.generation))
    if time.monotonic() >= deadline:
        raise errors.PoolTimeout(
            f"no lease from pool {lease.attachment.pool_name!r} within {acquire_timeout:.2f} s ({pressure(lease.attachment)})"
        ) from None



def take_spinning(att: LeaseContext, taker: Taker, site: int, started: float, db: int) -> Taken | None:
    """Take a READY slot now, yielding the CPU up to ``SPINS`` times; None: queue.

    A free slot is taken even while others are queued (they are woken oldest
    first as slots come back): measured on 8 Redis-bound workers on 2
    connections, strict hand-off cost a context switch per lease for ~15%
    less throughput and a worse p99 wait, and acquire_timeout still bounds
    every wait.
    """
    taken = try_slots(att, taker, site, started, db)
    spins = SPINS
    while taken is None and spins:
        # Most holds are shorter than a sleep and a wake-up: give the CPU
        # away (to Redis, to the holder) and look again before queueing.
        spins -= 1
        os.sched_yield()
        taken = try_slots(att, taker, site, started, db)
    return taken


def try_slots(att: LeaseContext, taker: Taker, site: int, started: float, db: int) -> Taken | None:
    """One pass over the rows, taking the first READY slot of ``db`` whose lock is free.

    The slot this taker had last comes first (like HikariCP's thread-local
    list: no collision with other takers' favourites, warm caches), then
    slots whose fd we have (no frame, and the object redis-py parsed with
    last time), then the rest: one call of the table core (``table.core``).
    """
    taken: Taken | None = att.table.core.take(
        taker.lock_fd, taker.last_slot, att.conns, taker.avoid, db, att.pid, att.start, site, started
    )
    if taken is not None:
        taker.held.add(taken[0])
        taker.last_slot = taken[0]
    return taken


_WAKER: tuple[int, socket.socket] | None = None
_WAKER_LOCK = threading.Lock()


def _new_waker_lock_in_child() -> None:
    # A thread that held it at a fork is not in the child: the child's lock starts unlocked.
    global _WAKER_LOCK
    _WAKER_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_waker_lock_in_child)


def _process_waker() -> socket.socket:
    """One unbound datagram socket per process to send wakes from (any thread may)."""
    global _WAKER
    waker = _WAKER
    if waker is None or waker[0] != os.getpid():
        with _WAKER_LOCK:  # two threads' first wakes at once would make two, one left unclosed
            waker = _WAKER
            if waker is None or waker[0] != os.getpid():
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                waker = (os.getpid(), socket.socket(socket.AF_UNIX, kind))
                _WAKER = waker
    return waker[1]


@atexit.register
def _close_process_waker() -> None:
    # Kept for the process's life; closed at exit rather than left to the
    # interpreter's teardown, which warns of an unclosed socket.
    waker = _WAKER
    if waker is not None and waker[0] == os.getpid():
        waker[1].close()


def wake_one(att: LeaseContext, lock_fd: int, db: int) -> None:
    """Hand a freed slot's turn to the oldest waiter of its database (a non-blocking datagram)."""
    table = att.table
    for _ in range(4):
        if not tbl.lock_within(lock_fd, tbl.HEADER_LOCK, 0.05):
            return  # the waiters rescan every RESCAN_S anyway
        try:
            picked = table.pick_waiter(db)
        finally:
            tbl.unlock(lock_fd, tbl.HEADER_LOCK)
        if picked is None:
            return
        _index, pid, token = picked
        waker = _process_waker()
        try:
            waker.sendto(b"\1", tbl.wake_address(att.epoch, pid, token))
            return
        except BlockingIOError:
            return  # its queue is full: it is awake already
        except OSError:
            continue  # gone without dequeuing (killed): its rescan is moot, try the next


# ----- giving back -------------------------------------------------------------


# What most give-backs return: nothing to send, nothing to close.
NOTHING_TO_DO: GivenBack = (b"", None)


def give_back(lease: Lease, outcome: Outcome, used: bool = True) -> GivenBack:
    """Write how the lease ended and unlock; wake the oldest waiter of a clean slot.

    Returns ``(report, drop)``: the report the manager must get (a reset, a
    broken or expired connection) or b"", and this process's connection of
    the slot that must be disconnected now (expired or revoked, or its
    manager gone) or None: the caller does both. A lease the manager had
    asked back (max_lease_time) goes back BROKEN, and ``lease.revoked``
    says so; a holder that was paused between its read of the row and its
    write finds the request right after its write.
    """
    att = lease.attachment
    att.held -= 1
    slot = lease.slot
    try:
        written, waiting = att.table.core.give_back(
            lease.lock_fd, slot, lease.generation, lease.seq, outcome, lease.taken_at, used
        )
        if written >= 0 and (
            written == Outcome.REVOKED
            # A holder paused between the core's read and its write finds a request
            # written in between right after. Only a lease older than max_lease_time
            # can have been asked back: no extra read for the others.
            or (att.max_lease_time and time.monotonic() - lease.taken_at >= att.max_lease_time
                and att.table.revoke_asked(slot, lease.generation, lease.seq))
        ):
            lease.revoked = True
            written = Outcome.BROKEN
    except ValueError:
        # The table was unmapped under us (the manager is gone): only the lock is left to give back.
        written, waiting = -1, False
        try:
            tbl.unlock(lease.lock_fd, tbl.slot_lock(slot, lease.generation))
        except OSError:
            pass  # the taker's description is gone (thread ended): so is the lock
    finally:
        if lease.taker is not None:
            lease.taker.held.discard(slot)
    drop = None
    if written > 0 and written != outcome:
        # Expired (max_lifetime, reconnect) or revoked: the manager replaces it.
        outcome = Outcome.BROKEN
        drop = att.conns.pop(slot, None)
    if att.detached:
        return b"", drop if drop is not None else att.conns.pop(slot, None)
    if written > 0:
        return protocol.encode_report(slot, lease.generation, lease.seq, outcome, ReportCause.GIVEN_BACK), drop
    if waiting:
        wake_one(att, lease.lock_fd, lease.db)
    return NOTHING_TO_DO


def mark_subscriber(lease: Lease) -> None:
    """The lease entered subscribed mode: the manager is to count it as a subscriber,
    not warn about it as a leak nor revoke it at max_lease_time. Its holder has the
    slot's lock; giving the lease back clears the mark."""
    try:
        lease.attachment.table.mark_subscriber(lease.slot, lease.generation, lease.seq)
    except ValueError:
        pass  # the table was unmapped under us (the manager is gone)


def pressure(att: LeaseContext, waiting_self: bool = False) -> str:
    """How busy the pool is, for an error message: leased, waiting, and why slots are missing."""
    table = att.table
    states = [table.state_of(slot) for slot in range(table.slots_in_use)]
    held = states.count(RowState.HELD)
    opening = sum(states.count(state) for state in (RowState.CLOSED, RowState.MANAGER, RowState.BROKEN, RowState.RESET))
    others = max(0, table.waiters - (1 if waiting_self else 0))
    words = f"{held} of {len(states)} connections leased, {others} waiting"
    if table.flags & Flag.REDIS_DOWN:
        words += f"; Redis at {att.welcome.get('redis')} is not answering the manager"
    elif table.flags & Flag.PAUSED:
        words += "; the pool is paused"
    elif opening and held < len(states):
        words += f"; {opening} connections not open yet (being opened or replaced)"
    return words
