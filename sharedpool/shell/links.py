"""This process's control connections: one per manager, shared by every pool of that manager.

A ``Link`` is one control channel and the lease table its WELCOME brought;
every pool's ``Attachment`` to that manager epoch uses it. Sync pools of a
process share one link per socket path. An asyncio channel is driven by
one event loop (``loop.add_reader``), and the sync channel's requests block
the thread, which a loop must never do: so asyncio pools share one link per
socket path and event loop, and a process with sync and asyncio pools has
one of each (issue 24: a Celery worker process had one per pool, 9).

The manager counts call sites per process (``SITE`` frames), so their
numbers live here, one numbering per link. A link is dropped from the
registry when its last attachment lets go, when its channel closed (the
manager went away or restarted: the next attach opens a new one) and in a
forked child, which opens its own (DESIGN fact 5): the registry remembers
the pid it belongs to.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Any, Protocol

from sharedpool import errors, protocol
from sharedpool import table as tbl
from sharedpool.lease.state import LeaseState
from sharedpool.protocol import ReportCause
from sharedpool.table import Outcome


class LinkedChannel(Protocol):
    """What a link uses of its control channel: the sync surface that both
    ``client.channel.ControlChannel`` and ``asyncio.channel.AsyncControlChannel`` have."""

    welcome: dict[str, Any]
    table_fd: int

    @property
    def closed(self) -> bool: ...
    def notify(self, frame: bytes) -> None: ...
    def ping(self, timeout: float) -> float: ...
    def close(self) -> None: ...
    def abandon(self) -> None: ...


class LinkUser(Protocol):
    """A pool's ``Attachment`` (``shell.attachment``), as its link sees it: the connections it caches."""

    @property
    def conns(self) -> dict[int, Any]: ...


class Link:
    """One control connection of this process to one manager epoch, and its lease table."""

    def __init__(self, key: tuple[str, Any], channel: LinkedChannel) -> None:
        self.key = key
        self.channel = channel
        self.welcome = channel.welcome
        geometry = self.welcome.get("table") or {}
        # The table takes the memfd over from the channel: a channel closed by a
        # dead manager's EOF must not close the fd that the table, and every
        # taker made from it (``own_description``), still names.
        table_fd, channel.table_fd = channel.table_fd, -1
        self.table = tbl.Table(table_fd, int(geometry["capacity"]), int(geometry["waiter_capacity"]))
        self.sites: dict[str, int] = {}
        self.attachments: weakref.WeakSet[LinkUser] = weakref.WeakSet()
        self.users = 0  # attachments that have not let go (``add_user``)
        self.pid = os.getpid()
        self.abandoned = False

    def __repr__(self) -> str:
        return f"<Link {self.key[0]} epoch={self.welcome.get('epoch')} [{len(self.attachments)} pools]>"

    def usable(self) -> bool:
        return not self.abandoned and not self.channel.closed and manager_alive(self.table)

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

    def add_user(self, attachment: LinkUser) -> weakref.finalize[Any, Any]:
        """``attachment`` uses this link until it releases it, or until it is collected
        (a pool dropped without ``disconnect()``, as ``redis.Redis(connection_pool=...)``
        leaves the pools it was given): the returned finalizer stands for its use."""
        self.attachments.add(attachment)
        self.users += 1
        return weakref.finalize(attachment, self._drop_user)

    def release(self, attachment: LinkUser | None = None, user: weakref.finalize[Any, Any] | None = None) -> None:
        """``attachment`` is done with this link (None: a pool that never attached,
        its welcome refused): the last one closes the channel."""
        if attachment is not None:
            self.attachments.discard(attachment)
        if user is not None and user.detach() is not None:
            self.users -= 1
        if self.users <= 0 or self.channel.closed:
            self._close()

    def _drop_user(self) -> None:
        self.users -= 1
        if self.users <= 0:
            try:
                self._close()
            except Exception:  # at collection: nothing to raise to
                pass

    def _close(self) -> None:
        if self.abandoned or self.pid != os.getpid():
            return  # a parent's, in a forked child: never touched (DESIGN fact 5)
        _forget(self)
        self.channel.close()

    def abandon(self) -> None:
        """In a forked child: close our copies of the parent's fds, unlock nothing, tell no one (DESIGN facts 5, 12)."""
        if not self.abandoned:
            self.abandoned = True
            self.channel.abandon()
            self.table.close()

    def abort(self) -> int:
        """Report every lease of this process on this link broken, then close the channel;
        how many leases and channels ended. Every pool's leases go first: once the
        channel is closed, nothing more can be reported on it."""
        if self.channel.closed:
            return 0
        ended = 0
        for attachment in list(self.attachments):
            for conn in list(attachment.conns.values()):
                lease = conn.lease
                if conn.state is LeaseState.IN_USE and lease is not None:
                    self.channel.notify(
                        protocol.encode_report(lease.slot, lease.generation, lease.seq, Outcome.BROKEN, ReportCause.ABORTED)
                    )
                    ended += 1
        # A ping makes sure the reports were read before our end closes.
        try:
            self.channel.ping(timeout=1.0)
        except errors.SharedPoolError:
            pass
        _forget(self)
        self.channel.close()
        return ended + 1


def manager_alive(table: tbl.Table) -> bool:
    try:
        return tbl.is_locked(table.fd, tbl.ALIVE_LOCK, exclusive=False)
    except OSError:
        return False


# key -> link; the pid the registry belongs to (a forked child starts with none).
_LINKS: dict[tuple[str, Any], Link] = {}
_PID = os.getpid()


def _registry() -> dict[tuple[str, Any], Link]:
    global _PID
    if _PID != os.getpid():
        _PID = os.getpid()
        _LINKS.clear()  # the parent's: each pool's attachment abandons its own copies
    return _LINKS


def find(socket_path: str, loop: Any = None) -> Link | None:
    """This process's usable link to the manager at ``socket_path`` (for ``loop``: asyncio), or None."""
    link = _registry().get((socket_path, loop))
    if link is not None and not link.usable():
        _forget(link)
        return None
    return link


def add(socket_path: str, channel: LinkedChannel, loop: Any = None) -> Link:
    """The link for a channel just opened; if another pool opened one meanwhile, that one (ours closes)."""
    registry = _registry()
    key = (socket_path, loop)
    other = find(socket_path, loop)
    if other is not None and other.welcome.get("epoch") == channel.welcome.get("epoch"):
        channel.close()  # and the table memfd it brought
        return other
    link = Link(key, channel)
    registry[key] = link
    return link


def _forget(link: Link) -> None:
    registry = _registry()
    if registry.get(link.key) is link:
        del registry[link.key]


def links() -> list[Link]:
    """Every link of this process (for tests and stats)."""
    return list(_registry().values())


class ConnectRetry:
    """Connecting to a manager, retried while none answers, until ``deadline``: both shells' rule."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.started = time.monotonic()
        self.delay = 0.02

    def timeout(self) -> float:
        """The bound of the next attempt."""
        return max(0.05, min(self.deadline - time.monotonic(), 5.0))

    def failed(self, exc: errors.ManagerUnavailable) -> float:
        """How long to wait before the next attempt; ``ManagerUnavailable`` when none is left."""
        if time.monotonic() + self.delay >= self.deadline:
            waited = time.monotonic() - self.started
            raise errors.ManagerUnavailable(f"{exc} (waited {waited:.2f} s)") from None
        delay, self.delay = self.delay, min(self.delay * 2, 0.25)
        return delay
