"""``Attachment``: this process's view of one manager epoch, and what a welcome must say.

One per process and manager epoch: the control channel, the mapped table,
one ``LeasedConnection`` per slot bound to this process's dup of that
slot's fd, and the takers (threads, tasks) that hold descriptions of the
table. A manager that dies or restarts is a new epoch: the old attachment is
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
from sharedpool.client import clone
from sharedpool.client.channel import ControlChannel
from sharedpool.client.lease_state import LeaseState
from sharedpool.config import parse_databases
from sharedpool.protocol import ReportCause
from sharedpool.table import Outcome

if TYPE_CHECKING:
    from sharedpool.client.connection import LeasedConnection
    from sharedpool.client.lease_core import Taker

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

    def __init__(self, channel: ControlChannel, db: int) -> None:
        welcome = channel.welcome
        self.db = db  # the database of every lease taken through this attachment
        geometry = welcome.get("table") or {}
        self.channel = channel
        self.welcome = welcome
        self.epoch = str(welcome.get("epoch", ""))
        self.pool_name = str(welcome.get("pool", "?"))
        # The table takes the memfd over from the channel: a channel closed by a
        # dead manager's EOF must not close the fd that the table, and every
        # taker made from it (``own_description``), still names.
        table_fd, channel.table_fd = channel.table_fd, -1
        self.table = tbl.Table(table_fd, int(geometry["capacity"]), int(geometry["waiter_capacity"]))
        self.pid = os.getpid()
        self.start = process_start(self.pid)
        self.conns: dict[int, LeasedConnection] = {}
        self.sites: dict[str, int] = {}
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
        try:
            return tbl.is_locked(self.table.fd, tbl.ALIVE_LOCK, exclusive=False)
        except OSError:
            return False

    def detach(self) -> None:
        """Forget a manager that died or restarted; leases in use end on their own."""
        self.detached = True
        for conn in list(self.conns.values()):
            if conn.state is not LeaseState.IN_USE:
                conn.disconnect()
        for taker in list(self.takers):
            if not taker.held and taker.pid == os.getpid():
                taker.close()  # a taker holding a lease keeps its lock until it gives it back
        self.channel.close()

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
        self.channel.abandon()
        self.table.close()

    def abort(self) -> int:
        """Report every lease of this process broken and close the channel; how many leases and channels ended.

        Takes no lock a stuck thread may hold: the manager shuts each such
        connection down (which wakes a thread blocked reading from it).
        """
        if self.channel.closed:
            return 0
        ended = 0
        for conn in list(self.conns.values()):
            lease = conn.lease
            if conn.state is LeaseState.IN_USE and lease is not None:
                report = protocol.encode_report(lease.slot, lease.generation, lease.seq, Outcome.BROKEN, ReportCause.ABORTED)
                self.channel.notify(report)
                ended += 1
        # A ping makes sure the reports were read before our end closes.
        try:
            self.channel.ping(timeout=1.0)
        except errors.SharedPoolError:
            pass
        self.channel.close()
        return ended + 1

    def site_id(self, text: str) -> int:
        """The number the manager knows a call site by; announced the first time."""
        site = self.sites.get(text)
        if site is None:
            if len(self.sites) >= 10_000:
                return 0
            site = len(self.sites) + 1
            self.sites[text] = site
            self.channel.notify(protocol.encode_site(site, text))
        return site


def open_channel(socket_path: str, deadline: float) -> ControlChannel:
    """Connect, retrying while no manager answers, until ``deadline``."""
    delay = 0.02
    started = time.monotonic()
    while True:
        remaining = deadline - time.monotonic()
        try:
            return ControlChannel(socket_path, connect_timeout=max(0.05, min(remaining, 5.0)))
        except errors.ManagerUnavailable as exc:
            if time.monotonic() + delay >= deadline:
                waited = time.monotonic() - started
                raise errors.ManagerUnavailable(f"{exc} (waited {waited:.2f} s)") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


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
