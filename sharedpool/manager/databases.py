"""Per-database accounting for dispatch: how many connections each database
needs, in which order they are opened, and which idle connections of other
databases are rebound to it once ``max_connections`` leaves nothing to open.

Each open slot belongs to one database (``Slot.db``, written in its row).
``max_connections`` bounds the slots of all databases together,
``Limits.max_per_database`` each one's; ``min_idle`` applies to each *warm*
database (``Limits.warm_databases``). Dispatch opens, round-robin between
the databases that need it (the default one first), what their waiters,
DEMANDs and ``min_idle`` call for. When the global cap leaves nothing to
open and a database still has waiters, an idle slot of another database is
*rebound*: one the sweep holds the lock of, of a database with no waiters
of its own, idle the longest first; one its database keeps beyond its
``min_idle`` is taken first, but waiters beat idle floors: a floor is kept
for a database's own future use, while a waiter is a caller's wait that
``acquire_timeout`` will end in a ``PoolTimeout``. Once no database waits, a
warm database short of its ``min_idle`` takes back a connection another
database keeps beyond its own floor, so the floor refills without waiting
for ``idle_timeout``. The slot is RESET and SELECTs the new database, then
is published READY for it.

Arithmetic over counts only: the pool (``pool.py``) moves the slots and
counts the rebinds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sharedpool.manager.actions import Limits
from sharedpool.manager.slot import Slot


def needs(
    limits: Limits, asked: Mapping[int, int], idle: Mapping[int, int], connecting: Mapping[int, int],
    in_db: Mapping[int, int],
) -> dict[int, int]:
    """Connections to open per database: what its waiters asked for, plus what
    ``min_idle`` lacks, less what is ``connecting``, within ``max_per_database``
    (``in_db``: the database's slots that are not EMPTY)."""
    need: dict[int, int] = {}
    for db in sorted({*asked, *limits.warm_databases}):
        wanted = asked.get(db, 0) + max(0, limits.min_idle_of(db) - idle.get(db, 0)) - connecting.get(db, 0)
        if limits.max_per_database:
            wanted = min(wanted, limits.max_per_database - in_db.get(db, 0))
        if wanted > 0:
            need[db] = wanted
    return need


def opening_order(need: Mapping[int, int], default_db: int) -> list[int]:
    """The default database first, then by number."""
    return sorted(need, key=lambda db: (db != default_db, db))


def share_out(need: Mapping[int, int], order: Sequence[int], budget: int) -> list[int]:
    """The database of each connection ``budget`` allows to open, round-robin in
    ``order``: one busy database cannot take every free slot from the others."""
    left = dict(need)
    picks: list[int] = []
    while budget > 0 and left:
        for db in order:
            if budget <= 0 or not left.get(db):
                continue
            picks.append(db)
            budget -= 1
            left[db] -= 1
        left = {db: n for db, n in left.items() if n > 0}
    return picks


def rebinds(
    limits: Limits, order: Sequence[int], asked: Mapping[int, int], coming: Mapping[int, int],
    idle: Mapping[int, int], in_db: Mapping[int, int], donors: Sequence[Slot],
) -> tuple[list[tuple[Slot, int]], bool]:
    """The idle ``donors`` to rebind, each with its new database, in order; and
    whether a database is still short of connections with no donor left for it.

    A database is short by what its waiters ``asked`` less what is ``coming``
    (opening, reset or rebound for it) and ``idle``. Any database that waits
    for nothing lends an idle one to it, its ``min_idle`` or not (those above
    the floor first). When nobody waits, a warm database below its
    ``min_idle`` takes one only from what another keeps beyond its own floor.
    """
    spare = dict(idle)
    counts = dict(in_db)
    candidates = sorted(donors, key=lambda slot: slot.idle_since)
    used: set[int] = set()
    plan: list[tuple[Slot, int]] = []
    still_short = False

    def lender(db: int, floor_kept: bool) -> Slot | None:
        for beyond_floor in (True, False) if not floor_kept else (True,):
            for slot in candidates:
                if slot.index in used or slot.db == db or asked.get(slot.db):
                    continue
                keep = limits.min_idle_of(slot.db) if beyond_floor else 0
                if spare.get(slot.db, 0) > keep:
                    return slot
        return None

    def lend(donor: Slot, db: int) -> None:
        used.add(donor.index)
        spare[donor.db] -= 1
        counts[donor.db] -= 1
        counts[db] = counts.get(db, 0) + 1
        plan.append((donor, db))

    for db in order:
        for _ in range(asked.get(db, 0) - coming.get(db, 0) - idle.get(db, 0)):
            if limits.max_per_database and counts.get(db, 0) >= limits.max_per_database:
                break
            donor = lender(db, floor_kept=False)
            if donor is None:
                still_short = True
                break
            lend(donor, db)
    if any(asked.values()):
        return plan, still_short
    for db in limits.warm_databases:
        for _ in range(limits.min_idle_of(db) - coming.get(db, 0) - spare.get(db, 0)):
            if limits.max_per_database and counts.get(db, 0) >= limits.max_per_database:
                break
            donor = lender(db, floor_kept=True)
            if donor is None:
                break
            lend(donor, db)
            spare[db] = spare.get(db, 0) + 1
    return plan, still_short
