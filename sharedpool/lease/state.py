"""Where a leased connection stands with respect to its lease, and how a lease ends.

Shared by the sync and the asyncio leased connections and pools, which
differ only in how they block (a socket, an event loop's stream):

* ``LeaseState`` and ``LeaseHolder``, the mixin whose methods are the only
  ones that move a connection's state;
* ``release``: the checks and the give-back of ``pool.release``;
* ``end_lost_lease``: a connection failed mid-lease, and redis-py's retry
  needs a fresh one (or is told the manager revoked it).

How a lease is given back (through the table; or, for asyncio, handed
to the next task of the process) is the caller's ``GiveBack``.
"""

from __future__ import annotations

import enum
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sharedpool import errors
from sharedpool import table as tbl
from sharedpool.lease.session import SessionWatch
from sharedpool.table import Outcome

if TYPE_CHECKING:
    from sharedpool.lease.core import Lease

# Ends a lease: (lease, outcome) -> None.
GiveBack = Callable[["Lease", Outcome], None]


class LeaseState(enum.Enum):
    """Where a connection object stands with respect to a lease. Only ``LeaseHolder``'s methods move it."""

    FREE = "free"  # cached for its slot, no lease
    IN_USE = "in use"
    LOST = "lost"  # failed mid-lease: given back broken; redis-py's retry may bind a fresh one
    REVOKED = "revoked"  # the manager took the lease back (max_lease_time)


class LeaseHolder(SessionWatch):
    """Mixin: one slot's connection object, the lease it holds if any, and what that lease did.

    The class supplies ``drop()``, which closes this process's copy of the
    fd now, and ``SessionWatch``'s two questions about its transport.
    """

    shared_pool: Any  # the pool it belongs to; None once detached from a gone manager

    def _hold_init(self, slot: int, generation: int, redis_label: str) -> None:
        self.slot = slot
        self.generation = generation
        self.redis_label = redis_label
        self.state = LeaseState.FREE
        self.lease: Lease | None = None
        self.why = ""  # what ended the last lease early (revocation text)
        self.retry_until = 0.0  # after a lost lease: when redis-py's retries must stop waiting
        self.owner_pid = os.getpid()
        self.watch_reset()

    def repr_pieces(self) -> list[tuple[str, Any]]:
        lease = self.lease.id if self.lease is not None else None
        return [
            ("slot", self.slot), ("generation", self.generation), ("lease", lease),
            ("state", self.state.value), ("redis", self.redis_label),
        ]

    def _host_error(self) -> str:
        return f"{self.redis_label} (sharedpool slot {self.slot})"

    def drop(self) -> None:
        raise NotImplementedError

    def _lease_failed(self, exc: BaseException) -> None:
        """A command failed mid-lease: nothing of this lease is clean any more, and a lease
        the manager revoked says so now (``LeaseLost``) rather than after redis-py's retries."""
        self._broken = True
        pool = self.shared_pool
        # A signal handler's exception (KeyboardInterrupt, a request timeout) goes on as it is.
        if pool is not None and self.state is LeaseState.IN_USE and isinstance(exc, Exception):
            pool.raise_if_revoked(self)

    def _begin_lease(self, lease: Lease) -> None:
        self.state = LeaseState.IN_USE
        self.lease = lease
        self.why = ""
        self.watch_reset()

    def end(self) -> Lease | None:
        """The lease is over for this object (given back, lost or revoked)."""
        lease, self.lease = self.lease, None
        if self.state is LeaseState.IN_USE:
            self.state = LeaseState.FREE
        return lease

    def lose(self) -> Lease | None:
        """The connection failed mid-lease: the caller gives the lease back broken."""
        lease, self.lease = self.lease, None
        self.state = LeaseState.LOST
        return lease

    def revoked(self, why: str) -> None:
        self.lease = None
        self.state = LeaseState.REVOKED
        self.why = why

    def settle(self) -> None:
        """redis-py is done with this object after a lost or revoked lease."""
        if self.state in (LeaseState.LOST, LeaseState.REVOKED):
            self.state = LeaseState.FREE


def release(pool: object, connection: Any, kind: type[LeaseHolder], give_back: GiveBack) -> None:
    """``pool.release(connection)``: end its lease, CLEAN, NEEDS_RESET or BROKEN as the session says."""
    if not isinstance(connection, kind) or connection.shared_pool is not pool:
        if isinstance(connection, kind) and connection.owner_pid != os.getpid():
            return  # inherited across fork: the parent's, not ours to return
        if isinstance(connection, kind) and connection.shared_pool is None:
            connection.settle()
            return  # detached from a manager that is gone
        raise errors.LeaseError(f"{connection!r} does not belong to {pool!r}")
    if connection.owner_pid != os.getpid():
        return
    if connection.state is not LeaseState.IN_USE:
        if connection.state in (LeaseState.LOST, LeaseState.REVOKED):
            connection.settle()  # already given back while redis-py retried
            return
        raise errors.LeaseError(f"{connection!r} is not leased: released twice?")
    lease = connection.lease
    assert lease is not None
    outcome = Outcome.BROKEN
    try:
        outcome = connection.outcome()
        if outcome is Outcome.BROKEN:
            connection.drop()
    finally:
        # Whatever interrupts the above (a signal handler raising), the
        # lease ends and its lock is given back: broken if we could not tell.
        connection.end()
        give_back(lease, outcome)
    if lease.revoked and sys.exc_info()[1] is None:
        # The manager took it back while the holder was between its last
        # command and this release: the holder is told, as it would be at
        # its next command. An exception already on its way (a release in
        # redis-py's ``finally``) is not replaced.
        raise errors.LeaseLost(revoked_text(lease))


def revoked_text(lease: Lease) -> str:
    att = lease.attachment
    age = time.monotonic() - lease.taken_at
    if att.max_lease_time and age >= att.max_lease_time:
        return (
            f"lease {lease.id} of pool {att.pool_name!r} was revoked after {age:.1f} s "
            f"(max_lease_time={att.max_lease_time:g} s); its connection was closed"
        )
    # Asked back before the limit: this process gave its leases up (a server's worker_abort).
    return (
        f"lease {lease.id} of pool {att.pool_name!r} was taken back by the manager after {age:.1f} s, "
        f"as this process gave up its leases; its connection was closed"
    )


def raise_if_revoked(conn: LeaseHolder, give_back: GiveBack) -> None:
    """A command of ``conn`` failed: if the manager asked for its lease back, give the
    lease back (BROKEN) and raise ``LeaseLost`` now. ``LeaseLost`` is never retried
    (``lease.budget``), so the holder learns it at this very command."""
    lease = conn.lease
    if conn.state is not LeaseState.IN_USE or lease is None:
        return
    try:
        asked = lease.attachment.table.revoke_asked(lease.slot, lease.generation, lease.seq)
    except (tbl.RowError, ValueError):
        return  # unmapped (the manager is gone): an ordinary lost connection
    if asked:
        why = revoked_text(lease)
        conn.end()
        conn.revoked(why)
        give_back(lease, Outcome.BROKEN)
        raise errors.LeaseLost(why)


def end_lost_lease(conn: LeaseHolder, give_back: GiveBack, budget_s: float) -> None:
    """``conn`` lost its connection mid-lease: give the lease back broken, so that
    redis-py's retry may take a fresh one within the call's budget (set by the
    bounded retry at the call's first failure, else ``budget_s`` from now). Raises ``LeaseLost`` when no retry may: the
    manager revoked the lease, or ``conn`` holds none."""
    if conn.state is LeaseState.REVOKED:
        raise errors.LeaseLost(conn.why)
    raise_if_revoked(conn, give_back)
    lease = conn.lease
    if conn.state is LeaseState.IN_USE and lease is not None:
        conn.lose()
        if not conn.retry_until:
            conn.retry_until = time.monotonic() + budget_s
        give_back(lease, Outcome.BROKEN)
    elif conn.state is not LeaseState.LOST:
        raise errors.LeaseLost(f"{conn!r} is not leased; get one from the pool")
