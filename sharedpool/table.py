"""The lease table: a memfd shared by the manager and every worker (DESIGN, "The lease table").

Taking a lease is locking one byte of this file with an open-file-description
lock and writing the slot's row; giving it back is writing the row and
unlocking. No frame, no manager wake-up. The manager reads the rows to do
everything else (repair, trimming, leak warnings, stats), and treats them as
untrusted: any worker can write any byte here.

Layout (native byte order; every process of a host shares the CPU)::

    0            header (HEADER_SIZE bytes)
    ROWS_AT      capacity rows of ROW_SIZE bytes, one per slot
    waiters_at   waiter_capacity entries of WAITER_SIZE bytes

Locks live far beyond the end of the file (a lock needs no bytes to exist):

* ``ALIVE_LOCK``: held by the manager for its whole life. A worker that can
  take a read lock there knows the manager died.
* ``HEADER_LOCK``: guards the waiter queue, for a few microseconds at a time.
* ``slot_lock(slot, generation)``: the lease itself. The generation is part
  of the offset so that a lock kept alive by an orphaned child (DESIGN fact
  12) never blocks the slot's next connection.

Row states and who moves them (``take``, ``give_back`` and ``found_abandoned``
are the workers' moves; the rest are the manager's)::

    CLOSED --manager opens--> READY --take--> HELD --give_back--> READY | RESET | BROKEN
    HELD, lock free (holder vanished) --found_abandoned--> BROKEN
    RESET, BROKEN --manager repairs--> MANAGER --> READY | CLOSED (new generation)
"""

from __future__ import annotations

import enum
import fcntl
import math
import mmap
import os
import struct
import time
from dataclasses import dataclass, replace

MAGIC = 0x53504C54  # "SPLT"
LAYOUT_VERSION = 1

# ----- header --------------------------------------------------------------
# magic, layout, flags, capacity, slots_in_use, waiter_capacity, max_waiting,
# manager_pid, waiters (count), waiter_hwm, next_ticket, epoch (16 bytes)
_HEADER = struct.Struct("=IHHIIIIiiiQ16s")
HEADER_SIZE = 256
_FLAGS_AT = 6
_SLOTS_IN_USE_AT = 12
_MAX_WAITING_AT = 20
_WAITERS_AT = 28
_HWM_AT = 32
_TICKET_AT = 36
# Connect attempts that failed, written by the manager: a waiter that asked
# for a connection sees it move and stops waiting for a Redis that is down.
_FAILED_CONNECTS_AT = 64
# Since when (CLOCK_MONOTONIC) Redis has been unreachable, and its last error:
# what a worker's RedisUnavailable says, with no round trip to ask.
_DOWN_SINCE_AT = 72
_LAST_ERROR_AT = 80
_LAST_ERROR_SIZE = HEADER_SIZE - _LAST_ERROR_AT
_FLAGS = struct.Struct("=H")
_HOT_HEADER = struct.Struct("=H20xi")  # flags and waiters in one read
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


class Flag(enum.IntFlag):
    PAUSED = 1  # takers wait; the manager wakes them on resume
    STOPPING = 2  # takers get ShuttingDown
    REDIS_DOWN = 4  # no connection could be opened lately


# ----- rows ----------------------------------------------------------------
ROWS_AT = HEADER_SIZE
HISTOGRAM_BUCKETS = 24
# Bucket i counts durations below 10 µs * 2**i; the last one takes the rest.
BUCKET_BOUNDS_S: tuple[float, ...] = tuple(10e-6 * 2.0**i for i in range(HISTOGRAM_BUCKETS - 1)) + (math.inf,)

# state, pad, generation, holder pid, call site, lease seq, holder start,
# acquired at, revoked generation, revoked seq, expires at
_ROW = struct.Struct("=BxxxIiIQddIxxxxQd")
_HIST = struct.Struct(f"={HISTOGRAM_BUCKETS}Q")
# The first fields of a row, as the hot path reads and writes them.
_TAKE_READ = struct.Struct("=BxxxIiIQ")
_TAKE_WRITE = struct.Struct("=BxxxIiIQdd")
_GIVE_READ = struct.Struct("=BxxxIiIQ32xd")
_EXPIRES_AT = 56
_F64 = struct.Struct("=d")
_WAIT_HIST_AT = 64
_HOLD_HIST_AT = _WAIT_HIST_AT + _HIST.size
ROW_SIZE = 512
assert _HOLD_HIST_AT + _HIST.size <= ROW_SIZE and _ROW.size <= _WAIT_HIST_AT


class RowState(enum.IntEnum):
    CLOSED = 0
    READY = 1
    HELD = 2
    RESET = 3  # given back needing RESET (DESIGN fact 3)
    BROKEN = 4  # given back broken, or found abandoned (DESIGN fact 2)
    MANAGER = 5  # the manager is opening, resetting or checking it


_ROW_STATES = {s.value: s for s in RowState}


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


class RowError(ValueError):
    """A move the row's state does not allow (or bytes that are no row at all)."""


# ----- the pure moves ------------------------------------------------------

def take(row: Row, pid: int, start: float, now: float, call_site: int) -> Row:
    """A worker that holds the slot's lock takes the lease."""
    if row.state is not RowState.READY:
        raise RowError(f"take from {row.state.name}")
    return replace(
        row, state=RowState.HELD, holder_pid=pid, holder_start=start, acquired_at=now,
        call_site=call_site, lease_seq=(row.lease_seq + 1) & 0xFFFFFFFFFFFFFFFF or 1,
    )


class Outcome(enum.IntEnum):
    """How a lease ended, as its holder saw it."""

    CLEAN = 0
    NEEDS_RESET = 1
    BROKEN = 2


_AFTER = {Outcome.CLEAN: RowState.READY, Outcome.NEEDS_RESET: RowState.RESET, Outcome.BROKEN: RowState.BROKEN}


RETIRE_NOW = 1e-9  # an expiry every clock is past


def give_back(row: Row, outcome: Outcome, now: float = 0.0) -> Row:
    """Give a lease back; an expired connection goes back BROKEN, to be replaced."""
    if row.state is not RowState.HELD:
        raise RowError(f"give back from {row.state.name}")
    if outcome is Outcome.CLEAN and row.expires_at and now >= row.expires_at:
        outcome = Outcome.BROKEN
    return replace(row, state=_AFTER[outcome], holder_pid=0, holder_start=0.0, acquired_at=0.0, call_site=0)


def found_abandoned(row: Row) -> Row:
    """HELD but its lock is free: the holder vanished mid-lease."""
    if row.state is not RowState.HELD:
        raise RowError(f"abandoned from {row.state.name}")
    return replace(row, state=RowState.BROKEN)


def still_mine(row: Row, generation: int, lease_seq: int) -> bool:
    """Whether a holder's lease is still the row's: not revoked, not repaired."""
    return row.state is RowState.HELD and row.generation == generation and row.lease_seq == lease_seq


def was_revoked(row: Row, generation: int, lease_seq: int) -> bool:
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
# state, pad, pid, token, ticket, enqueued at
_WAITER = struct.Struct("=BxxxiIxxxxQd")
WAITER_SIZE = 32
assert _WAITER.size <= WAITER_SIZE


class WaiterState(enum.IntEnum):
    FREE = 0
    WAITING = 1
    WOKEN = 2  # a slot was handed towards it; it has not looked yet


# ----- locks -------------------------------------------------------------------
_LOCK_BASE = 1 << 40
ALIVE_LOCK = _LOCK_BASE
HEADER_LOCK = _LOCK_BASE + 1
_GENERATIONS_PER_SLOT = 1 << 24
_SLOT_LOCKS_AT = _LOCK_BASE + (1 << 32)
_FLOCK = struct.Struct("hhqqi4x")  # native alignment: struct flock as the kernel lays it out
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)


def slot_lock(slot: int, generation: int) -> int:
    return _SLOT_LOCKS_AT + slot * _GENERATIONS_PER_SLOT + generation % _GENERATIONS_PER_SLOT


def try_lock(fd: int, offset: int) -> bool:
    """Take a write lock on one byte without waiting; False if another description has it."""
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, offset, 1, 0))
        return True
    except BlockingIOError:
        return False
    except PermissionError:  # EACCES: the same "held elsewhere" on some kernels
        return False


def lock_wait(fd: int, offset: int) -> None:
    """Take a write lock, waiting as long as it takes (tests and tools only)."""
    fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, 0, offset, 1, 0))


def lock_within(fd: int, offset: int, seconds: float) -> bool:
    """Take a lock held only for microseconds by others, trying for at most ``seconds``.

    Never a blocking F_OFD_SETLKW: a holder frozen inside its few
    microseconds (SIGSTOP, swap) must not freeze us with it.
    """
    if try_lock(fd, offset):
        return True
    # Its holder is most likely running right now on the other core, or was
    # preempted: let it finish before sleeping on it.
    for _ in range(4):
        os.sched_yield()
        if try_lock(fd, offset):
            return True
    deadline = time.monotonic() + seconds
    pause = 20e-6
    while time.monotonic() < deadline:
        time.sleep(pause)
        if try_lock(fd, offset):
            return True
        pause = min(pause * 2, 0.002)
    return False


def unlock(fd: int, offset: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, 0, offset, 1, 0))


def is_locked(fd: int, offset: int, exclusive: bool = True) -> bool:
    """Whether another open file description holds a lock there (never our own)."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    reply = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(kind, 0, offset, 1, 0))
    return bool(_FLOCK.unpack(reply)[0] != fcntl.F_UNLCK)


def own_description(memfd: int) -> int:
    """A new open file description of the table (DESIGN fact 11: one per thread)."""
    return os.open(f"/proc/self/fd/{memfd}", os.O_RDWR | os.O_CLOEXEC)


# ----- the mapped file -----------------------------------------------------------

def table_size(capacity: int, waiter_capacity: int) -> int:
    size = ROWS_AT + capacity * ROW_SIZE + waiter_capacity * WAITER_SIZE
    return (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


class Table:
    """A mapping of the lease table. Reads never raise on garbage except ``row``
    (``RowError``); callers that must survive scribbling catch it."""

    def __init__(self, memfd: int, capacity: int, waiter_capacity: int) -> None:
        self.fd = memfd
        self.capacity = capacity
        self.waiter_capacity = waiter_capacity
        self.waiters_at = ROWS_AT + capacity * ROW_SIZE
        self.size = table_size(capacity, waiter_capacity)
        if os.fstat(memfd).st_size < self.size:
            raise RowError(f"lease table of {os.fstat(memfd).st_size} bytes, expected {self.size}")
        self.map = mmap.mmap(memfd, self.size)

    @classmethod
    def create(cls, capacity: int, waiter_capacity: int, max_waiting: int, epoch: bytes) -> Table:
        memfd = os.memfd_create("sharedpool-leases", os.MFD_CLOEXEC)
        os.ftruncate(memfd, table_size(capacity, waiter_capacity))
        table = cls(memfd, capacity, waiter_capacity)
        table.map[0:_HEADER.size] = _HEADER.pack(
            MAGIC, LAYOUT_VERSION, 0, capacity, 0, waiter_capacity, max_waiting, os.getpid(), 0, 0, 1, epoch[:16]
        )
        for slot in range(capacity):
            table.write_row(slot, Row(RowState.CLOSED, 0))
        return table

    def close(self) -> None:
        try:
            self.map.close()
        except (BufferError, ValueError):
            pass  # a view still exported: the mapping goes with the object
        try:
            os.close(self.fd)
        except OSError:
            pass

    # header
    @property
    def flags(self) -> Flag:
        return Flag(_FLAGS.unpack_from(self.map, _FLAGS_AT)[0] & 7)

    def set_flags(self, flags: Flag) -> None:
        _FLAGS.pack_into(self.map, _FLAGS_AT, int(flags))

    @property
    def slots_in_use(self) -> int:
        return min(self.capacity, int(_U32.unpack_from(self.map, _SLOTS_IN_USE_AT)[0]))

    def set_slots_in_use(self, count: int) -> None:
        _U32.pack_into(self.map, _SLOTS_IN_USE_AT, min(count, self.capacity))

    @property
    def max_waiting(self) -> int:
        return min(self.waiter_capacity, int(_U32.unpack_from(self.map, _MAX_WAITING_AT)[0]))

    def set_max_waiting(self, count: int) -> None:
        _U32.pack_into(self.map, _MAX_WAITING_AT, min(count, self.waiter_capacity))

    @property
    def failed_connects(self) -> int:
        return int(_U32.unpack_from(self.map, _FAILED_CONNECTS_AT)[0])

    def set_failed_connects(self, count: int) -> None:
        _U32.pack_into(self.map, _FAILED_CONNECTS_AT, count & 0xFFFFFFFF)

    def outage(self) -> tuple[float, str]:
        """(down since, last error) as the manager last wrote them."""
        (since,) = _F64.unpack_from(self.map, _DOWN_SINCE_AT)
        raw = bytes(self.map[_LAST_ERROR_AT : _LAST_ERROR_AT + _LAST_ERROR_SIZE]).split(b"\0", 1)[0]
        return float(since), raw.decode("utf-8", "replace")

    def set_outage(self, since: float, error: str) -> None:
        _F64.pack_into(self.map, _DOWN_SINCE_AT, since)
        data = error.encode("utf-8")[: _LAST_ERROR_SIZE - 1]
        self.map[_LAST_ERROR_AT : _LAST_ERROR_AT + _LAST_ERROR_SIZE] = data.ljust(_LAST_ERROR_SIZE, b"\0")

    @property
    def waiters(self) -> int:
        return int(_I32.unpack_from(self.map, _WAITERS_AT)[0])

    def _set_waiters(self, count: int) -> None:
        _I32.pack_into(self.map, _WAITERS_AT, count)

    def hot(self) -> tuple[int, int]:
        """(flags, waiters) in one read: what a taker looks at before anything else."""
        return _HOT_HEADER.unpack_from(self.map, _FLAGS_AT)  # type: ignore[return-value]

    # rows
    def _row_at(self, slot: int) -> int:
        if not 0 <= slot < self.capacity:
            raise RowError(f"slot {slot} outside the table's {self.capacity} rows")
        return ROWS_AT + slot * ROW_SIZE

    def state_of(self, slot: int) -> int:
        """The raw state byte: the one read the hot path makes before locking."""
        return self.map[ROWS_AT + slot * ROW_SIZE]

    def generation_of(self, slot: int) -> int:
        return int(_U32.unpack_from(self.map, ROWS_AT + slot * ROW_SIZE + 4)[0])

    def row(self, slot: int) -> Row:
        values = _ROW.unpack_from(self.map, self._row_at(slot))
        state = _ROW_STATES.get(values[0])
        if state is None:
            raise RowError(f"slot {slot}: state byte {values[0]} is no state")
        return Row(state, *values[1:])

    def write_row(self, slot: int, row: Row) -> None:
        _ROW.pack_into(
            self.map, self._row_at(slot), row.state, row.generation, row.holder_pid, row.call_site,
            row.lease_seq, row.holder_start, row.acquired_at, row.revoked_generation, row.revoked_seq,
            row.expires_at,
        )

    # The hot path's moves: ``take`` and ``give_back`` above, done in place
    # (tests hold the two to the same results).
    def take_in_place(self, slot: int, generation: int, pid: int, start: float, now: float, call_site: int) -> int:
        """``take`` on a READY row of ``generation`` we hold the lock of; its lease number, or 0."""
        at = ROWS_AT + slot * ROW_SIZE
        state, row_generation, _pid, _site, seq = _TAKE_READ.unpack_from(self.map, at)
        if state != RowState.READY or row_generation != generation:
            return 0
        seq = (seq + 1) & 0xFFFFFFFFFFFFFFFF or 1  # a scribbled maximum wraps, never raises
        _TAKE_WRITE.pack_into(self.map, at, RowState.HELD, row_generation, pid, call_site, seq, start, now)
        return int(seq)

    def give_back_in_place(self, slot: int, generation: int, seq: int, outcome: Outcome, now: float) -> Outcome | None:
        """``give_back`` if the row is still our lease: the outcome written (an expired
        connection goes back BROKEN); None if it was revoked or repaired."""
        at = ROWS_AT + slot * ROW_SIZE
        state, row_generation, _pid, _site, row_seq, expires_at = _GIVE_READ.unpack_from(self.map, at)
        if state != RowState.HELD or row_generation != generation or row_seq != seq:
            return None
        if outcome is Outcome.CLEAN and expires_at and now >= expires_at:
            outcome = Outcome.BROKEN
        _TAKE_WRITE.pack_into(self.map, at, _AFTER[outcome], row_generation, 0, 0, seq, 0.0, 0.0)
        return outcome

    def set_expiry(self, slot: int, expires_at: float) -> None:
        """The manager's: when the connection in this row is to be replaced."""
        _F64.pack_into(self.map, self._row_at(slot) + _EXPIRES_AT, expires_at)

    def count(self, slot: int, histogram_at: int, seconds: float) -> None:
        """Add one sample to a row's histogram. Only by the slot's lock holder: no lost counts."""
        index = int(seconds * 1e5).bit_length() if seconds >= 10e-6 else 0
        at = ROWS_AT + slot * ROW_SIZE + histogram_at + 8 * (index if index < HISTOGRAM_BUCKETS else HISTOGRAM_BUCKETS - 1)
        (count,) = _U64.unpack_from(self.map, at)
        _U64.pack_into(self.map, at, (count + 1) & 0xFFFFFFFFFFFFFFFF)

    def count_wait(self, slot: int, seconds: float) -> None:
        self.count(slot, _WAIT_HIST_AT, seconds)

    def count_hold(self, slot: int, seconds: float) -> None:
        self.count(slot, _HOLD_HIST_AT, seconds)

    def histograms(self, slots: int) -> tuple[list[int], list[int]]:
        waits = [0] * HISTOGRAM_BUCKETS
        holds = [0] * HISTOGRAM_BUCKETS
        for slot in range(min(slots, self.capacity)):
            at = ROWS_AT + slot * ROW_SIZE
            for index, value in enumerate(_HIST.unpack_from(self.map, at + _WAIT_HIST_AT)):
                waits[index] += value
            for index, value in enumerate(_HIST.unpack_from(self.map, at + _HOLD_HIST_AT)):
                holds[index] += value
        return waits, holds

    # waiters (callers hold HEADER_LOCK)
    def _waiter_at(self, index: int) -> int:
        return self.waiters_at + index * WAITER_SIZE

    def waiter(self, index: int) -> tuple[int, int, int, int, float]:
        """(state, pid, token, ticket, enqueued_at) of one entry, raw."""
        return _WAITER.unpack_from(self.map, self._waiter_at(index))  # type: ignore[return-value]

    def hwm(self) -> int:
        return max(0, min(self.waiter_capacity, int(_I32.unpack_from(self.map, _HWM_AT)[0])))

    def enqueue(self, pid: int, token: int, now: float) -> int:
        """Add a waiter; return its index, or -1 when max_waiting are queued."""
        if self.waiters >= self.max_waiting:
            return -1
        ticket = _U64.unpack_from(self.map, _TICKET_AT)[0]
        _U64.pack_into(self.map, _TICKET_AT, ticket + 1)
        hwm = self.hwm()
        for index in range(self.waiter_capacity):
            if self.map[self._waiter_at(index)] == WaiterState.FREE:
                _WAITER.pack_into(self.map, self._waiter_at(index), WaiterState.WAITING, pid, token, ticket, now)
                if index >= hwm:
                    _I32.pack_into(self.map, _HWM_AT, index + 1)
                self._set_waiters(max(0, self.waiters) + 1)
                return index
        return -1

    def dequeue(self, index: int, pid: int, token: int) -> bool:
        """Remove our entry; True if it had been woken (the wake is then ours to pass on)."""
        if not 0 <= index < self.waiter_capacity:
            return False
        state, entry_pid, entry_token, _ticket, _at = self.waiter(index)
        if entry_pid != pid or entry_token != token or state == WaiterState.FREE:
            return False
        self.map[self._waiter_at(index)] = WaiterState.FREE
        self._shrink_hwm()
        self._set_waiters(max(0, self.waiters - 1))
        return state == WaiterState.WOKEN

    def requeue(self, index: int, pid: int, token: int) -> None:
        """A woken waiter that found nothing free waits again, keeping its ticket."""
        if 0 <= index < self.waiter_capacity:
            state, entry_pid, entry_token, _ticket, _at = self.waiter(index)
            if entry_pid == pid and entry_token == token and state == WaiterState.WOKEN:
                self.map[self._waiter_at(index)] = WaiterState.WAITING

    def pick_waiter(self) -> tuple[int, int, int] | None:
        """Mark the oldest waiting entry woken; return (index, pid, token)."""
        best: tuple[int, int, int, int] | None = None
        for index in range(self.hwm()):
            state, pid, token, ticket, _at = self.waiter(index)
            if state == WaiterState.WAITING and (best is None or ticket < best[0]):
                best = (ticket, index, pid, token)
        if best is None:
            return None
        self.map[self._waiter_at(best[1])] = WaiterState.WOKEN
        return best[1], best[2], best[3]

    def drop_waiters_of(self, dead: set[int]) -> int:
        """Remove every entry of these pids (the manager's sweep); return how many."""
        dropped = 0
        for index in range(self.hwm()):
            state, pid, _token, _ticket, _at = self.waiter(index)
            if state != WaiterState.FREE and pid in dead:
                self.map[self._waiter_at(index)] = WaiterState.FREE
                dropped += 1
        if dropped:
            self._shrink_hwm()
            self._set_waiters(self._live_waiters())
        return dropped

    def waiter_pids(self) -> list[int]:
        return [pid for state, pid, *_ in (self.waiter(i) for i in range(self.hwm())) if state != WaiterState.FREE]

    def repair_waiters(self) -> None:
        """Make the count and the high-water mark agree with the entries (after scribbling)."""
        for index in range(self.waiter_capacity):
            if self.map[self._waiter_at(index)] not in (WaiterState.FREE, WaiterState.WAITING, WaiterState.WOKEN):
                self.map[self._waiter_at(index)] = WaiterState.FREE
        _I32.pack_into(self.map, _HWM_AT, self.waiter_capacity)
        self._shrink_hwm()
        self._set_waiters(self._live_waiters())

    def _live_waiters(self) -> int:
        return sum(1 for index in range(self.hwm()) if self.map[self._waiter_at(index)] != WaiterState.FREE)

    def _shrink_hwm(self) -> None:
        hwm = self.hwm()
        while hwm and self.map[self._waiter_at(hwm - 1)] == WaiterState.FREE:
            hwm -= 1
        _I32.pack_into(self.map, _HWM_AT, hwm)


def wake_address(epoch: str, pid: int, token: int) -> bytes:
    """The abstract-namespace datagram address a waiting thread listens on."""
    return f"\0sharedpool-{epoch}-{pid}-{token}".encode()
