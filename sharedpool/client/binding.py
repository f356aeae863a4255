"""Binding a lease to a connection object, and ending a lease redis-py lost.

A lease taken from the table is bound to this process's ``LeasedConnection``
for its slot: the cached one when it holds the slot's fd of this
generation, else one on the fd fetched from the manager (FETCH_FD). When a
command fails mid-lease, redis-py reconnects: the lost lease is given back
broken (or, when the manager revoked it, the caller is told why) before the
pool binds the same object to a fresh lease
(``BindingPool.replace_lost_lease``).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Protocol

from sharedpool import errors, protocol
from sharedpool.client.channel import sync_channel
from sharedpool.client.connection import LeasedConnection, LeasingPool
from sharedpool.lease import state as lease_state
from sharedpool.lease.core import Lease, give_back
from sharedpool.protocol import FrameType
from sharedpool.shell import clone
from sharedpool.shell.attachment import Attachment
from sharedpool.shell.pool_base import fetch_fd_body, waited
from sharedpool.table import Outcome


class BindingPool(LeasingPool, Protocol):
    """What binding needs of the sync ``BindingPool`` (``client.sync_pool``): its connections' options."""

    connection_kwargs: dict[str, Any]
    connection_class: Any

    def call_bound(self) -> float: ...


def bind(
    pool: BindingPool, att: Attachment, lease: Lease, conn: LeasedConnection | None, final: float, started: float
) -> LeasedConnection:
    """The connection bound to ``lease``: this process's cached one for the slot, or
    ``conn`` (rebinding that object) or a new one, on the slot's fd."""
    cached: LeasedConnection | None = att.conns.get(lease.slot)
    if conn is None and cached is not None and cached.generation == lease.generation and cached._sock is not None:
        cached.begin(lease)
        return cached
    if conn is not None and cached is not None and cached.generation == lease.generation and cached._sock is not None:
        sock = _dup(cached._sock)
    else:
        sock = _fetch_fd(att, lease, final, started)
    if conn is None:
        conn = _connection(pool, att, lease.slot, lease.generation, sock)
        conn.begin(lease)
    else:
        conn.begin(lease, sock)
    stale = att.conns.get(lease.slot)
    att.conns[lease.slot] = conn
    if stale is not None and stale is not conn:
        stale.shared_pool = None
        stale.disconnect()  # an older generation: only our copy of a dead fd
    return conn


def _fetch_fd(att: Attachment, lease: Lease, final: float, started: float) -> socket.socket:
    body = fetch_fd_body(lease)
    try:
        timeout = max(0.05, final - time.monotonic())
        reply, fd = sync_channel(att).call(FrameType.FETCH_FD, body, FrameType.FD, timeout, want_fd=True)
    except errors.ManagerUnavailable as exc:
        raise waited(exc, started) from None
    assert fd is not None
    sock = socket.socket(fileno=fd)
    if len(reply) > protocol.SLOT_BODY_SIZE:
        # rediss://: the connection's traffic keys follow the slot and generation.
        from sharedpool.tls.transport import TLSSocket

        try:
            tls = TLSSocket.handed_over(sock, reply[protocol.SLOT_BODY_SIZE :], att.table.map, lease.slot)
            return tls  # type: ignore[return-value]  # socket-shaped: what redis-py calls of it
        except BaseException:
            sock.close()
            raise
    return sock


def _dup(sock: socket.socket) -> socket.socket:
    """Our own copy of a cached connection's socket (rediss://: with its own record state)."""
    dup = getattr(sock, "dup_for_lease", None)
    return dup() if dup is not None else socket.socket(fileno=os.dup(sock.fileno()))


def _connection(pool: BindingPool, att: Attachment, slot: int, generation: int, sock: socket.socket) -> LeasedConnection:
    kwargs = {key: value for key, value in pool.connection_kwargs.items() if key not in clone.NOT_FOR_CONNECTIONS}
    kwargs["protocol"] = int(att.welcome.get("protocol", 3))
    kwargs["db"] = att.db
    connection_class: type[LeasedConnection] = pool.connection_class
    return connection_class(
        shared_pool=pool, slot=slot, generation=generation, sock=sock,
        redis_label=str(att.welcome.get("redis", "")), **kwargs,
    )


def give_back_reporting(lease: Lease, outcome: Outcome, used: bool = True) -> None:
    """Give ``lease`` back, telling the manager when it has work to do."""
    report, drop = give_back(lease, outcome, used)
    if drop is not None:
        drop.disconnect()
    if report:
        lease.attachment.channel.notify(report)


def end_lost_lease(pool: BindingPool, conn: LeasedConnection) -> None:
    """``conn`` lost its connection mid-lease: give the lease back broken, so that
    redis-py's retry may take a fresh one within the budget ``_BoundedRetry`` set at
    the command's first failure (or one call's bound from now)."""
    lease_state.end_lost_lease(conn, give_back_reporting, pool.call_bound())
