"""The lease table's bytes and the pure moves of its rows.

Every offset, struct and state here is read by the manager and written by
every worker: changing one is a new ``LAYOUT_VERSION``.
"""

from __future__ import annotations

import enum
import math
import mmap
import struct
from dataclasses import dataclass, replace

MAGIC = 0x53504C54  # "SPLT"
# 2: rows and waiter entries carry a database (and rows a flags byte).
LAYOUT_VERSION = 2

# ----- header --------------------------------------------------------------
# magic, layout, flags, capacity, slots_in_use, waiter_capacity, max_waiting,
# manager_pid, waiters (count), waiter_hwm, next_ticket, epoch (16 bytes)
HEADER = struct.Struct("=IHHIIIIiiiQ16s")
HEADER_SIZE = 256
FLAGS_AT = 6
SLOTS_IN_USE_AT = 12
MAX_WAITING_AT = 20
WAITERS_AT = 28
HWM_AT = 32
TICKET_AT = 36
# Connect attempts that failed, written by the manager: a waiter that asked
# for a connection sees it move and stops waiting for a Redis that is down.
FAILED_CONNECTS_AT = 64
# Since when (CLOCK_MONOTONIC) Redis has been unreachable, and its last error:
# what a worker's RedisUnavailable says, with no round trip to ask.
DOWN_SINCE_AT = 72
LAST_ERROR_AT = 80
LAST_ERROR_SIZE = HEADER_SIZE - LAST_ERROR_AT
FLAGS = struct.Struct("=H")
HOT_HEADER = struct.Struct("=H20xi")  # flags and waiters in one read
I32 = struct.Struct("=i")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")


class Flag(enum.IntFlag):
    PAUSED = 1  # takers wait; the manager wakes them on resume
    STOPPING = 2  # takers get ShuttingDown
    REDIS_DOWN = 4  # no connection could be opened lately


# ----- rows ----------------------------------------------------------------
ROWS_AT = HEADER_SIZE
HISTOGRAM_BUCKETS = 24
# Bucket i counts durations below 10 µs * 2**i; the last one takes the rest.
BUCKET_BOUNDS_S: tuple[float, ...] = tuple(10e-6 * 2.0**i for i in range(HISTOGRAM_BUCKETS - 1)) + (math.inf,)

# state, database, row flags, generation, holder pid, call site, lease seq,
# holder start, acquired at, revoked generation, revoked seq, expires at.
# The database and the flags use what was the state's padding: a layout-1
# reader that ignores them sees the rows it always saw.
ROW = struct.Struct("=BHBIiIQddIxxxxQd")
HIST = struct.Struct(f"={HISTOGRAM_BUCKETS}Q")
# The first fields of a row, as the hot path reads and writes them. Reads
# take the revoke request too (revoked generation and lease number, bytes
# 40..55): the manager writes those while a holder has the lock, and no
# holder ever writes them.
TAKE_READ = struct.Struct("=BHxIiIQ16xI4xQ")
# Taking and giving back rewrite the database as read and clear the flags:
# a lease that ends is no longer a subscriber.
TAKE_WRITE = struct.Struct("=BHBIiIQdd")
GIVE_READ = struct.Struct("=BHxIiIQ16xI4xQd")
REVOKE_AT = 40
REVOKE = struct.Struct("=I4xQ")  # revoked generation, revoked lease number
DB_AT = 1
FLAGS_OF_ROW_AT = 3
U16 = struct.Struct("=H")
MAX_DB = 0xFFFF
EXPIRES_AT = 56
F64 = struct.Struct("=d")
WAIT_HIST_AT = 64
HOLD_HIST_AT = WAIT_HIST_AT + HIST.size
ROW_SIZE = 512
assert HOLD_HIST_AT + HIST.size <= ROW_SIZE and ROW.size <= WAIT_HIST_AT


class RowFlag(enum.IntFlag):
    SUBSCRIBER = 1  # the lease is in subscribed mode: long-lived by nature, not a leak
    BLOCKING = 2  # pinned for blocking polls (kombu's BRPOP) for its holder's life: long-lived, not a leak


class RowState(enum.IntEnum):
    CLOSED = 0
    READY = 1
    HELD = 2
    RESET = 3  # given back needing RESET (DESIGN fact 3)
    BROKEN = 4  # given back broken, or found abandoned (DESIGN fact 2)
    MANAGER = 5  # the manager is opening, resetting or checking it


ROW_STATES = {s.value: s for s in RowState}


@dataclass(frozen=True, slots=True)
class Row:
    state: RowState
    generation: int
    holder_pid: int = 0
    call_site: int = 0
    lease_seq: int = 0  # leases ever taken on this slot; the current one's number while HELD
    holder_start: float = 0.0  # the holder's process create_time (pid reuse)
    acquired_at: float = 0.0  # CLOCK_MONOTONIC, the same clock in every process of a host
    revoked_generation: int = 0
    revoked_seq: int = 0
    # Set by the manager: past it (CLOCK_MONOTONIC), the holder gives the
    # connection back for replacement instead of READY (max_lifetime,
    # reconnect, reload). 0: never.
    expires_at: float = 0.0
    db: int = 0  # the database the connection is SELECTed to (written by the manager)
    flags: int = 0  # RowFlag, written by the holder while HELD


class RowError(ValueError):
    """A move the row's state does not allow (or bytes that are no row at all)."""


# ----- the pure moves ------------------------------------------------------

def take(row: Row, pid: int, start: float, now: float, call_site: int, db: int = 0) -> Row:
    """A worker of database ``db`` that holds the slot's lock takes the lease."""
    if row.state is not RowState.READY:
        raise RowError(f"take from {row.state.name}")
    if row.db != db:
        raise RowError(f"take for db {db} from a row of db {row.db}")
    return replace(
        row, state=RowState.HELD, holder_pid=pid, holder_start=start, acquired_at=now,
        call_site=call_site, lease_seq=(row.lease_seq + 1) & 0xFFFFFFFFFFFFFFFF or 1, flags=0,
    )


class Outcome(enum.IntEnum):
    """How a lease ended, as its holder saw it."""

    CLEAN = 0
    NEEDS_RESET = 1
    BROKEN = 2
    # Never a holder's choice: what ``give_back_in_place`` answers when the
    # manager asked for the lease back. The row is written BROKEN, and the
    # report to the manager says BROKEN.
    REVOKED = 3


STATE_AFTER = {
    Outcome.CLEAN: RowState.READY, Outcome.NEEDS_RESET: RowState.RESET, Outcome.BROKEN: RowState.BROKEN,
    Outcome.REVOKED: RowState.BROKEN,
}


RETIRE_NOW = 1e-9  # an expiry every clock is past


def give_back(row: Row, outcome: Outcome, now: float = 0.0) -> Row:
    """Give a lease back; an expired connection goes back BROKEN, to be replaced."""
    if row.state is not RowState.HELD:
        raise RowError(f"give back from {row.state.name}")
    if outcome is Outcome.CLEAN and row.expires_at and now >= row.expires_at:
        outcome = Outcome.BROKEN
    return replace(
        row, state=STATE_AFTER[outcome], holder_pid=0, holder_start=0.0, acquired_at=0.0, call_site=0, flags=0
    )


def found_abandoned(row: Row) -> Row:
    """HELD but its lock is free: the holder vanished mid-lease."""
    if row.state is not RowState.HELD:
        raise RowError(f"abandoned from {row.state.name}")
    return replace(row, state=RowState.BROKEN)


def still_mine(row: Row, generation: int, lease_seq: int) -> bool:
    """Whether a holder's lease is still the row's: not revoked, not repaired."""
    return row.state is RowState.HELD and row.generation == generation and row.lease_seq == lease_seq


def was_revoked(row: Row, generation: int, lease_seq: int) -> bool:
    """Whether the manager asked for lease ``lease_seq`` of ``generation`` back (max_lease_time, reaping)."""
    return row.revoked_generation == generation and row.revoked_seq == lease_seq and lease_seq != 0


def bucket(seconds: float) -> int:
    """The histogram bucket of a duration: below 10 µs * 2**i lands in bucket i."""
    if seconds < BUCKET_BOUNDS_S[0]:
        return 0
    return min(HISTOGRAM_BUCKETS - 1, int(seconds * 1e5).bit_length())


def percentile(histogram: list[int], q: float) -> float:
    """The upper bound (seconds) of the bucket holding the q-quantile; 0 with no samples."""
    total = sum(histogram)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            bound = BUCKET_BOUNDS_S[index]
            return bound if bound != math.inf else BUCKET_BOUNDS_S[-2] * 2
    return BUCKET_BOUNDS_S[-2] * 2


# ----- waiters ---------------------------------------------------------------
# state, database, pad, pid, token, ticket, enqueued at
WAITER = struct.Struct("=BHxiIxxxxQd")
WAITER_SIZE = 32
assert WAITER.size <= WAITER_SIZE


class WaiterState(enum.IntEnum):
    FREE = 0
    WAITING = 1
    WOKEN = 2  # a slot was handed towards it; it has not looked yet


def table_size(capacity: int, waiter_capacity: int) -> int:
    size = ROWS_AT + capacity * ROW_SIZE + waiter_capacity * WAITER_SIZE
    return (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE

