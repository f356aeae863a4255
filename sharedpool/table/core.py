"""The table core: a lease's two moves on the table, each one call, in C or in Python.

``take`` scans, try-locks and writes a row HELD; ``give_back`` counts the
hold, writes the outcome and unlocks. The C accelerator
(``sharedpool._speedups.Core``, built when ``pip install`` finds a compiler)
and ``PyTableCore`` below are twins: the same arguments, the same results,
the same bytes written (``tests/test_speedups.py`` holds them together), so
processes on either path share one table. ``PyTableCore`` is the reference
and the fallback.

``SHAREDPOOL_PURE_PYTHON=1`` forces the fallback; ``PATH`` says which one
this process uses (``"c"`` or ``"python"``) and ``WHY`` why, for
``sharedpool check``, ``stats`` and ``--version``.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import mmap
import os
import time
from typing import Any, Protocol

from sharedpool.table.layout import (
    DB_AT,
    EXPIRES_AT,
    FLAGS_AT,
    FLAGS_OF_ROW_AT,
    GIVE_READ,
    HIST,
    HISTOGRAM_BUCKETS,
    HOLD_HIST_AT,
    HOT_HEADER,
    I32,
    LAYOUT_VERSION,
    REVOKE,
    REVOKE_AT,
    ROW_SIZE,
    ROWS_AT,
    SLOTS_IN_USE_AT,
    TAKE_READ,
    TAKE_WRITE,
    U16,
    U32,
    WAIT_HIST_AT,
    WAITERS_AT,
)
from sharedpool.table.locks import _F_OFD_SETLK, _FLOCK, slot_lock

# (slot, generation, lease seq, acquired at): a lease taken, its lock held and its row written.
Taken = tuple[int, int, int, float]

_READY = 1
_HELD = 2
_STATE_AFTER = (1, 3, 4, 4)  # Outcome CLEAN, NEEDS_RESET, BROKEN, REVOKED -> READY, RESET, BROKEN, BROKEN
_BROKEN = 2  # Outcome.BROKEN
_REVOKED = 3  # Outcome.REVOKED: never the holder's choice, only the answer
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
_LAST_BUCKET_AT = float(1 << (HISTOGRAM_BUCKETS - 1))  # seconds * 1e5 from here on: the last bucket


class TableCore(Protocol):
    """The shape both paths have (``PyTableCore`` says what each move does)."""

    def take(
        self, lock_fd: int, last: int, cached: dict[int, Any], avoid: set[tuple[int, int]], db: int,
        pid: int, start: float, site: int, started: float, now: float = -1.0, /,
    ) -> Taken | None: ...

    def give_back(
        self, lock_fd: int, slot: int, generation: int, seq: int, outcome: int, taken_at: float, used: bool,
        now: float = -1.0, /,
    ) -> tuple[int, bool]: ...

    def renew(
        self, slot: int, generation: int, seq: int, pid: int, start: float, site: int, taken_at: float,
        started: float, now: float, idle_only: bool, /,
    ) -> int: ...

    def quiet(self, slot: int, generation: int, seq: int, /) -> bool: ...

    def close(self) -> None: ...


class PyTableCore:
    """The table core in Python: the reference for the C one, and the fallback.

    ``take(lock_fd, last, cached, avoid, db, pid, start, site, started, now=-1.0)``:
    try-lock and take the first READY row of ``db``: ``last`` first (when it
    is among ``cached``'s keys, the slots whose fd this process has), then
    ``cached``'s slots, then the other slots in use. ``avoid`` holds
    (slot, generation) pairs never to take. The row is written HELD with
    ``pid``, ``start``, the next lease number, the acquired-at (``now``, or
    the monotonic clock when negative) and ``site``, and the wait since
    ``started`` is counted. A READY row whose last lease the manager asked
    back is not taken (its connection is being shut down). Returns (slot, generation, seq, acquired at), or
    None with no lock held.

    ``give_back(lock_fd, slot, generation, seq, outcome, taken_at, used, now=-1.0)``:
    count the hold since ``taken_at`` when ``used``; if the row is still this
    lease, write the outcome (a CLEAN lease of an expired connection goes back
    BROKEN; a lease the manager asked back, its revoke request in the row,
    goes back BROKEN and is answered REVOKED); unlock. Returns (the outcome written, or -1 when the row is no
    longer this lease; whether anyone waits).

    ``renew(slot, generation, seq, pid, start, site, taken_at, started, now, idle_only)``:
    a clean give-back and a take by ``pid`` in one move, the slot's lock kept
    (a hand-over within this process, or a parked lease taken back): if the
    row is still lease ``seq`` of ``generation``, not asked back and its
    connection not expired at ``now``, write the next lease number, ``pid``,
    ``start``, ``site`` and acquired-at ``now``, count the hold since
    ``taken_at`` and the wait since ``started`` (either not when negative). With
    ``idle_only``, only while the table is neither paused nor waited on.
    Returns the new lease number, or 0 with nothing written or counted.

    ``quiet(slot, generation, seq)``: whether the table is neither paused
    nor waited on and lease ``seq`` of ``generation`` was not asked back, in
    one call (whether a clean lease may stay with this process a moment).

    All raise ``ValueError`` once closed, and for a slot or outcome that is none.
    """

    def __init__(self, map: mmap.mmap, capacity: int) -> None:
        if capacity < 0 or len(map) < ROWS_AT + capacity * ROW_SIZE:
            raise ValueError(f"a mapping of {len(map)} bytes holds no table of {capacity} rows")
        self.map = map
        self.capacity = capacity
        self._words: memoryview | None = memoryview(map).cast("Q")

    def close(self) -> None:
        words, self._words = self._words, None
        if words is not None:
            words.release()

    def take(
        self, lock_fd: int, last: int, cached: dict[int, Any], avoid: set[tuple[int, int]], db: int,
        pid: int, start: float, site: int, started: float, now: float = -1.0, /,
    ) -> Taken | None:
        data = self._live()
        capacity = self.capacity
        tried_last = False
        if 0 <= last < capacity and last in cached and data[ROWS_AT + last * ROW_SIZE] == _READY:
            # Its database is checked under the lock: no extra read.
            tried_last = True
            taken = self._take_slot(last, lock_fd, avoid, db, pid, start, site, started, now)
            if taken is not None:
                return taken
        # A snapshot: another thread of this process may cache a newly bound fd meanwhile (the
        # GIL can switch between two turns of this loop; the C core holds it throughout).
        for slot in tuple(cached):
            if type(slot) is not int or not 0 <= slot < capacity or (tried_last and slot == last):
                continue
            at = ROWS_AT + slot * ROW_SIZE
            if data[at] == _READY and U16.unpack_from(data, at + DB_AT)[0] == db:
                taken = self._take_slot(slot, lock_fd, avoid, db, pid, start, site, started, now)
                if taken is not None:
                    return taken
        for slot in range(min(capacity, U32.unpack_from(data, SLOTS_IN_USE_AT)[0])):
            at = ROWS_AT + slot * ROW_SIZE
            if data[at] == _READY and U16.unpack_from(data, at + DB_AT)[0] == db and slot not in cached:
                taken = self._take_slot(slot, lock_fd, avoid, db, pid, start, site, started, now)
                if taken is not None:
                    return taken
        return None

    def _take_slot(
        self, slot: int, lock_fd: int, avoid: set[tuple[int, int]], db: int, pid: int, start: float, site: int,
        started: float, now: float,
    ) -> Taken | None:
        data = self.map
        at = ROWS_AT + slot * ROW_SIZE
        generation = U32.unpack_from(data, at + 4)[0]
        if avoid and (slot, generation) in avoid:
            return None
        offset = slot_lock(slot, generation)
        if not _try_lock(lock_fd, offset):
            return None
        written = False
        try:
            # Under the lock, the row is ours to judge: the manager rebinds a
            # slot to another database, or replaces its connection, only holding it.
            state, row_db, row_generation, _pid, _site, seq, revoked_generation, revoked_seq = TAKE_READ.unpack_from(data, at)
            if state != _READY or row_generation != generation or row_db != db or (
                # The row's last lease was asked back: its connection is being shut down.
                seq and revoked_seq == seq and revoked_generation == generation
            ):
                _unlock(lock_fd, offset)
                return None
            seq = (seq + 1) & _MASK64 or 1  # a scribbled maximum wraps, never to 0 (no lease)
            if now < 0:
                now = time.monotonic()
            # One copy of the finished bytes (Table._put): no field passes through 0.
            data[at : at + TAKE_WRITE.size] = TAKE_WRITE.pack(_HELD, row_db, 0, row_generation, pid, site, seq, start, now)
            written = True
            self._count(at + WAIT_HIST_AT, now - started)
            return slot, generation, seq, now
        except BaseException:
            # Interrupted (a signal handler raised): the row as we found it, READY, and unlocked.
            if written:
                data[at : at + TAKE_WRITE.size] = TAKE_WRITE.pack(_READY, row_db, 0, row_generation, 0, 0, seq, 0.0, 0.0)
            _unlock(lock_fd, offset)
            raise

    def give_back(
        self, lock_fd: int, slot: int, generation: int, seq: int, outcome: int, taken_at: float, used: bool,
        now: float = -1.0, /,
    ) -> tuple[int, bool]:
        data = self._live()
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} outside the table's {self.capacity} rows")
        if not 0 <= outcome <= _BROKEN or not 0 <= generation <= 0xFFFF_FFFF:
            raise ValueError(f"give_back(): outcome {outcome} or generation {generation} is none")
        if now < 0:
            now = time.monotonic()
        at = ROWS_AT + slot * ROW_SIZE
        written = -1
        try:
            if used:
                self._count(at + HOLD_HIST_AT, now - taken_at)
            # The one compare before the give-back's write: a row no longer this
            # lease (revoked, repaired, a newer generation) is not ours to write.
            (state, row_db, row_generation, _pid, _site, row_seq, revoked_generation, revoked_seq,
             expires_at) = GIVE_READ.unpack_from(data, at)
            if state == _HELD and row_generation == generation and row_seq == seq:
                written = outcome
                if revoked_seq == seq and revoked_generation == generation:
                    written = _REVOKED  # the manager asked for it back: written BROKEN, answered REVOKED
                elif outcome == 0 and expires_at and now >= expires_at:
                    written = _BROKEN  # an expired connection goes back to be replaced
                data[at : at + TAKE_WRITE.size] = TAKE_WRITE.pack(
                    _STATE_AFTER[written], row_db, 0, row_generation, 0, 0, row_seq, 0.0, 0.0
                )
        finally:
            # Whatever interrupts the above (a signal handler raising), the lock is given back.
            try:
                _unlock(lock_fd, slot_lock(slot, generation))
            except OSError:
                pass  # the taker's description is gone (its thread ended): so is the lock
        return written, I32.unpack_from(data, WAITERS_AT)[0] > 0

    def renew(
        self, slot: int, generation: int, seq: int, pid: int, start: float, site: int, taken_at: float,
        started: float, now: float, idle_only: bool, /,
    ) -> int:
        data = self._live()
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} outside the table's {self.capacity} rows")
        if idle_only and HOT_HEADER.unpack_from(data, FLAGS_AT) != (0, 0):
            return 0
        at = ROWS_AT + slot * ROW_SIZE
        (state, row_db, row_generation, _pid, _site, row_seq, revoked_generation, revoked_seq,
         expires_at) = GIVE_READ.unpack_from(data, at)
        if state != _HELD or row_generation != generation or row_seq != seq:
            return 0  # repaired or replaced under us: the ordinary give-back says so
        if (revoked_seq == seq and revoked_generation == generation) or (expires_at and now >= expires_at):
            return 0
        seq = (seq + 1) & _MASK64 or 1
        data[at : at + TAKE_WRITE.size] = TAKE_WRITE.pack(_HELD, row_db, 0, row_generation, pid, site, seq, start, now)
        if taken_at >= 0:
            self._count(at + HOLD_HIST_AT, now - taken_at)
        if started >= 0:
            self._count(at + WAIT_HIST_AT, now - started)
        return seq

    def quiet(self, slot: int, generation: int, seq: int, /) -> bool:
        data = self._live()
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} outside the table's {self.capacity} rows")
        if HOT_HEADER.unpack_from(data, FLAGS_AT) != (0, 0):
            return False
        revoked_generation, revoked_seq = REVOKE.unpack_from(data, ROWS_AT + slot * ROW_SIZE + REVOKE_AT)
        return not (seq and revoked_generation == generation and revoked_seq == seq)

    def _live(self) -> mmap.mmap:
        if self._words is None:
            raise ValueError("the lease table is closed")
        return self.map

    def _count(self, at: int, seconds: float) -> None:
        """Table.count: one aligned 8-byte store, never a moment at 0 for a reader."""
        index = 0
        if seconds >= 10e-6:
            scaled = seconds * 1e5
            index = HISTOGRAM_BUCKETS - 1 if scaled >= _LAST_BUCKET_AT else int(scaled).bit_length()
        words = self._words
        assert words is not None
        word = (at >> 3) + index
        words[word] = (words[word] + 1) & _MASK64


def _try_lock(fd: int, offset: int) -> bool:
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, offset, 1, 0))
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _unlock(fd: int, offset: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, 0, offset, 1, 0))


# What the C module must agree on before this process trusts it with the shared table.
EXPECTED_LAYOUT = {
    "ROWS_AT": ROWS_AT, "ROW_SIZE": ROW_SIZE, "FLAGS_AT": FLAGS_AT, "SLOTS_IN_USE_AT": SLOTS_IN_USE_AT,
    "WAITERS_AT": WAITERS_AT, "DB_AT": DB_AT, "FLAGS_OF_ROW_AT": FLAGS_OF_ROW_AT, "EXPIRES_AT": EXPIRES_AT,
    "REVOKE_AT": REVOKE_AT,
    "WAIT_HIST_AT": WAIT_HIST_AT, "HOLD_HIST_AT": HOLD_HIST_AT, "HISTOGRAM_BUCKETS": HISTOGRAM_BUCKETS,
    "LAYOUT_VERSION": LAYOUT_VERSION, "SLOT_LOCK_0_0": slot_lock(0, 0), "SLOT_LOCK_1_0": slot_lock(1, 0),
}
assert HIST.size == 8 * HISTOGRAM_BUCKETS


def _choose() -> tuple[Any, str, str]:
    if os.environ.get("SHAREDPOOL_PURE_PYTHON", "") not in ("", "0"):
        return PyTableCore, "python", "forced by SHAREDPOOL_PURE_PYTHON"
    try:
        _speedups = importlib.import_module("sharedpool._speedups")
    except ModuleNotFoundError:
        return PyTableCore, "python", "no C accelerator built (pip found no C compiler or Python headers)"
    except ImportError as exc:
        return PyTableCore, "python", f"the C accelerator does not load: {exc}"
    if getattr(_speedups, "LAYOUT", None) != EXPECTED_LAYOUT:
        return PyTableCore, "python", f"the C accelerator at {_speedups.__file__} was built for another table layout"
    return _speedups.Core, "c", f"the C accelerator, {os.path.basename(_speedups.__file__ or '?')}"


CORE, PATH, WHY = _choose()


def new_core(map: mmap.mmap, capacity: int) -> TableCore:
    """This process's table core over ``map`` (``PATH`` says which)."""
    core: TableCore = CORE(map, capacity)
    return core


def describe() -> str:
    """One line for ``check``, ``stats`` and ``--version``: which path this process uses."""
    return f"table core: {PATH} ({WHY})"


def use_pure_python(why: str) -> None:
    """Map tables from now on with the pure-Python core, in this process only (the bench's
    rounds of that path in a forked worker; ``SHAREDPOOL_PURE_PYTHON=1`` does it at start)."""
    global CORE, PATH, WHY
    CORE, PATH, WHY = PyTableCore, "python", why
