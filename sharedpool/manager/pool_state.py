"""The manager's pool core: a pure state machine, no sockets, no clocks of its own.

With the lease table, workers take and give back leases without the
manager; what stays here is the life of each slot's *connection*: opening,
sharing it through the table, resetting, replacing, trimming. Every entry
point takes ``now`` and returns the I/O still to do as a list of actions;
the loop (``loop.py``) performs them. Slots (``slot.py``) move between
states only through ``_move``, which refuses impossible transitions, and
each state has one collection, so counts are ``len()`` of a collection.
Each counter is written where its transition happens: a connection's end
is counted, with its cause, in ``_discard``.

What is decided elsewhere and acted on here: how many connections each
database needs and which idle slots are rebound (``databases.py``), and
what each row the sweep read calls for (``sweep.py``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sharedpool import stat_keys
from sharedpool.db_ranges import format_databases
from sharedpool.manager import databases
from sharedpool.manager.actions import (
    Action,
    CloseConnection,
    Expire,
    Limits,
    OpenConnection,
    Publish,
    Release,
    RequestRevoke,
    ResetConnection,
    RowView,
    ShutDown,
    Wake,
)
from sharedpool.manager.slot import ReapCause, Slot, SlotState
from sharedpool.manager.sweep import End, GiveBack, Note, Revoke, Shut, judge
from sharedpool.table import RETIRE_NOW, Outcome, RowState

__all__ = ["Pool", "ReapCause", "Slot", "SlotState"]

log = logging.getLogger("sharedpool.manager")


_ALLOWED_MOVES: dict[SlotState, frozenset[SlotState]] = {
    SlotState.EMPTY: frozenset({SlotState.CONNECTING}),
    SlotState.CONNECTING: frozenset({SlotState.SHARED, SlotState.EMPTY}),
    SlotState.SHARED: frozenset({SlotState.MANAGED, SlotState.EMPTY}),
    SlotState.MANAGED: frozenset({SlotState.SHARED, SlotState.EMPTY}),
}


_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 5.0
_DEMAND_PROBE_S = 0.05
# Call-site texts kept per (pid, site id): a bound, for workers that invent sites.
_MAX_SITES = 100_000


class Pool:
    def __init__(self, limits: Limits, capacity: int, rng: Callable[[], float] = random.random) -> None:
        self.limits = limits
        self.capacity = capacity
        self._rng = rng
        self.slots = [Slot(i) for i in range(capacity)]
        self._by_state: dict[SlotState, dict[int, Slot]] = {s: {} for s in SlotState}
        for slot in self.slots:
            self._by_state[SlotState.EMPTY][slot.index] = slot
        self.shutting_down = False
        self.paused = False
        self.redis_down_since: float | None = None
        self.last_connect_error = ""
        self.last_failure_at = 0.0
        self._connect_failures = 0
        self.next_connect_at = 0.0
        self.demand: dict[int, int] = {}  # db -> waiters that asked for a connection since the last dispatch
        # Non-EMPTY slots per database (the per-database cap, stats).
        self._in_db: dict[int, dict[int, Slot]] = {}
        # A database's waiters found no room and no idle slot to rebind: the
        # loop sweeps at once, which offers the idle slots of the others.
        self.rebind_wanted = False
        self.redis_databases: int | None = None  # what CONFIG GET databases said, once asked
        self.counters: dict[str, int] = {name: 0 for name in stat_keys.COUNTERS}
        self.sites: dict[tuple[int, int], str] = {}  # (pid, call-site id) -> text

    # ----- bookkeeping -------------------------------------------------

    def _move(self, slot: Slot, new: SlotState) -> None:
        old = slot.state
        if new not in _ALLOWED_MOVES[old]:
            raise AssertionError(f"slot {slot.index}: impossible move {old.value} -> {new.value}")
        del self._by_state[old][slot.index]
        self._by_state[new][slot.index] = slot
        slot.state = new
        if old is SlotState.EMPTY:
            self._in_db.setdefault(slot.db, {})[slot.index] = slot
        elif new is SlotState.EMPTY:
            del self._in_db[slot.db][slot.index]

    def count(self, state: SlotState) -> int:
        return len(self._by_state[state])

    def in_state(self, state: SlotState) -> list[Slot]:
        return list(self._by_state[state].values())

    @property
    def open_connections(self) -> int:
        return self.count(SlotState.SHARED) + self.count(SlotState.MANAGED)

    def in_db(self, db: int) -> int:
        """Slots of ``db`` that are not EMPTY (open, connecting or in repair)."""
        return len(self._in_db.get(db, ()))

    def open_by_db(self) -> dict[int, int]:
        """Open, connecting or in-repair connections of each database that has any."""
        return {db: len(slots) for db, slots in sorted(self._in_db.items()) if slots}

    def serves(self, db: int) -> bool:
        return db in self.limits.databases

    def __repr__(self) -> str:
        return (
            f"<Pool {self.limits.pool_name!r} [conns: {self.open_connections} open, "
            f"{self.count(SlotState.CONNECTING)} connecting, {self.count(SlotState.MANAGED)} in repair]>"
        )

    def slot(self, index: int, generation: int) -> Slot | None:
        """The slot a worker named, if the name is still true (untrusted input)."""
        if not 0 <= index < len(self.slots):
            return None
        slot = self.slots[index]
        return slot if slot.generation == generation else None

    # ----- opening ----------------------------------------------------------

    def dispatch(
        self, now: float, idle: Mapping[int, int], waiters: Mapping[int, int], donors: Sequence[Slot] = ()
    ) -> list[Action]:
        """Open what each database's waiters, DEMANDs and ``min_idle`` need, within the
        caps; then rebind ``donors`` (idle slots the sweep holds the lock of) towards
        databases still waiting. Donors not rebound are released."""
        limits = self.limits
        actions: list[Action] = []
        demand, self.demand = self.demand, {}
        if self.shutting_down:
            return self._release(donors)
        if now < self.next_connect_at:
            # Backing off: the demand waits for the next attempt.
            for db, count in demand.items():
                self.demand[db] = self.demand.get(db, 0) + count
        connecting = self._by_db(SlotState.CONNECTING)
        asked = {db: max(waiters.get(db, 0), demand.get(db, 0)) for db in {*waiters, *demand} if self.serves(db)}
        need = databases.needs(limits, asked, idle, connecting, self.open_by_db())
        openable = sorted(index for index in self._by_state[SlotState.EMPTY] if index < limits.max_connections)
        budget = len(openable) if now >= self.next_connect_at else 0
        if self.redis_down_since is not None:
            # While Redis is down, probe with one connection at a time.
            budget = min(budget, 1 - self.count(SlotState.CONNECTING))
        order = databases.opening_order(need, limits.default_db)
        for db in databases.share_out(need, order, budget):
            slot = self.slots[openable.pop(0)]
            slot.db = db
            self._move(slot, SlotState.CONNECTING)
            actions.append(Publish(slot.index, slot.generation, RowState.MANAGER, db=db))
            actions.append(OpenConnection(slot.index, slot.generation))
            need[db] -= 1
        self.rebind_wanted = False
        if openable or not any(need.values()):
            return actions + self._release(donors)
        # The global cap is reached: a database whose waiters are not served
        # by what is opening takes an idle slot of a database that waits for nothing.
        coming = self._by_db(SlotState.CONNECTING, SlotState.MANAGED)  # being opened, reset or rebound for it
        plan, self.rebind_wanted = databases.rebinds(limits, order, asked, coming, idle, self.open_by_db(), donors)
        for donor, db in plan:
            actions += self._rebind(donor, db)
        rebound = {donor.index for donor, _ in plan}
        return actions + self._release([slot for slot in donors if slot.index not in rebound])

    def _by_db(self, *states: SlotState) -> dict[int, int]:
        """Slots in ``states``, per database."""
        counts: dict[int, int] = {}
        for state in states:
            for slot in self._by_state[state].values():
                counts[slot.db] = counts.get(slot.db, 0) + 1
        return counts

    def _rebind(self, slot: Slot, db: int) -> list[Action]:
        """Lend an idle connection (its lock held by us) to another database."""
        if self.limits.rebind_reconnects:
            # Cluster nodes (manager/cluster.py): another node is another host, so the
            # slot is closed and opened again towards it.
            log.info("slot %d moved from node %d to node %d (max_connections %d reached)",
                     slot.index, slot.db, db, self.limits.max_connections)
            self.counters[stat_keys.REBOUND] += 1
            actions = self._discard(slot, f"moved to node {db}", 0.0)
            slot.db = db
            self._move(slot, SlotState.CONNECTING)
            return actions + [Publish(slot.index, slot.generation, RowState.MANAGER, db=db),
                              OpenConnection(slot.index, slot.generation)]
        log.info("slot %d rebound from db %d to db %d (max_connections %d reached)",
                 slot.index, slot.db, db, self.limits.max_connections)
        del self._in_db[slot.db][slot.index]
        slot.db = db
        # A generation serves one database: a worker's cached fd of the
        # slot is then never taken for another database's (a scribbled
        # row's database byte cannot lend it), and FETCH_FD checks the rest.
        # The lock we hold stays at the old generation's byte until we publish.
        slot.generation += 1
        self._in_db.setdefault(db, {})[slot.index] = slot
        self._move(slot, SlotState.MANAGED)
        self.counters[stat_keys.REBOUND] += 1
        return [Publish(slot.index, slot.generation, RowState.MANAGER, db=db),
                ResetConnection(slot.index, slot.generation, slot.backend, db)]

    @staticmethod
    def _release(slots: Sequence[Slot]) -> list[Action]:
        return [Release(slot.index, slot.generation) for slot in slots]

    def connected(self, index: int, generation: int, backend: Any, now: float) -> list[Action]:
        slot = self.slot(index, generation)
        if slot is None or slot.state is not SlotState.CONNECTING:
            return [CloseConnection(backend, "no longer wanted")]
        slot.backend = backend
        if self.limits.max_lifetime:
            # Up to 10% earlier, so connections opened together do not all expire together.
            slot.expires_at = now + self.limits.max_lifetime * (1 - 0.1 * self._rng())
        self.counters[stat_keys.OPENED] += 1
        if self.redis_down_since is not None:
            log.info("Redis at %s reachable again after %.1f s", self.limits.redis_label, now - self.redis_down_since)
        self.redis_down_since = None
        self._connect_failures = 0
        self.next_connect_at = 0.0
        if self.shutting_down or slot.retire or index >= self.limits.max_connections or not self.serves(slot.db):
            # Opened before a reconnect or reload asked for new connections
            # (maybe to the old target): never shared as it is.
            self._move(slot, SlotState.SHARED)
            return self._discard(slot, "shutting down" if self.shutting_down else "retired", now)
        return self._share(slot, now)

    def connect_failed(self, index: int, generation: int, error: str, now: float) -> list[Action]:
        slot = self.slot(index, generation)
        if slot is None or slot.state is not SlotState.CONNECTING:
            return []
        slot.generation += 1
        self._move(slot, SlotState.EMPTY)
        self.counters[stat_keys.REDIS_ERRORS] += 1
        self.last_connect_error = error
        self.last_failure_at = now
        self._connect_failures += 1
        delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(self._connect_failures, 20))
        self.next_connect_at = now + delay * (0.5 + self._rng() / 2)
        if self.open_connections == 0 and self.count(SlotState.CONNECTING) == 0 and self.redis_down_since is None:
            self.redis_down_since = now
            log.warning("Redis at %s unreachable: %s", self.limits.redis_label, error)
        actions: list[Action] = [Publish(index, slot.generation, RowState.CLOSED, db=slot.db)]
        if self.redis_down_since is not None:
            # Waiters learn it from the table's flag: wake them to look.
            actions.append(Wake(-1))
        return actions

    def demanded(self, now: float, db: int) -> str:
        """A waiter of ``db`` (served: the handler checked) asked for a connection.
        Returns a refusal text, or '' when opening (or open)."""
        if self.shutting_down:
            return f"pool {self.limits.pool_name!r} is shutting down"
        if self.redis_down_since is not None and self.open_connections == 0:
            # Someone needs Redis now: probe soon rather than after the
            # backoff (at most one attempt per _DEMAND_PROBE_S), so a
            # restarted Redis serves this very request. The waiter stops
            # waiting when the attempt fails too (the table says so).
            self.counters[stat_keys.REFUSED_UNAVAILABLE] += 1
            self.next_connect_at = min(self.next_connect_at, self.last_failure_at + _DEMAND_PROBE_S)
        self.demand[db] = self.demand.get(db, 0) + 1
        return ""

    # ----- what workers gave back ---------------------------------------------------

    def given_back(
        self, index: int, generation: int, outcome: Outcome, now: float, cause: ReapCause | None = None
    ) -> list[Action]:
        """A row says RESET or BROKEN (a REPORT, or the sweep); the loop holds its lock."""
        slot = self.slot(index, generation)
        if slot is None or slot.state is not SlotState.SHARED:
            return []
        if slot.shut:
            return self._discard(slot, "given back after it was shut down", now)  # counted when it was revoked
        if cause is not None:
            log.warning("reaped slot %d (%s): connection replaced", index, cause.value)
            return self._discard(slot, f"reaped: {cause.value}", now, stat_keys.reaped_key(cause.value))
        if slot.retire or self.shutting_down or now >= slot.expires_at:
            # Given back BROKEN by a holder that saw the expiry: recycling, not breakage.
            return self._discard(slot, "retired", now, stat_keys.RECYCLED if now >= slot.expires_at else None)
        if outcome is Outcome.BROKEN:
            return self._discard(slot, "returned broken", now, stat_keys.reaped_key(ReapCause.BROKEN.value))
        self.counters[stat_keys.RESETS] += 1
        self._move(slot, SlotState.MANAGED)
        return [
            Publish(index, generation, RowState.MANAGER, db=slot.db), ResetConnection(index, generation, slot.backend, slot.db)
        ]

    def reset_done(self, index: int, generation: int, ok: bool, now: float, error: str = "") -> list[Action]:
        slot = self.slot(index, generation)
        if slot is None or slot.state is not SlotState.MANAGED:
            return []
        if not ok:
            log.warning("reset of slot %d failed (%s): connection replaced", index, error)
            return self._discard(slot, "reset failed", now)
        if (self.shutting_down or slot.retire or now >= slot.expires_at or index >= self.limits.max_connections
                or not self.serves(slot.db)):
            return self._discard(slot, "retired", now)
        return self._share(slot, now)

    def peer_closed(self, index: int, generation: int, locked: bool, now: float) -> list[Action]:
        """Redis closed a connection (restart, ``timeout``). With its lock (idle): replace
        now, without counting it as Redis being down; held: its holder will report."""
        slot = self.slot(index, generation)
        if slot is None or slot.state is not SlotState.SHARED:
            return [Release(index, generation)] if locked else []
        if not locked:
            slot.retire = True
            return []
        return self._discard(slot, "closed by Redis", now, stat_keys.HEALTH_CHECK_FAILED)

    # ----- the sweep ---------------------------------------------------------------

    def sweep(
        self, rows: list[RowView], now: float, waiters: Mapping[int, int], idle_elsewhere: Mapping[int, int] | None = None
    ) -> list[Action]:
        """Act on what the rows say (``sweep.judge``): repairs, leak warnings, revocations,
        trimming; then dispatch, offering the idle slots kept for rebinding.

        ``waiters`` and ``idle_elsewhere`` are per database; ``idle_elsewhere``:
        idle connections not among ``rows`` (a sweep of one process's rows), so
        that ``min_idle`` is not over-counted.
        """
        actions: list[Action] = []
        idle = dict(idle_elsewhere or {})
        donors: list[Slot] = []
        for view in rows:
            slot = self.slots[view.index] if 0 <= view.index < len(self.slots) else None
            if slot is None or slot.state is not SlotState.SHARED:
                if view.lock_free:
                    actions.append(Release(view.index, view.generation))
                continue
            verdict = judge(slot, view, now, self.limits, idle.get(slot.db, 0), self.serves(slot.db))
            if isinstance(verdict, End):
                actions += self._discard(slot, verdict.reason, now, verdict.counter)
            elif isinstance(verdict, Revoke):
                actions += self.revoke(slot.index, slot.generation, verdict.seq, stat_keys.reaped_key(ReapCause.REVOKED.value))
            elif isinstance(verdict, Shut):
                slot.shut = True
                actions.append(ShutDown(slot.backend, verdict.reason))
            elif isinstance(verdict, GiveBack):
                actions += self.given_back(slot.index, slot.generation, verdict.outcome, now, verdict.cause)
            elif verdict is Note.LEAK:
                self._warn_leak(slot, view, now)
            elif verdict is Note.IDLE:
                idle[slot.db] = idle.get(slot.db, 0) + 1  # only what stays open counts towards min_idle
                donors.append(slot)  # released by dispatch unless rebound
        return actions + self.dispatch(now, idle, waiters, donors)

    def _warn_leak(self, slot: Slot, view: RowView, now: float) -> None:
        slot.leak_warned_seq = view.lease_seq
        self.counters[stat_keys.LEAK_WARNINGS] += 1
        where = self.sites.get((view.holder_pid, view.call_site), "an unknown place")
        log.warning(
            "possible leak: pid %d has held lease %d (slot %d) for %.1f s (leak_threshold %g s); taken at %s",
            view.holder_pid, view.lease_seq, slot.index, now - view.acquired_at, self.limits.leak_threshold, where,
        )

    # ----- connections -----------------------------------------------------

    def _share(self, slot: Slot, now: float) -> list[Action]:
        self._move(slot, SlotState.SHARED)
        slot.idle_since = now
        expires_at = slot.expires_at if slot.expires_at != float("inf") else 0.0
        return [Publish(slot.index, slot.generation, RowState.READY, expires_at=expires_at, db=slot.db), Wake(1, slot.db)]

    def _retire(self, slots: list[Slot]) -> list[Action]:
        actions: list[Action] = []
        for slot in slots:
            if slot.state is not SlotState.EMPTY:
                slot.retire = True
            if slot.state is SlotState.SHARED:
                actions.append(Expire(slot.index, RETIRE_NOW))
        return actions

    def revoke(self, index: int, generation: int, seq: int, counter: str | None = None) -> list[Action]:
        """Ask lease ``seq`` back from its live holder, whose lock we never write under:
        the connection is shut down, and replaced when the holder gives it back
        (BROKEN) or its lock is free (the sweep)."""
        slot = self.slot(index, generation)
        if slot is None or slot.state is not SlotState.SHARED or slot.shut:
            return []
        slot.shut = True
        if counter is not None:
            self.counters[counter] += 1
        return [RequestRevoke(index, generation, seq, slot.backend)]

    def revoke_missed(self, index: int, generation: int) -> None:
        """The lease asked back had ended before the request reached the row: the
        connection was not shut down and serves on (the next lease is no one's to revoke)."""
        slot = self.slot(index, generation)
        if slot is not None:
            slot.shut = False

    def _discard(self, slot: Slot, reason: str, now: float, counter: str | None = None) -> list[Action]:
        """End the slot's connection; ``counter``: the count of why it ended, beside ``connections_closed``."""
        backend = slot.backend
        slot.backend = None
        slot.generation += 1
        slot.retire = slot.shut = False
        slot.expires_at = float("inf")
        self._move(slot, SlotState.EMPTY)
        self.counters[stat_keys.CLOSED] += 1
        if counter is not None:
            self.counters[counter] += 1
        actions: list[Action] = [CloseConnection(backend, reason)] if backend is not None else []
        actions.append(Publish(slot.index, slot.generation, RowState.CLOSED, db=slot.db))
        return actions

    def health_check_failed(self, index: int, generation: int, now: float) -> list[Action]:
        """An idle connection was found closed by Redis or dirty; the loop holds its lock."""
        slot = self.slot(index, generation)
        if slot is None or slot.state is not SlotState.SHARED:
            return []
        log.warning("health check: idle slot %d closed by Redis or holding stray data; replaced", index)
        return self._discard(slot, "health check failed", now, stat_keys.HEALTH_CHECK_FAILED)

    def expected_row(self, slot: Slot) -> RowState:
        """What the row of a slot the workers do not own must say (the manager wrote it)."""
        return RowState.CLOSED if slot.state is SlotState.EMPTY else RowState.MANAGER

    def rewrite_row(self, slot: Slot) -> list[Action]:
        """The row of a slot the workers do not own was scribbled: write it again."""
        log.warning("slot %d: row scribbled while the slot is %s: rewritten", slot.index, slot.state.value)
        self.counters[stat_keys.TABLE_REPAIRS] += 1
        return [Publish(slot.index, slot.generation, self.expected_row(slot), db=slot.db)]

    # ----- call sites, for leak warnings ------------------------------------------

    def note_site(self, pid: int, site_id: int, text: str) -> None:
        if len(self.sites) < _MAX_SITES:
            self.sites[(pid, site_id)] = text

    def forget_sites(self, pid: int) -> None:
        for key in [k for k in self.sites if k[0] == pid]:
            del self.sites[key]

    # ----- admin, reload, shutdown --------------------------------------------

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> list[Action]:
        self.paused = False
        return [Wake(-1)]

    def retire_db(self, db: int) -> list[Action]:
        """Replace the connections of one database (a cluster node whose role changed)."""
        return self._retire([slot for slot in self.slots if slot.db == db])

    def retire_all(self) -> list[Action]:
        """Replace every connection: idle ones at the next sweep, leased ones when they come back."""
        return self._retire(self.slots)

    def limit_databases(self, count: int) -> None:
        """Redis says it has ``count`` databases (CONFIG GET databases): serve none beyond."""
        self.redis_databases = count
        limits = self.limits
        served = tuple(db for db in limits.databases if db < count or db == limits.default_db)
        if served != limits.databases:
            log.warning(
                "Redis at %s has %d databases (CONFIG GET databases): not serving db %s of the configured %s",
                limits.redis_label, count, format_databases(tuple(set(limits.databases) - set(served))),
                format_databases(limits.databases),
            )
            limits.databases = served
            limits.warm_databases = tuple(db for db in limits.warm_databases if db in served)

    def apply_limits(self, limits: Limits) -> list[Action]:
        """Reload: new limits take effect at once; extra slots drain at the sweep."""
        if limits.max_connections > self.capacity:
            log.warning(
                "max_connections %d is above the lease table's %d rows: using %d until a restart",
                limits.max_connections, self.capacity, self.capacity,
            )
            limits.max_connections = self.capacity
        self.limits = limits
        if self.redis_databases is not None:
            self.limit_databases(self.redis_databases)
        return self._retire(self.slots[limits.max_connections:])

    def begin_shutdown(self) -> list[Action]:
        self.shutting_down = True
        return self._retire(self.slots) + [Wake(-1)]

    def close_all(self, now: float) -> list[Action]:
        """End of grace: close every connection, held or not."""
        actions: list[Action] = []
        for slot in self.slots:
            if slot.state in (SlotState.SHARED, SlotState.MANAGED):
                actions += self._discard(slot, "shutting down", now)
        return actions
