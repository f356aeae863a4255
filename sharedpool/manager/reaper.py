"""Reaping: the sweep of the lease table's rows and waiters, read as untrusted input.

The sweep reads each shared row, takes the slot's lock where it can, asks
psutil whether a holder whose lock is still taken is alive, and lets the
pool core decide (abandoned leases, orphaned locks, leak warnings,
revocations, trimming). It also rewrites scribbled rows of slots the
workers do not own and the header's limits, drops waiters of dead
processes, and checks idle connections for EOF or stray bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psutil

from sharedpool import table as tbl
from sharedpool.manager.actions import Action, RowView
from sharedpool.manager.pool_state import Pool, SlotState
from sharedpool.manager.table_keeper import TableKeeper
from sharedpool.table import RowFlag, RowState

log = logging.getLogger("sharedpool.manager")


class Reaper:
    def __init__(
        self,
        pool: Pool,
        keeper: TableKeeper,
        perform: Callable[[list[Action]], None],
        redispatch: Callable[[float], None],
        max_waiting: int,
    ) -> None:
        self.pool = pool
        self.keeper = keeper
        self._perform = perform
        self._redispatch = redispatch
        self.max_waiting = max_waiting  # the loop sets it again on reload
        self._alive_cache: dict[tuple[int, float], bool] = {}

    def _alive(self, pid: int, start: float) -> bool:
        key = (pid, start)
        alive = self._alive_cache.get(key)
        if alive is None:
            alive = pid <= 0 or alive_by_psutil(pid, start)
            self._alive_cache[key] = alive
        return alive

    def sweep(self, now: float, only_pid: int = 0) -> None:
        """Read every shared row (untrusted), lock what can be locked, let the core decide.

        ``only_pid``: just the rows that process holds (its channel closed).
        """
        keeper, table = self.keeper, self.keeper.table
        self._alive_cache.clear()
        views: list[RowView] = []
        if not only_pid:
            self._repair_unshared_rows()
        for slot in self.pool.in_state(SlotState.SHARED):
            index, generation = slot.index, slot.generation
            try:
                settled = table.row_settled(index)
            except tbl.RowError:
                if not only_pid:
                    # Unreadable: ours to rewrite only under its lock (a live holder may have it).
                    views.append(RowView(index, None, generation, lock_free=keeper.try_lock(index, generation)))
                continue
            lock_free = False
            if settled is None:
                # In flux: a holder is writing it right now, or it reads HELD
                # half-written. Under its lock (a holder writes only under
                # it) the row is whole; held by someone, the next sweep looks.
                if not keeper.try_lock(index, generation):
                    continue
                lock_free = True
                try:
                    settled = table.row(index)
                except tbl.RowError:
                    if not only_pid:
                        views.append(RowView(index, None, generation, lock_free=True))
                    else:
                        keeper.unlock(index)
                    continue
            row = settled
            if only_pid and (row.state is not RowState.HELD or row.holder_pid != only_pid):
                if lock_free:
                    keeper.unlock(index)
                continue
            if not lock_free:
                # Whatever the row says (a scribbled one too), the lock of the
                # slot's real generation says whether a live holder has it.
                lock_free = keeper.try_lock(index, generation)
                if lock_free:
                    # Read again under the lock: a holder may have given it back
                    # between our read and our lock, and HELD would look abandoned.
                    try:
                        row = table.row(index)
                    except tbl.RowError:
                        views.append(RowView(index, None, generation, lock_free=True))
                        continue
            alive = True
            if row.state is RowState.HELD and not lock_free and row.generation == generation:
                alive = self._alive(row.holder_pid, row.holder_start)
                if not alive:
                    # psutil took its time: act only if the row still names the
                    # lease we asked about (a lease taken since is somebody else's).
                    again = _settled_or_none(table, index)
                    if again is None or (again.state, again.generation, again.lease_seq, again.holder_pid) != (
                        row.state, row.generation, row.lease_seq, row.holder_pid
                    ):
                        continue
            views.append(RowView(
                index, row.state, row.generation, row.lease_seq, row.holder_pid,
                row.acquired_at, row.call_site, lock_free, alive, row.db,
                bool(row.flags & (RowFlag.SUBSCRIBER | RowFlag.BLOCKING)),
                tbl.was_revoked(row, row.generation, row.lease_seq),
            ))
        if only_pid:
            idle = keeper.idle_by_db(self.pool)
            self._perform(self.pool.sweep(views, now, table.waiters_by_db(), idle_elsewhere=idle))
            return
        self._perform(self.pool.sweep(views, now, table.waiters_by_db()))
        self._sweep_waiters()
        keeper.restore_header(self.pool.limits.max_connections, self.max_waiting)

    def _repair_unshared_rows(self) -> None:
        """Rows of slots the workers do not own right now say what we last wrote, or are rewritten."""
        table = self.keeper.table
        for slot in self.pool.slots:
            if slot.state is SlotState.SHARED:
                continue
            try:
                row = table.row(slot.index)
                intact = (row.state is self.pool.expected_row(slot) and row.generation == slot.generation
                          and row.db == slot.db)
            except tbl.RowError:
                intact = False
            if not intact:
                self._perform(self.pool.rewrite_row(slot))

    def _sweep_waiters(self) -> None:
        keeper, table = self.keeper, self.keeper.table
        if not table.waiters and not table.hwm():
            return
        if not keeper.lock_header():
            return  # next sweep, then
        try:
            table.repair_waiters()
            dead = {pid for pid in set(table.waiter_pids()) if not self._alive(pid, 0.0)}
            if dead:
                table.drop_waiters_of(dead)
        finally:
            keeper.unlock_header()
        if table.waiters:
            # A wake lost to a waker that died mid-way: hand the turn on.
            for db in keeper.idle_by_db(self.pool):
                keeper.wake(1, db)

    def health_check(self, now: float) -> None:
        """An idle connection with EOF or bytes nobody asked for is dead or dirty."""
        keeper, table = self.keeper, self.keeper.table
        for slot in self.pool.in_state(SlotState.SHARED):
            index, generation = slot.index, slot.generation
            if table.state_of(index) != RowState.READY or not keeper.try_lock(index, generation):
                continue
            if table.state_of(index) == RowState.READY and not slot.backend.is_quiet():
                self._perform(self.pool.health_check_failed(index, generation, now))
            else:
                keeper.unlock(index)
        self._redispatch(now)

    def reap_pid(self, pid: int, now: float, drop_channels: Callable[[int], None]) -> int:
        """A server reports a worker dead: sweep its rows now; return how many leases were reaped.

        A pid that is still alive is left alone: the integration may be
        wrong, or the pid already reused.
        """
        if pid <= 0:
            return 0
        if alive_by_psutil(pid, 0.0):
            log.info("asked to reap pid %d, which is alive: left alone", pid)
            return 0
        held = self.keeper.held_by(self.pool, pid)
        drop_channels(pid)
        self.sweep(now)
        return held - self.keeper.held_by(self.pool, pid)


def _settled_or_none(table: tbl.Table, index: int) -> tbl.Row | None:
    try:
        return table.row_settled(index)
    except tbl.RowError:
        return None


def alive_by_psutil(pid: int, create_time: float) -> bool:
    """psutil's view; a zombie is dead, and a reused pid is somebody else."""
    try:
        process = psutil.Process(pid)
        if create_time and abs(process.create_time() - create_time) > 0.01:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except (psutil.AccessDenied, OSError):
        return True  # cannot tell (no permission, no fds left): never reap on a guess
