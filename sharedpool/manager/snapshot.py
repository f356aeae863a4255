"""The stats snapshot: what ``sharedpool stats``, STATS replies and the
Prometheus metrics show. Counter names live in ``sharedpool.stats``; leases
taken and given back are read from the lease table, where workers count them."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from sharedpool import stat_keys
from sharedpool import table as tbl
from sharedpool.db_ranges import format_databases
from sharedpool.manager.pool_state import SlotState
from sharedpool.table import RowFlag, RowState
from sharedpool.table import core as table_core
from sharedpool.version import __version__

if TYPE_CHECKING:
    from sharedpool.manager.context import ManagerContext


# More leases than one slot's row can take in a second (a lease costs microseconds):
# a lease number that moved faster than this was written by a scribbler.
_MAX_LEASES_PER_S = 2_000_000
_SLACK = 1000
_U64 = 0xFFFF_FFFF_FFFF_FFFF


class LeaseTally:
    """Counts workers keep in the table (leases taken, the wait and hold histograms), read as untrusted input.

    Any worker can write any byte there. A slot's count is taken only by the
    steps a worker could have made since we last read it, forward; a jump
    (2**64 - 1, or back) is not counted, and counting goes on from there. So
    a published total never goes back within an epoch and never shows a
    count no worker could have made.
    """

    def __init__(self, started_at: float) -> None:
        self._started_at = started_at
        self._totals: dict[object, int] = {}
        self._seen: dict[tuple[object, int], tuple[int, float]] = {}  # (series, slot) -> (value, when read)

    def read(self, series: object, slot: int, value: int, now: float) -> None:
        last, at = self._seen.get((series, slot), (0, self._started_at))
        step = (value - last) & _U64
        if step and step <= _SLACK + (now - at) * _MAX_LEASES_PER_S:
            self._totals[series] = self._totals.get(series, 0) + step
        self._seen[(series, slot)] = (value, now)

    def total(self, series: object) -> int:
        return self._totals.get(series, 0)

    def histograms(self, table: tbl.Table, slots: int, now: float) -> tuple[list[int], list[int]]:
        """The wait and hold histograms of ``slots`` rows, each bucket tallied as above."""
        for slot in range(min(slots, table.capacity)):
            waits, holds = table.row_histograms(slot)
            for index in range(tbl.HISTOGRAM_BUCKETS):
                self.read(("wait", index), slot, waits[index], now)
                self.read(("hold", index), slot, holds[index], now)
        return (
            [self.total(("wait", index)) for index in range(tbl.HISTOGRAM_BUCKETS)],
            [self.total(("hold", index)) for index in range(tbl.HISTOGRAM_BUCKETS)],
        )


def snapshot(manager: ManagerContext, max_workers: int | None = None) -> dict[str, Any]:
    """The stats. ``max_workers`` caps the per-worker rows (busiest first) so a
    host with thousands of workers still fits one frame."""
    pool, table, config = manager.pool, manager.keeper.table, manager.config
    now = time.monotonic()
    held_by: dict[int, int] = {}
    idle = held = subscribers = blocking = 0
    databases = {db: dict.fromkeys(stat_keys.DATABASE_KEYS, 0) for db in pool.limits.warm_databases}
    for db, count in table.waiters_by_db().items():
        if pool.serves(db):
            databases.setdefault(db, dict.fromkeys(stat_keys.DATABASE_KEYS, 0))[stat_keys.DB_WAITING] = count
    for slot in pool.slots:
        try:
            row = table.row(slot.index)
        except tbl.RowError:
            continue
        manager.lease_tally.read(stat_keys.GRANTED, slot.index, row.lease_seq, now)
        if slot.state is SlotState.EMPTY:
            continue
        per_db = databases.setdefault(slot.db, dict.fromkeys(stat_keys.DATABASE_KEYS, 0))
        per_db[stat_keys.DB_OPEN] += 1
        if slot.state is not SlotState.SHARED or row.generation != slot.generation or row.db != slot.db:
            continue
        if row.state is RowState.READY:
            idle += 1
            per_db[stat_keys.DB_IDLE] += 1
        elif row.state is RowState.HELD:
            held += 1
            per_db[stat_keys.DB_HELD] += 1
            held_by[row.holder_pid] = held_by.get(row.holder_pid, 0) + 1
            if row.flags & RowFlag.SUBSCRIBER:
                subscribers += 1
                per_db[stat_keys.DB_SUBSCRIBERS] += 1
            if row.flags & RowFlag.BLOCKING:
                blocking += 1
    channels = manager.control.channels_by_pid()
    workers = [
        {"pid": pid, "leases_held": held_by.get(pid, 0), "control_connections": channels.get(pid, 0)}
        for pid in sorted(set(held_by) | set(channels))
    ]
    waits, holds = manager.lease_tally.histograms(table, len(pool.slots), now)
    counters = dict(pool.counters)
    granted = manager.lease_tally.total(stat_keys.GRANTED)
    counters[stat_keys.GRANTED] = granted
    counters[stat_keys.RELEASED] = max(0, granted - held)
    return {
        "pool": config.pool_name,
        "state": manager.state.value,
        "epoch": manager.epoch,
        "manager_pid": os.getpid(),
        "version": __version__,
        stat_keys.TABLE_CORE: table_core.PATH,
        "uptime_s": round(now - manager.started_at, 3),
        "redis": manager.target.label,
        "redis_down_for_s": round(now - pool.redis_down_since, 3) if pool.redis_down_since is not None else None,
        "last_redis_error": pool.last_connect_error,
        "connections": {
            "open": pool.open_connections,
            "idle": idle,
            "leased": held,
            "connecting": pool.count(SlotState.CONNECTING),
            "resetting": pool.count(SlotState.MANAGED),
            "max": config.max_connections,
        },
        "leases": {"held": held, "waiting": max(0, table.waiters)},
        stat_keys.SUBSCRIBERS: subscribers,
        stat_keys.BLOCKING: blocking,
        "default_db": pool.limits.default_db,
        "databases_served": format_databases(pool.limits.databases),
        # Keyed by the database's number as text (JSON keys are strings).
        stat_keys.DATABASES: {str(db): databases[db] for db in sorted(databases)},
        "paused": pool.paused,
        "control_connections": len(manager.control),
        "counters": counters,
        "wait_time": stat_keys.from_histogram(waits),
        "hold_time": stat_keys.from_histogram(holds),
        "workers": _top_workers(workers, max_workers),
        "workers_total": len(workers),
        "config": config.safe_dict(),
        **({stat_keys.SENTINEL: manager.sentinel.describe()} if manager.sentinel is not None else {}),
    } | ({stat_keys.CLUSTER: manager.cluster.stats()} if manager.cluster is not None else {})


def _top_workers(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is not None and len(rows) > limit:
        rows = sorted(rows, key=lambda w: (-w["leases_held"], -w["control_connections"], w["pid"]))[:limit]
    return sorted(rows, key=lambda w: w["pid"])
