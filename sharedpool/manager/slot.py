"""A slot: one numbered place for a Redis connection (one row of the lease
table), the states it can be in, and why a leased connection is taken back.

Replacing a slot's connection bumps its *generation*: a worker's cached fd
of an older generation is never mistaken for the current one, and the
slot's lock byte moves with it (``table.slot_lock``). Which moves between
states are allowed, and the one function that makes them, are the pool's
(``pool.py``: ``_ALLOWED_MOVES``, ``_move``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class SlotState(enum.Enum):
    EMPTY = "empty"  # no connection; the row says CLOSED
    CONNECTING = "connecting"  # the row says MANAGER
    SHARED = "shared"  # in the table: READY or HELD, moved by the workers
    MANAGED = "managed"  # the manager holds the slot's lock (reset, repair); row MANAGER

    __hash__ = object.__hash__  # identity: cheaper than Enum's hash of the name


class ReapCause(enum.Enum):
    """Why a leased connection was taken back and replaced."""

    HOLDER_CLOSED = "holder_closed"  # row HELD, lock free: the holder vanished mid-lease
    HOLDER_DEAD = "holder_dead"  # holder dead by psutil, lock kept by an orphaned child
    BROKEN = "broken"  # the holder said so
    REVOKED = "revoked"  # max_lease_time


@dataclass(eq=False)
class Slot:
    index: int
    state: SlotState = SlotState.EMPTY
    generation: int = 0
    backend: Any = None
    idle_since: float = 0.0
    expires_at: float = float("inf")
    # Replace instead of reusing when the current lease ends (reconnect, reload).
    retire: bool = False
    # The last lease number seen in the row: a new one restarts the idle clock.
    seen_seq: int = 0
    leak_warned_seq: int = 0
    db: int = 0  # the database its connection is SELECTed to (the last one, while EMPTY)
    # Its connection was shut down (revoked, scribbled row) while a live
    # holder had the lock: the slot's next generation waits for that lock.
    shut: bool = False

    def __repr__(self) -> str:
        return f"<Slot {self.index} db {self.db} gen {self.generation} {self.state.value}>"
