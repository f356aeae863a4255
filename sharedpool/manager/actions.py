"""What the pool core reads and returns: the rows the sweep read, the limits
it enforces, and the actions (the I/O the loop must do after a decision)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sharedpool.config import ManagerConfig
from sharedpool.db_ranges import DEFAULT_DATABASES
from sharedpool.table import RowState


@dataclass
class Limits:
    """The subset of the config the state machine needs; replaced live on reload."""

    max_connections: int = 10
    min_idle: int = 1  # per warm database
    databases: tuple[int, ...] = DEFAULT_DATABASES  # served
    default_db: int = 0
    warm_databases: tuple[int, ...] = (0,)  # those min_idle applies to
    max_per_database: int = 0  # 0: only max_connections
    redis_label: str = "redis"
    pool_name: str = "default"
    max_lifetime: float = 0.0
    idle_timeout: float = 0.0
    leak_threshold: float = 0.0
    max_lease_time: float = 0.0
    rebind_reconnects: bool = False  # a database is a cluster node (manager/cluster.py): rebinding reconnects

    @classmethod
    def from_config(cls, config: ManagerConfig, redis_label: str) -> Limits:
        names = ("max_connections", "min_idle", "pool_name", "max_lifetime", "idle_timeout", "leak_threshold", "max_lease_time")
        return cls(
            redis_label=redis_label, databases=config.served_databases, default_db=config.default_database,
            warm_databases=config.warm_databases, max_per_database=config.max_connections_per_database,
            rebind_reconnects=config.cluster, **{name: getattr(config, name) for name in names},
        )

    def min_idle_of(self, db: int) -> int:
        return self.min_idle if db in self.warm_databases else 0


@dataclass(frozen=True, slots=True)
class RowView:
    """What the sweep read from a slot's row and lock; the core trusts only its types."""

    index: int
    state: RowState | None  # None: bytes that are no state (scribbled)
    generation: int
    lease_seq: int = 0
    holder_pid: int = 0
    acquired_at: float = 0.0
    call_site: int = 0
    lock_free: bool = False  # the sweep could take the slot's lock (we now hold it)
    holder_alive: bool = True
    db: int = 0
    subscriber: bool = False  # the holder says its lease is long-lived: subscribed mode, or pinned for blocking polls
    revoke_asked: bool = False  # the row's revoke request names its current lease (``Table.request_revoke``)


# ----- actions: what the loop must do after a decision -----------------------------

@dataclass(frozen=True, slots=True)
class OpenConnection:
    slot: int
    generation: int


@dataclass(frozen=True, slots=True)
class ResetConnection:
    """RESET and redo the handshake, SELECTing ``db`` (a new one when the slot is rebound)."""

    slot: int
    generation: int
    backend: Any
    db: int


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Shut the connection down for every holder of its fd, then close ours."""

    backend: Any
    reason: str


@dataclass(frozen=True, slots=True)
class RequestRevoke:
    """Ask lease ``seq`` of the slot back from its live holder (``Table.request_revoke``) and,
    if the row still says that lease is held, shut the connection down. The row is not
    written: its next generation comes once the lock is free or the holder dead."""

    slot: int
    generation: int
    seq: int
    backend: Any


@dataclass(frozen=True, slots=True)
class ShutDown:
    """End the TCP connection for every holder of its fd, keeping the slot (a live holder
    has its lock): the slot's next generation comes once that lock is free."""

    backend: Any
    reason: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Write the slot's row as the manager's own (READY, CLOSED or MANAGER).

    READY and CLOSED also drop the slot's lock if the manager holds it
    (whatever generation it took it at); MANAGER keeps it: the manager is
    still working on the connection."""

    slot: int
    generation: int
    state: RowState
    expires_at: float = 0.0
    db: int = 0


@dataclass(frozen=True, slots=True)
class Expire:
    """Tell the holder (in the row) to give this connection back for replacement."""

    slot: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Wake:
    """Wake this many waiters (-1: all) of ``db`` (None: of any): connections became ready."""

    count: int
    db: int | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """Unlock a READY slot the sweep locked and found nothing to do with."""

    slot: int
    generation: int


Action = OpenConnection | ResetConnection | CloseConnection | RequestRevoke | ShutDown | Publish | Expire | Wake | Release
