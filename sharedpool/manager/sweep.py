"""The sweep's decisions from rows: what one shared slot's row and lock, as
the sweep read them, call for.

``judge`` returns a verdict and logs why when it ends a connection: take
the connection back from a holder that closed or died, revoke a lease held
past ``max_lease_time``, warn of a possible leak, end a connection whose
row was scribbled, or, for an idle one, close it when it is retired, past
its lifetime or idle past ``idle_timeout`` (beyond ``min_idle``), else keep
it (a donor for rebinding). The pool (``pool.py``) acts on the verdict: it
makes the moves and writes the counters. The only slot fields written here
are the sweep's own notes: the lease number it last saw and, with it, the
start of the idle clock.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from sharedpool import stat_keys
from sharedpool.manager.actions import Limits, RowView
from sharedpool.manager.slot import ReapCause, Slot
from sharedpool.table import Outcome, RowState

log = logging.getLogger("sharedpool.manager")


@dataclass(frozen=True, slots=True)
class End:
    """End the slot's connection; ``counter``: the count of why, beside ``connections_closed``."""

    reason: str
    counter: str | None = None


@dataclass(frozen=True, slots=True)
class GiveBack:
    """Handle the connection as given back (the sweep now holds its lock)."""

    outcome: Outcome
    cause: ReapCause | None = None


@dataclass(frozen=True, slots=True)
class Revoke:
    """Ask the live holder of lease ``seq`` for it back and shut its connection down;
    the connection ends when the holder gives it back or its lock is free."""

    seq: int


@dataclass(frozen=True, slots=True)
class Shut:
    """Shut the connection down now (a live holder has the lock); end it once the lock is free."""

    reason: str


class Note(enum.Enum):
    IDLE = "idle"  # stays open and idle: counts towards min_idle, may be rebound
    LEAK = "leak"  # held past leak_threshold, not yet warned of


Verdict = End | GiveBack | Revoke | Shut | Note | None  # None: nothing to do


def judge(slot: Slot, view: RowView, now: float, limits: Limits, idle_in_db: int, served: bool) -> Verdict:
    """What the row of ``slot`` (SHARED) calls for. ``idle_in_db``: idle connections
    of its database kept so far; ``served``: whether its database still is."""
    if view.state is None or view.generation != slot.generation or view.db != slot.db:
        # Scribbled: nobody can say who uses this connection (or which
        # database a taker would expect of it). Replace it; a live holder
        # of its lock first sees it shut down, and the row is ours to write
        # once that lock is free.
        if not view.lock_free:
            return _shut(slot, "row unreadable or of another generation or database")
        log.warning("slot %d: row unreadable or of another generation: connection replaced", slot.index)
        return End("row scribbled", stat_keys.TABLE_REPAIRS)
    if view.state is RowState.HELD:
        if view.lock_free:
            return GiveBack(Outcome.BROKEN, ReapCause.HOLDER_CLOSED)
        if slot.shut and view.holder_alive:
            return None  # asked back and shut down: its holder gives it back, or its lock goes with it
        if not view.holder_alive:
            # Its lock outlives it in an orphaned child (DESIGN fact 12):
            # a new generation leaves that lock behind.
            log.warning(
                "slot %d: holder pid %d is dead but its lock lives on (a child kept it): connection replaced",
                slot.index, view.holder_pid,
            )
            return End("holder dead", stat_keys.reaped_key(ReapCause.HOLDER_DEAD.value))
        return _held(slot, view, now, limits)
    if view.state in (RowState.RESET, RowState.BROKEN):
        if not view.lock_free:
            return None
        return GiveBack(Outcome.BROKEN if view.state is RowState.BROKEN else Outcome.NEEDS_RESET)
    if view.state is not RowState.READY:
        if not view.lock_free:
            return _shut(slot, f"row says {view.state.name} in a shared slot")
        return End(f"row says {view.state.name} in a shared slot", stat_keys.TABLE_REPAIRS)
    if view.revoke_asked or slot.shut:
        # Given back READY by a holder that read its row before our request
        # reached it (takers leave such a row alone), or READY again after
        # we shut it down: the connection is gone, replace it.
        return End("revoked lease given back") if view.lock_free else None
    if view.lease_seq != slot.seen_seq:
        slot.seen_seq = view.lease_seq
        slot.idle_since = now
    if not view.lock_free:
        return None  # being taken right now
    if slot.retire or slot.index >= limits.max_connections or not served:
        return End("retired")
    if now >= slot.expires_at:
        return End("max_lifetime reached", stat_keys.RECYCLED)
    if limits.idle_timeout and now - slot.idle_since >= limits.idle_timeout and idle_in_db >= limits.min_idle_of(slot.db):
        return End("idle_timeout", stat_keys.IDLE_CLOSED)
    return Note.IDLE


def _shut(slot: Slot, reason: str) -> Shut | None:
    if slot.shut:
        return None
    log.warning("slot %d: %s, its lock held: connection shut down, replaced once the lock is free", slot.index, reason)
    return Shut(reason)


def _held(slot: Slot, view: RowView, now: float, limits: Limits) -> Verdict:
    if view.subscriber:
        # Subscribed mode lasts as long as its subscriber does: neither a
        # leak nor a lease to revoke (max_connections still bounds them).
        return None
    age = now - view.acquired_at
    if limits.max_lease_time and age >= limits.max_lease_time:
        log.warning(
            "revoked lease %d of pid %d (slot %d) after %.1f s: max_lease_time=%g s",
            view.lease_seq, view.holder_pid, slot.index, age, limits.max_lease_time,
        )
        return Revoke(view.lease_seq)
    if limits.leak_threshold and age >= limits.leak_threshold and slot.leak_warned_seq != view.lease_seq:
        return Note.LEAK
    return None
