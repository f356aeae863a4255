"""``PoolBase``: what the sync and the asyncio ``SharedConnectionPool`` are alike in.

The options a pool takes and refuses, ``from_url``, cloning for a spawned
process (``__reduce__``), the call's time bounds, an attachment made on a
link (its WELCOME checked against the pool's options), the frames of the
requests both send (DEMAND, FETCH_FD, STATS), and the dying worker's hook.
How a shell waits (threads and ``poll``, or an event loop) is its own.
"""

from __future__ import annotations

import os
import time
from typing import Any, TypeVar

from sharedpool import errors, protocol
from sharedpool.config import ClientConfig, client_config
from sharedpool.lease import budget
from sharedpool.lease.context import LeaseContext
from sharedpool.lease.core import Lease
from sharedpool.protocol import FrameType
from sharedpool.shell import clone
from sharedpool.shell.attachment import Attachment, check_welcome
from sharedpool.shell.links import Link
from sharedpool.shell.options import refuse_manager_owned

Pool = TypeVar("Pool", bound="PoolBase")

STATS_FRAME = protocol.encode_empty(FrameType.STATS)


class PoolBase:
    """The half of a ``SharedConnectionPool`` that does not depend on how it waits."""

    config: ClientConfig
    db: int | None
    redis_location: str | None
    connection_kwargs: dict[str, Any]
    pid: int
    _requested_protocol: Any
    _attachment: Attachment | None

    def _take_options(
        self,
        socket_path: str | None,
        acquire_timeout: float | None,
        manager_timeout: float | None,
        connection_kwargs: dict[str, Any],
        own_class: type,
    ) -> None:
        """Take the pool's own options out of ``connection_kwargs`` (in place), refusing the manager's."""
        redis_location = clone.pool_options(connection_kwargs)
        redis_location = refuse_manager_owned(connection_kwargs, own_class) or redis_location
        self.config = client_config(socket_path=socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout)
        self.db = clone.database(connection_kwargs.pop("db", None))
        self._requested_protocol = connection_kwargs.get("protocol")
        # Where a URL given to from_url said Redis is: checked against the manager's at attach.
        self.redis_location = redis_location

    def _record_for_clones(self, acquire_timeout: float | None, manager_timeout: float | None) -> None:
        clone.record_for_clones(
            self.connection_kwargs, self.config.socket_path, acquire_timeout, manager_timeout, self.db, self.redis_location
        )

    @classmethod
    def _from_url(cls: type[Pool], url: str, kwargs: dict[str, Any]) -> Pool:
        """A pool for the database and client options of a ``redis://`` or ``unix://`` URL.

        The manager owns where Redis is and how to log in: a password or
        user name in the URL is dropped (never sent anywhere), and the host
        and port (or socket path) must name the manager's own Redis, which
        is checked at the first lease (``Misconfigured`` otherwise). Keyword
        arguments win over the URL's query options, except ``db``, which
        the URL sets when it names one (as in redis-py).
        """
        options, location = clone.parse_redis_url(url)
        return cls(**{**kwargs, **options, "redis_location": location})

    def __reduce__(self) -> tuple[Any, ...]:
        # A spawned process rebuilds the pool from its options; the fds, the
        # table and the channel are this process's and stay here.
        return (rebuild_pool, (type(self), clone.clone_kwargs(self.connection_kwargs)))

    def _counts(self) -> str:
        """The attachment's part of a ``repr``: pool name, leases held here, slots cached."""
        att = self._attachment
        name = att.pool_name if att is not None else "?"
        held = att.held if att is not None else 0
        cached = len(att.conns) if att is not None else 0
        return f"{self.config.socket_path} pool={name!r} [{held} leased here, {cached} slots cached"

    # ----- bounds ----------------------------------------------------------------

    def _acquire_timeout(self, att: LeaseContext) -> float:
        return self.config.acquire_timeout or att.acquire_timeout

    def call_bound(self) -> float:
        """Seconds one call may spend on the pool in all, retries included: manager_timeout + acquire_timeout."""
        return budget.call_bound(self.config, self._attachment)

    # ----- the manager -------------------------------------------------------------

    def _attachment_on(self, link: Link) -> Attachment:
        """This pool's attachment on ``link``, if the manager there serves what the pool asks for."""
        try:
            db = check_welcome(link.welcome, self._requested_protocol, self.db, self.redis_location)
            return Attachment(link, db)
        except BaseException:
            link.release()
            raise

    def abort(self) -> int:
        """A dying worker's hook (gunicorn ``worker_abort``): give up this process's
        leases now, even those a stuck thread or task is in, and close the channel.

        The manager shuts each such connection down (which wakes a thread
        blocked reading from it) and replaces it. Takes no lock the stuck
        thread may hold. Returns how many leases and channels it ended.
        """
        att = self._attachment
        if self.pid != os.getpid() or att is None:
            return 0
        return att.abort()


def demand_body(db: int) -> bytes:
    return protocol.encode_demand(db)[protocol.HEADER.size :]


def fetch_fd_body(lease: Lease) -> bytes:
    return protocol.encode_fetch_fd(lease.slot, lease.generation, lease.db)[protocol.HEADER.size :]


def waited(exc: errors.ManagerUnavailable, started: float) -> errors.ManagerUnavailable:
    """``exc``, saying how long the call waited in all."""
    return errors.ManagerUnavailable(f"{exc} (this call waited {time.monotonic() - started:.2f} s in all)")


def rebuild_pool(cls: type[Pool], kwargs: dict[str, Any]) -> Pool:
    return cls(**kwargs)
