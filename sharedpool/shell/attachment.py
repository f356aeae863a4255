"""``Attachment``: a pool's view of one manager epoch in this process, and what a welcome must say.

One per pool, process and manager epoch: the link (the control channel and
the mapped table, shared with the process's other pools of that manager:
``shell.links``), one connection object per slot bound to this process's
dup of that slot's fd, and the takers (threads, tasks) that hold
descriptions of the table. A manager that dies or restarts is a new epoch: the old attachment is
detached and a new one made.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import TYPE_CHECKING, Any

import psutil

from sharedpool import errors, protocol
from sharedpool import table as tbl
from sharedpool.db_ranges import parse_databases
from sharedpool.lease.state import LeaseState
from sharedpool.shell import clone
from sharedpool.shell.links import Link, manager_alive

if TYPE_CHECKING:
    from sharedpool.lease.core import Taker

log = logging.getLogger("sharedpool.client")

# How often a process checks that the manager that lent it the table lives.
LIVENESS_S = 0.1


def process_start(pid: int) -> float:
    """The process's create_time, which pins its identity against pid reuse; 0 if unknown."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return 0.0


class Attachment:
    """This process's view of one manager (one epoch): channel, table, cached connections."""

    def __init__(self, link: Link, db: int) -> None:
        welcome = link.welcome
        self.db = db  # the database of every lease taken through this attachment
        # The control channel and the table are the link's, shared with every
        # other pool of this process attached to the same manager.
        self.link = link
        self.channel = link.channel
        self.table = link.table
        self.welcome = welcome
        self.epoch = str(welcome.get("epoch", ""))
        self.pool_name = str(welcome.get("pool", "?"))
        # Detaching lets go of the link; so does a pool dropped without it (collected).
        self._user = link.add_user(self)
        self.pid = os.getpid()
        self.start = process_start(self.pid)
        # slot -> this process's connection for it (``lease.context.CachedConnection``): the
        # sync pool's ``LeasedConnection``, the asyncio pool's ``SlotEntry``.
        self.conns: dict[int, Any] = {}
        self.held = 0  # leases this process holds on this table
        self.detached = False
        self.checked_at = time.monotonic()
        # Every taker's description, so that detaching closes them now
        # rather than at garbage collection.
        self.takers: weakref.WeakSet[Taker] = weakref.WeakSet()
        self.max_lease_time = float(welcome.get("max_lease_time", 0) or 0)
        self.acquire_timeout = float(welcome.get("acquire_timeout", 5.0) or 5.0)
        self.lease_limit = int(welcome.get("max_leases_per_worker", 0) or 0)

    def still_serves(self) -> bool:
        """Whether this manager still lives and talks to us; asked of the table at most every ``LIVENESS_S``."""
        now = time.monotonic()
        if now - self.checked_at < LIVENESS_S:
            return True
        self.checked_at = now
        if self.manager_alive() and not self.channel.closed:
            return True
        log.warning("manager of pool %r (epoch %s) is gone: dropping its table and connections", self.pool_name, self.epoch)
        return False

    def manager_alive(self) -> bool:
        return manager_alive(self.table)

    def detach(self) -> None:
        """Forget a manager that died or restarted; leases in use end on their own."""
        self.detached = True
        for conn in list(self.conns.values()):
            if conn.state is not LeaseState.IN_USE:
                conn.disconnect()
        for taker in list(self.takers):
            if not taker.held and taker.pid == os.getpid():
                taker.close()  # a taker holding a lease keeps its lock until it gives it back
        self.link.release(self, self._user)

    def abandon(self) -> None:
        """In a forked child: close our copies of the parent's fds, unlock nothing, tell no one.

        DESIGN facts 5 and 12: the parent's fds, table and channel are the parent's.
        """
        # Every parent taker's description, not only the forking thread's:
        # kept open here, one would keep a parent's lock alive after the
        # parent died (DESIGN fact 12).
        for taker in list(self.takers):
            taker.close()
        for conn in self.conns.values():
            conn.shared_pool = None
            conn.disconnect()
        self.link.abandon()

    def abort(self) -> int:
        """Report every lease of this process broken and close the channel; how many leases and channels ended.

        Takes no lock a stuck thread may hold: the manager shuts each such
        connection down (which wakes a thread blocked reading from it). The
        channel is shared: every pool's leases on it are reported (``Link.abort``).
        """
        return self.link.abort()

    def site_id(self, text: str) -> int:
        """The number the manager knows a call site by (one numbering per control connection)."""
        return self.link.site_id(text)


def check_welcome(
    welcome: dict[str, Any], requested_protocol: Any, requested_db: int | None, redis_location: str | None = None
) -> int:
    """Refuse a manager whose protocol, table layout, RESP version or Redis is not what this
    client speaks, or that does not serve the database it asked for (DESIGN fact 10).
    Returns the database to use: the one asked for, or the manager's default one."""
    versions = welcome.get("versions") or []
    if protocol.VERSION not in versions:
        raise errors.ProtocolMismatch(f"manager speaks protocol {versions}, this client {protocol.VERSION}")
    layout = (welcome.get("table") or {}).get("layout")
    if layout != tbl.LAYOUT_VERSION:
        raise errors.ProtocolMismatch(
            f"manager {welcome.get('pool')!r} lays its lease table out as version {layout}, this client reads "
            f"version {tbl.LAYOUT_VERSION}: run the same sharedpool version on both sides"
        )
    manager_protocol = int(welcome.get("protocol", 3))
    default_db = int(welcome.get("db", 0))
    asked = requested_protocol
    if (asked is None and manager_protocol != 3) or (asked is not None and int(asked) != manager_protocol):
        raise errors.ProtocolMismatch(
            f"manager {welcome.get('pool')!r} set its connections up with RESP{manager_protocol}, "
            f"this client expects RESP{asked or 3}: pass protocol={manager_protocol}"
        )
    manager_redis = str(welcome.get("redis", ""))
    if requested_db is not None and isinstance(welcome.get("cluster"), dict):
        # A cluster manager: the database is a node's index, named as that node.
        manager_redis = str(welcome["cluster"].get(str(requested_db), "no node"))
    if redis_location is not None and not clone.same_redis(redis_location, manager_redis):
        raise errors.Misconfigured(
            f"this client's URL names Redis at {redis_location}, but manager {welcome.get('pool')!r} "
            f"connects to {manager_redis}: point the URL at the manager's Redis, or run a manager for that one"
        )
    if requested_db is None:
        return default_db
    served_text = str(welcome.get("databases", default_db))
    try:
        served = set(parse_databases(served_text))
    except ValueError:
        served = {default_db}
    if requested_db not in served:
        raise errors.DatabaseNotServed(
            f"manager {welcome.get('pool')!r} serves databases {served_text} (default {default_db}), not db "
            f"{requested_db}: add it to the manager's --databases (databases in its config file, or "
            f"SHAREDPOOL_DATABASES), or use one it serves"
        )
    return requested_db
