"""``Table``: one process's mapping of the lease table, and the row and queue moves on it.

Reads never raise on garbage except ``row``; the hot path's moves
(``take_in_place``, ``give_back_in_place``) write only a row's first fields.
Every write is one copy of the finished bytes (``Table._put``): a reader
without the lock never sees a byte pass through 0 on its way.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
from typing import Any

from sharedpool.table.core import new_core
from sharedpool.table.layout import (
    DB_AT,
    DOWN_SINCE_AT,
    EXPIRES_AT,
    F64,
    FAILED_CONNECTS_AT,
    FLAGS,
    FLAGS_AT,
    FLAGS_OF_ROW_AT,
    GIVE_READ,
    HEADER,
    HIST,
    HISTOGRAM_BUCKETS,
    HOLD_HIST_AT,
    HOT_HEADER,
    HWM_AT,
    I32,
    LAST_ERROR_AT,
    LAST_ERROR_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    MAX_WAITING_AT,
    REVOKE,
    REVOKE_AT,
    ROW,
    ROW_SIZE,
    ROW_STATES,
    ROWS_AT,
    SLOTS_IN_USE_AT,
    STATE_AFTER,
    TAKE_READ,
    TAKE_WRITE,
    TICKET_AT,
    U16,
    U32,
    U64,
    WAIT_HIST_AT,
    WAITER,
    WAITER_SIZE,
    WAITERS_AT,
    Flag,
    Outcome,
    Row,
    RowError,
    RowFlag,
    RowState,
    WaiterState,
    table_size,
)

TAKE_SIZE = TAKE_WRITE.size


class Table:
    """A mapping of the lease table. Reads never raise on garbage except ``row``
    (``RowError``); callers that must survive scribbling catch it."""

    def __init__(self, memfd: int, capacity: int, waiter_capacity: int) -> None:
        """Map the table in ``memfd``, which this object owns from now on: it is
        closed once, by ``close()`` or when the object is collected. Nobody else
        may close it: a number closed under us can be reused for any file, and
        a taker's ``/proc/self/fd/N`` would then open that file."""
        self.fd = memfd
        self._close_fd = weakref.finalize(self, _close_quietly, memfd)
        self.capacity = capacity
        self.waiter_capacity = waiter_capacity
        self.waiters_at = ROWS_AT + capacity * ROW_SIZE
        self.size = table_size(capacity, waiter_capacity)
        if os.fstat(memfd).st_size < self.size:
            raise RowError(f"lease table of {os.fstat(memfd).st_size} bytes, expected {self.size}")
        self.map = mmap.mmap(memfd, self.size)
        # A lease's take, renewal and give-back, one call each (C, or its Python
        # twin), histogram counts included.
        self.core = new_core(self.map, capacity)

    @classmethod
    def create(cls, capacity: int, waiter_capacity: int, max_waiting: int, epoch: bytes) -> Table:
        memfd = os.memfd_create("sharedpool-leases", os.MFD_CLOEXEC)
        os.ftruncate(memfd, table_size(capacity, waiter_capacity))
        table = cls(memfd, capacity, waiter_capacity)
        table.map[0:HEADER.size] = HEADER.pack(
            MAGIC, LAYOUT_VERSION, 0, capacity, 0, waiter_capacity, max_waiting, os.getpid(), 0, 0, 1, epoch[:16]
        )
        for slot in range(capacity):
            table.write_row(slot, Row(RowState.CLOSED, 0))
        return table

    def close(self) -> None:
        try:
            self.core.close()
            self.map.close()
        except (BufferError, ValueError):
            pass  # a view still exported: the mapping goes with the object
        self._close_fd()

    def _put(self, fmt: struct.Struct, at: int, *values: Any) -> None:
        """Write packed ``values`` at ``at`` with one copy of the finished bytes.

        Never ``Struct.pack_into``: it zeroes its whole span before writing
        the fields, so a process reading without the lock (the manager's
        sweep, a taker's first look, ``hot()``) would see, for an instant,
        CLOSED rows, generation 0 and no waiters that nobody wrote. A byte
        written here goes from its old value to its new one, never through 0.
        """
        self.map[at : at + fmt.size] = fmt.pack(*values)

    # header
    @property
    def flags(self) -> Flag:
        return Flag(FLAGS.unpack_from(self.map, FLAGS_AT)[0] & 7)

    def set_flags(self, flags: Flag) -> None:
        self._put(FLAGS, FLAGS_AT, int(flags))

    @property
    def slots_in_use(self) -> int:
        return min(self.capacity, int(U32.unpack_from(self.map, SLOTS_IN_USE_AT)[0]))

    def set_slots_in_use(self, count: int) -> None:
        self._put(U32, SLOTS_IN_USE_AT, min(count, self.capacity))

    @property
    def max_waiting(self) -> int:
        return min(self.waiter_capacity, int(U32.unpack_from(self.map, MAX_WAITING_AT)[0]))

    def set_max_waiting(self, count: int) -> None:
        self._put(U32, MAX_WAITING_AT, min(count, self.waiter_capacity))

    @property
    def failed_connects(self) -> int:
        return int(U32.unpack_from(self.map, FAILED_CONNECTS_AT)[0])

    def set_failed_connects(self, count: int) -> None:
        self._put(U32, FAILED_CONNECTS_AT, count & 0xFFFFFFFF)

    def outage(self) -> tuple[float, str]:
        """(down since, last error) as the manager last wrote them."""
        (since,) = F64.unpack_from(self.map, DOWN_SINCE_AT)
        raw = bytes(self.map[LAST_ERROR_AT : LAST_ERROR_AT + LAST_ERROR_SIZE]).split(b"\0", 1)[0]
        return float(since), raw.decode("utf-8", "replace")

    def set_outage(self, since: float, error: str) -> None:
        self._put(F64, DOWN_SINCE_AT, since)
        data = error.encode("utf-8")[: LAST_ERROR_SIZE - 1]
        self.map[LAST_ERROR_AT : LAST_ERROR_AT + LAST_ERROR_SIZE] = data.ljust(LAST_ERROR_SIZE, b"\0")

    @property
    def waiters(self) -> int:
        return int(I32.unpack_from(self.map, WAITERS_AT)[0])

    def _set_waiters(self, count: int) -> None:
        self._put(I32, WAITERS_AT, count)

    def hot(self) -> tuple[int, int]:
        """(flags, waiters) in one read: what a taker looks at before anything else."""
        return HOT_HEADER.unpack_from(self.map, FLAGS_AT)  # type: ignore[return-value]

    # rows
    def _row_at(self, slot: int) -> int:
        if not 0 <= slot < self.capacity:
            raise RowError(f"slot {slot} outside the table's {self.capacity} rows")
        return ROWS_AT + slot * ROW_SIZE

    def state_of(self, slot: int) -> int:
        """The raw state byte: the one read the hot path makes before locking."""
        return self.map[ROWS_AT + slot * ROW_SIZE]

    def generation_of(self, slot: int) -> int:
        return int(U32.unpack_from(self.map, ROWS_AT + slot * ROW_SIZE + 4)[0])

    def db_of(self, slot: int) -> int:
        return int(U16.unpack_from(self.map, ROWS_AT + slot * ROW_SIZE + DB_AT)[0])

    def row(self, slot: int) -> Row:
        """The row as read now; consistent only for a reader holding the slot's lock (else ``row_settled``)."""
        return self._parse_row(slot, self.map, self._row_at(slot))

    @staticmethod
    def _parse_row(slot: int, data: Any, at: int = 0) -> Row:
        (state_byte, db, flags, generation, holder_pid, call_site, lease_seq, holder_start, acquired_at,
         revoked_generation, revoked_seq, expires_at) = ROW.unpack_from(data, at)
        state = ROW_STATES.get(state_byte)
        if state is None:
            raise RowError(f"slot {slot}: state byte {state_byte} is no state")
        return Row(
            state, generation, holder_pid, call_site, lease_seq, holder_start, acquired_at,
            revoked_generation, revoked_seq, expires_at, db, flags,
        )

    def row_settled(self, slot: int, tries: int = 4) -> Row | None:
        """The row as of a moment no holder was writing it, read without its lock; None: in flux.

        A holder writes its row with one copy, but a copy is not atomic: a
        reader can see the state of the new lease with the acquired-at of
        none (0.0), which would read as a lease held for decades. Two equal
        reads, and a HELD row whole (holder and acquired-at written), or
        None after ``tries``: the caller looks again at its next sweep.
        ``RowError`` as ``row``.
        """
        at = self._row_at(slot)
        end = at + ROW.size
        for attempt in range(tries):
            if attempt:
                os.sched_yield()  # the writer is most likely mid-copy on the other core
            first = self.map[at:end]
            if first == self.map[at:end]:
                row = self._parse_row(slot, first)
                if row.state is not RowState.HELD or (row.holder_pid and row.acquired_at):
                    return row
        return None

    def write_row(self, slot: int, row: Row) -> None:
        self._put(
            ROW, self._row_at(slot), row.state, row.db, row.flags, row.generation, row.holder_pid,
            row.call_site, row.lease_seq, row.holder_start, row.acquired_at, row.revoked_generation,
            row.revoked_seq, row.expires_at,
        )

    # The hot path's moves: ``take`` and ``give_back`` above, done in place
    # (tests hold the two to the same results).
    #
    # The contract with the manager (the C accelerator keeps it too): only a
    # slot lock's holder writes a row's first 40 bytes while the row says
    # HELD. The manager asks for a live holder's lease back by writing the
    # revoke request (``request_revoke``: the lease's generation and number
    # in bytes 40..55, which no holder writes) and shutting the connection
    # down; it writes the slot's next generation only once the lock is free
    # or the holder dead. Each move below reads the request with the row:
    # a revoked lease is given back BROKEN (``Outcome.REVOKED``), never
    # READY, and a READY row whose last lease was revoked is not taken.
    def take_in_place(self, slot: int, generation: int, pid: int, start: float, now: float, call_site: int, db: int) -> int:
        """``take`` on a READY row of ``generation`` and ``db`` we hold the lock of; its lease number, or 0.

        0 also when the row's last lease was revoked (its connection is being
        shut down: the manager replaces it)."""
        at = ROWS_AT + slot * ROW_SIZE
        state, row_db, row_generation, _pid, _site, seq, revoked_generation, revoked_seq = TAKE_READ.unpack_from(self.map, at)
        # The database is checked under the lock: the manager rebinds a slot
        # to another database only while it holds that lock.
        if state != RowState.READY or row_generation != generation or row_db != db:
            return 0
        if revoked_seq == seq and revoked_generation == generation and seq:
            return 0
        seq = (seq + 1) & 0xFFFFFFFFFFFFFFFF or 1  # a scribbled maximum wraps, never raises
        # Table._put, inlined: the hot path.
        self.map[at : at + TAKE_SIZE] = TAKE_WRITE.pack(RowState.HELD, row_db, 0, row_generation, pid, call_site, seq, start, now)
        return int(seq)

    def give_back_in_place(self, slot: int, generation: int, seq: int, outcome: Outcome, now: float) -> Outcome | None:
        """``give_back`` if the row is still our lease: the outcome written (an expired
        connection goes back BROKEN; a revoked lease BROKEN, answered ``Outcome.REVOKED``);
        None if the row is no longer our lease (repaired, scribbled): nothing is written."""
        at = ROWS_AT + slot * ROW_SIZE
        (state, row_db, row_generation, _pid, _site, row_seq, revoked_generation, revoked_seq,
         expires_at) = GIVE_READ.unpack_from(self.map, at)
        if state != RowState.HELD or row_generation != generation or row_seq != seq:
            return None
        if revoked_seq == seq and revoked_generation == generation:
            outcome = Outcome.REVOKED
        elif outcome is Outcome.CLEAN and expires_at and now >= expires_at:
            outcome = Outcome.BROKEN
        self.map[at : at + TAKE_SIZE] = TAKE_WRITE.pack(STATE_AFTER[outcome], row_db, 0, row_generation, 0, 0, seq, 0.0, 0.0)
        return outcome

    def request_revoke(self, slot: int, generation: int, seq: int) -> bool:
        """The manager's: ask for lease ``seq`` of ``generation`` back, writing only the
        revoke request (bytes no holder writes). True if the row, read after the
        request, still says that lease is held: only then may the caller shut the
        connection down. From then on its holder gives it back BROKEN and no taker
        takes the row READY, so a shutdown that follows cannot reach another lease.
        """
        at = self._row_at(slot)
        self._put(REVOKE, at + REVOKE_AT, generation, seq)
        state, _db, row_generation, _pid, _site, row_seq, _rg, _rs = TAKE_READ.unpack_from(self.map, at)
        return bool(state == RowState.HELD and row_generation == generation and row_seq == seq)

    def revoke_asked(self, slot: int, generation: int, seq: int) -> bool:
        """Whether the manager asked for lease ``seq`` of ``generation`` back (read by its holder)."""
        at = self._row_at(slot)
        revoked_generation, revoked_seq = REVOKE.unpack_from(self.map, at + REVOKE_AT)
        return bool(seq) and revoked_generation == generation and revoked_seq == seq

    def oldest_waiter_since(self, db: int, other_than: int) -> float | None:
        """When the oldest entry of ``db`` not of pid ``other_than`` queued (None: there is none).

        Read without the queue's lock: a hint for fairness, not a decision.
        """
        oldest: float | None = None
        # One copy of the used entries, unpacked in C: asked on every contended hand-over.
        start = self._waiter_at(0)
        free = WaiterState.FREE
        for state, entry_db, pid, _token, _ticket, at in WAITER.iter_unpack(self.map[start : self._waiter_at(self.hwm())]):
            if state != free and entry_db == db and pid != other_than and (oldest is None or at < oldest):
                oldest = at
        return oldest

    def mark_subscriber(self, slot: int, generation: int, seq: int, flag: RowFlag = RowFlag.SUBSCRIBER) -> bool:
        """The holder's lease entered subscribed mode, or another long-lived one (``flag``;
        it holds the slot's lock). False if the row is no longer its lease (revoked or repaired)."""
        at = ROWS_AT + slot * ROW_SIZE
        state, _db, row_generation, _pid, _site, row_seq, _rg, _rs = TAKE_READ.unpack_from(self.map, at)
        if state != RowState.HELD or row_generation != generation or row_seq != seq:
            return False
        self.map[at + FLAGS_OF_ROW_AT] = self.map[at + FLAGS_OF_ROW_AT] | flag
        return True

    def set_expiry(self, slot: int, expires_at: float) -> None:
        """The manager's: when the connection in this row is to be replaced."""
        self._put(F64, self._row_at(slot) + EXPIRES_AT, expires_at)

    def row_histograms(self, slot: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One row's (wait, hold) histogram counts, raw."""
        at = self._row_at(slot)
        return HIST.unpack_from(self.map, at + WAIT_HIST_AT), HIST.unpack_from(self.map, at + HOLD_HIST_AT)

    def histograms(self, slots: int) -> tuple[list[int], list[int]]:
        waits = [0] * HISTOGRAM_BUCKETS
        holds = [0] * HISTOGRAM_BUCKETS
        for slot in range(min(slots, self.capacity)):
            at = ROWS_AT + slot * ROW_SIZE
            for index, value in enumerate(HIST.unpack_from(self.map, at + WAIT_HIST_AT)):
                waits[index] += value
            for index, value in enumerate(HIST.unpack_from(self.map, at + HOLD_HIST_AT)):
                holds[index] += value
        return waits, holds

    # waiters (callers hold HEADER_LOCK)
    def _waiter_at(self, index: int) -> int:
        return self.waiters_at + index * WAITER_SIZE

    def waiter(self, index: int) -> tuple[int, int, int, int, int, float]:
        """(state, db, pid, token, ticket, enqueued_at) of one entry, raw."""
        return WAITER.unpack_from(self.map, self._waiter_at(index))  # type: ignore[return-value]

    def hwm(self) -> int:
        return max(0, min(self.waiter_capacity, int(I32.unpack_from(self.map, HWM_AT)[0])))

    def enqueue(self, pid: int, token: int, now: float, db: int = 0) -> int:
        """Add a waiter for a connection of ``db``; return its index, or -1 when max_waiting are queued."""
        if self.waiters >= self.max_waiting:
            return -1
        ticket = U64.unpack_from(self.map, TICKET_AT)[0]
        # Wraps rather than overflows: the counter is shared bytes a scribbler may have set to the top.
        self._put(U64, TICKET_AT, (ticket + 1) & 0xFFFF_FFFF_FFFF_FFFF)
        hwm = self.hwm()
        for index in range(self.waiter_capacity):
            if self.map[self._waiter_at(index)] == WaiterState.FREE:
                self._put(WAITER, self._waiter_at(index), WaiterState.WAITING, db, pid, token, ticket, now)
                if index >= hwm:
                    self._put(I32, HWM_AT, index + 1)
                self._set_waiters(max(0, self.waiters) + 1)
                return index
        return -1

    def dequeue(self, index: int, pid: int, token: int) -> bool:
        """Remove our entry; True if it had been woken (the wake is then ours to pass on)."""
        if not 0 <= index < self.waiter_capacity:
            return False
        state, _db, entry_pid, entry_token, _ticket, _at = self.waiter(index)
        if entry_pid != pid or entry_token != token or state == WaiterState.FREE:
            return False
        self.map[self._waiter_at(index)] = WaiterState.FREE
        self._shrink_hwm()
        self._set_waiters(max(0, self.waiters - 1))
        return state == WaiterState.WOKEN

    def requeue(self, index: int, pid: int, token: int) -> None:
        """A woken waiter that found nothing free waits again, keeping its ticket."""
        if 0 <= index < self.waiter_capacity:
            state, _db, entry_pid, entry_token, _ticket, _at = self.waiter(index)
            if entry_pid == pid and entry_token == token and state == WaiterState.WOKEN:
                self.map[self._waiter_at(index)] = WaiterState.WAITING

    def pick_waiter(self, db: int | None = None) -> tuple[int, int, int] | None:
        """Mark the oldest waiting entry (of ``db``; None: of any) woken; return (index, pid, token)."""
        best: tuple[int, int, int, int] | None = None
        for index in range(self.hwm()):
            state, entry_db, pid, token, ticket, _at = self.waiter(index)
            if state == WaiterState.WAITING and (db is None or entry_db == db) and (best is None or ticket < best[0]):
                best = (ticket, index, pid, token)
        if best is None:
            return None
        self.map[self._waiter_at(best[1])] = WaiterState.WOKEN
        return best[1], best[2], best[3]

    def drop_waiters_of(self, dead: set[int]) -> int:
        """Remove every entry of these pids (the manager's sweep); return how many."""
        dropped = 0
        for index in range(self.hwm()):
            state, _db, pid, _token, _ticket, _at = self.waiter(index)
            if state != WaiterState.FREE and pid in dead:
                self.map[self._waiter_at(index)] = WaiterState.FREE
                dropped += 1
        if dropped:
            self._shrink_hwm()
            self._set_waiters(self._live_waiters())
        return dropped

    def waiter_pids(self) -> list[int]:
        return [pid for state, _db, pid, *_ in (self.waiter(i) for i in range(self.hwm())) if state != WaiterState.FREE]

    def waiters_by_db(self) -> dict[int, int]:
        """Queued entries per database (read without the queue's lock: a count, not a decision)."""
        counts: dict[int, int] = {}
        for index in range(self.hwm()):
            state, db, *_ = self.waiter(index)
            if state != WaiterState.FREE:
                counts[db] = counts.get(db, 0) + 1
        return counts

    def repair_waiters(self) -> None:
        """Make the count and the high-water mark agree with the entries (after scribbling)."""
        for index in range(self.waiter_capacity):
            if self.map[self._waiter_at(index)] not in (WaiterState.FREE, WaiterState.WAITING, WaiterState.WOKEN):
                self.map[self._waiter_at(index)] = WaiterState.FREE
        self._put(I32, HWM_AT, self.waiter_capacity)
        self._shrink_hwm()
        self._set_waiters(self._live_waiters())

    def _live_waiters(self) -> int:
        return sum(1 for index in range(self.hwm()) if self.map[self._waiter_at(index)] != WaiterState.FREE)

    def _shrink_hwm(self) -> None:
        hwm = self.hwm()
        while hwm and self.map[self._waiter_at(hwm - 1)] == WaiterState.FREE:
            hwm -= 1
        self._put(I32, HWM_AT, hwm)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
