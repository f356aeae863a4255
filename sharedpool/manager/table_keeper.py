"""The manager's side of the lease table: its own lock description, the
slot locks it holds, the rows and header it writes, and waking waiters."""

from __future__ import annotations

import os
import socket

from sharedpool import stat_keys
from sharedpool import table as tbl
from sharedpool.config import ManagerConfig
from sharedpool.manager.actions import Publish
from sharedpool.manager.pool_state import Pool, SlotState
from sharedpool.table import Flag, RowState

# The table has at least this many rows, so a reload can raise
# max_connections that far without a restart.
_MIN_TABLE_ROWS = 64
_MAX_WAITER_ROWS = 65536


class TableKeeper:
    def __init__(self, config: ManagerConfig, epoch: str) -> None:
        self.epoch = epoch
        capacity = max(_MIN_TABLE_ROWS, config.max_connections)
        self.table = tbl.Table.create(
            capacity, min(max(config.max_waiting, 1), _MAX_WAITER_ROWS), config.max_waiting, epoch.encode()
        )
        self.table.set_slots_in_use(config.max_connections)
        # Our own description of the table: the one we pass to workers is
        # shared with them, and a lock on it would live on in them.
        self._lock_fd = tbl.own_description(self.table.fd)
        self._held_locks: dict[int, int] = {}  # slot -> generation whose lock we hold
        self._waker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    def take_alive_lock(self) -> bool:
        """Held for the manager's whole life: a worker that can read-lock this
        byte knows we died, even if nobody closed anything."""
        return tbl.try_lock(self._lock_fd, tbl.ALIVE_LOCK)

    def close(self) -> None:
        self._waker.close()
        os.close(self._lock_fd)  # drops ALIVE_LOCK: workers see we are gone
        self.table.close()

    # ----- locks ------------------------------------------------------------

    def try_lock(self, slot: int, generation: int) -> bool:
        if self._held_locks.get(slot) == generation:
            return True
        if tbl.try_lock(self._lock_fd, tbl.slot_lock(slot, generation)):
            self._held_locks[slot] = generation
            return True
        return False

    def unlock(self, slot: int) -> None:
        generation = self._held_locks.pop(slot, None)
        if generation is not None:
            tbl.unlock(self._lock_fd, tbl.slot_lock(slot, generation))

    def holds(self, slot: int, generation: int) -> bool:
        return self._held_locks.get(slot) == generation

    def lock_header(self) -> bool:
        # Never a blocking wait in the loop: a worker frozen inside the
        # queue's lock would freeze the manager with it.
        return tbl.lock_within(self._lock_fd, tbl.HEADER_LOCK, 0.01)

    def unlock_header(self) -> None:
        tbl.unlock(self._lock_fd, tbl.HEADER_LOCK)

    # ----- what the rows say ------------------------------------------------

    def count_rows(self, pool: Pool, state: RowState) -> int:
        """Shared slots whose row says ``state`` (READY: idle, HELD: leased)."""
        table = self.table
        return sum(1 for slot in pool.in_state(SlotState.SHARED) if table.state_of(slot.index) == state)

    def idle_by_db(self, pool: Pool) -> dict[int, int]:
        """Shared slots whose row says READY, per database (the slot's, which the row must agree with)."""
        table = self.table
        idle: dict[int, int] = {}
        for slot in pool.in_state(SlotState.SHARED):
            if table.state_of(slot.index) == RowState.READY:
                idle[slot.db] = idle.get(slot.db, 0) + 1
        return idle

    def held_by(self, pool: Pool, pid: int) -> int:
        count = 0
        for slot in pool.in_state(SlotState.SHARED):
            try:
                row = self.table.row(slot.index)
            except tbl.RowError:
                continue
            if row.state is RowState.HELD and row.holder_pid == pid and row.generation == slot.generation:
                count += 1
        return count

    # ----- writing ------------------------------------------------------------

    def publish(self, action: Publish, seen_seq: int) -> None:
        """Write the row; ``seen_seq`` stands in for a lease number we cannot read back. The
        revoke request is kept: a holder that gave back late still finds it there."""
        table = self.table
        index = action.slot
        try:
            old = table.row(index)
            seq, revoked_generation, revoked_seq = old.lease_seq, old.revoked_generation, old.revoked_seq
        except tbl.RowError:
            seq, revoked_generation, revoked_seq = seen_seq, 0, 0
        table.write_row(index, tbl.Row(
            action.state, action.generation, lease_seq=seq,
            revoked_generation=revoked_generation, revoked_seq=revoked_seq, expires_at=action.expires_at,
            db=action.db,
        ))
        if action.state is not RowState.MANAGER:
            self.unlock(index)

    def sync_flags(self, pool: Pool) -> None:
        flags = Flag(0)
        if pool.paused:
            flags |= Flag.PAUSED
        if pool.shutting_down:
            flags |= Flag.STOPPING
        if pool.redis_down_since is not None:
            flags |= Flag.REDIS_DOWN
        if self.table.flags != flags:
            self.table.set_flags(flags)
        failed = pool.counters[stat_keys.REDIS_ERRORS]
        if self.table.failed_connects != failed & 0xFFFFFFFF:
            self.table.set_outage(pool.redis_down_since or 0.0, pool.last_connect_error)
            self.table.set_failed_connects(failed)

    def restore_header(self, max_connections: int, max_waiting: int) -> None:
        """The header's limits are ours: put them back if a worker scribbled."""
        table = self.table
        if table.slots_in_use != max_connections:
            table.set_slots_in_use(max_connections)
        if table.max_waiting != min(max_waiting, table.waiter_capacity):
            table.set_max_waiting(max_waiting)

    def wake(self, count: int, db: int | None = None) -> None:
        """Wake ``count`` waiters (-1: all) of ``db`` (None: of any), oldest first."""
        table = self.table
        woken = 0
        while count < 0 or woken < count:
            if not self.lock_header():
                return  # the waiters rescan on their own every few tens of ms
            try:
                picked = table.pick_waiter(db)
            finally:
                self.unlock_header()
            if picked is None:
                return
            _index, pid, token = picked
            try:
                self._waker.sendto(b"\1", tbl.wake_address(self.epoch, pid, token))
                woken += 1
            except BlockingIOError:
                woken += 1
            except OSError:
                continue  # gone: the sweep removes its entry
