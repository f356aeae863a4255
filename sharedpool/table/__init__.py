"""The lease table: a memfd shared by the manager and every worker (DESIGN, "The lease table").

Taking a lease is locking one byte of this file with an open-file-description
lock and writing the slot's row; giving it back is writing the row and
unlocking. No frame, no manager wake-up. The manager reads the rows to do
everything else (repair, trimming, leak warnings, stats), and treats them as
untrusted: any worker can write any byte here.

Each row carries the database its connection is SELECTed to (the manager
writes it) and a flags byte (``RowFlag``, the holder's); each waiter entry
the database it waits for. A worker takes only READY rows of its database.

Layout (native byte order; every process of a host shares the CPU), in ``layout``::

    0            header (HEADER_SIZE bytes)
    ROWS_AT      capacity rows of ROW_SIZE bytes, one per slot
    waiters_at   waiter_capacity entries of WAITER_SIZE bytes

Locks (``locks``) live far beyond the end of the file (a lock needs no bytes to exist):

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
    HELD, lock held --manager asks it back (revoke request)--> the holder gives it back BROKEN

The manager never writes a row whose lock a live holder has: to take a
lease back it writes only the revoke request (bytes the holders never
write) and shuts the connection down; the next generation is written
once the lock is free or the holder dead (``Table.take_in_place``).

``mapped.Table`` is one process's mapping of the file and the moves made on it;
a lease's own take and give-back are its ``core`` (``core.py``: the C
accelerator or its pure-Python twin, one call each).
"""

from sharedpool.table.layout import (
    BUCKET_BOUNDS_S,
    HEADER_SIZE,
    HISTOGRAM_BUCKETS,
    LAYOUT_VERSION,
    MAGIC,
    MAX_DB,
    RETIRE_NOW,
    ROW_SIZE,
    ROWS_AT,
    WAITER_SIZE,
    Flag,
    Outcome,
    Row,
    RowError,
    RowFlag,
    RowState,
    WaiterState,
    bucket,
    found_abandoned,
    give_back,
    percentile,
    still_mine,
    table_size,
    take,
    was_revoked,
)
from sharedpool.table.locks import (
    ALIVE_LOCK,
    HEADER_LOCK,
    is_locked,
    lock_wait,
    lock_within,
    own_description,
    slot_lock,
    try_lock,
    unlock,
    wake_address,
)
from sharedpool.table.mapped import Table

__all__ = [
    "ALIVE_LOCK",
    "BUCKET_BOUNDS_S",
    "HEADER_LOCK",
    "HEADER_SIZE",
    "HISTOGRAM_BUCKETS",
    "LAYOUT_VERSION",
    "MAGIC",
    "MAX_DB",
    "RETIRE_NOW",
    "ROWS_AT",
    "ROW_SIZE",
    "WAITER_SIZE",
    "Flag",
    "Outcome",
    "Row",
    "RowError",
    "RowFlag",
    "RowState",
    "Table",
    "WaiterState",
    "bucket",
    "found_abandoned",
    "give_back",
    "is_locked",
    "lock_wait",
    "lock_within",
    "own_description",
    "percentile",
    "slot_lock",
    "still_mine",
    "table_size",
    "take",
    "try_lock",
    "unlock",
    "wake_address",
    "was_revoked",
]
