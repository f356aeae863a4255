"""Protocol module: what the lease core needs of the client around it.

The core (``core``, ``queue``, ``state``, ``budget``) is typed against
these, not against the shells' ``Attachment``: it reads the table and the
attachment's few numbers, keeps the slot-to-connection map, and sends
no-reply frames, and nothing else. Both shells' attachments (one class,
``shell.attachment``) satisfy ``LeaseContext``; the sync and asyncio
cached connections (or the asyncio ``SlotEntry`` view of one) satisfy
``CachedConnection``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import weakref

    from sharedpool import table as tbl
    from sharedpool.lease.core import Lease, Taker
    from sharedpool.lease.state import LeaseState


class Notifier(Protocol):
    """A control channel as the core uses it: frames that get no reply, sent without blocking."""

    def notify(self, frame: bytes) -> None: ...


class CachedConnection(Protocol):
    """This process's connection object for one slot, as the core and the attachment see it."""

    @property
    def state(self) -> LeaseState: ...
    @property
    def lease(self) -> Lease | None: ...
    @property
    def generation(self) -> int: ...
    shared_pool: Any

    def disconnect(self) -> None:
        """Close this process's copy of the slot's fd now (sync, for either client)."""


class LeaseContext(Protocol):
    """One manager epoch as the core sees it: its table, this process's identity, its numbers."""

    held: int  # leases this process holds through this context: the core counts give-backs
    @property
    def table(self) -> tbl.Table: ...
    @property
    def channel(self) -> Notifier: ...
    @property
    def conns(self) -> dict[int, Any]: ...  # slot -> this process's CachedConnection for it
    @property
    def takers(self) -> weakref.WeakSet[Taker]: ...
    @property
    def welcome(self) -> dict[str, Any]: ...
    @property
    def epoch(self) -> str: ...
    @property
    def pool_name(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def start(self) -> float: ...  # the process's create time: with the pid, its identity in a row
    @property
    def db(self) -> int: ...
    @property
    def detached(self) -> bool: ...
    @property
    def lease_limit(self) -> int: ...
    @property
    def max_lease_time(self) -> float: ...
    @property
    def acquire_timeout(self) -> float: ...
