"""The manager's own side of each Redis connection.

Opening (TCP or unix connect plus AUTH / HELLO / SELECT / CLIENT SETNAME)
and resetting are blocking redis-py calls, so the loop runs them in a
thread pool and never waits on Redis itself. Closing is ``shutdown()`` then
``close()``: shutdown ends the TCP connection for every process holding a
dup of the fd (DESIGN fact 1), which is what revoking and discarding mean.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.connection import Connection, UnixDomainSocketConnection, parse_url

from sharedpool.config import ManagerConfig, tls_options

log = logging.getLogger("sharedpool.manager")

# RESET can be answered after messages that were already in flight (a
# SUBSCRIBEd connection); read past at most this many of them.
_MAX_STRAY_REPLIES = 10_000


@dataclass(frozen=True)
class RedisTarget:
    """Where and how the manager connects; built once per config."""

    kwargs: dict[str, Any]
    unix: bool
    label: str  # host:port or path, never the password
    db: int
    protocol: int
    client_name: str  # the template: {pool}, {slot}, {db}; empty: no CLIENT SETNAME
    tls: Any = None  # rediss://: the TLSOptions (sharedpool.tls)
    # A Redis Cluster node (manager/cluster.py): the slot's db names the node, and Redis has only db 0.
    selects: bool = True
    node_readonly: bool = False  # a replica node: READONLY in the handshake, so workers never change the session

    @classmethod
    def from_config(cls, config: ManagerConfig) -> RedisTarget:
        tls = tls_options(config)
        url = config.redis_url
        if tls is not None:
            from sharedpool.tls.handshake import without_options

            url = without_options(url)
        kwargs = dict(parse_url(url))
        unix = urlsplit(config.redis_url).scheme == "unix"
        kwargs.pop("connection_class", None)
        db = int(kwargs.get("db", 0) or 0)
        label = kwargs.get("path", "") if unix else f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        kwargs.update(
            protocol=config.protocol,
            socket_timeout=config.redis_timeout,
            socket_connect_timeout=config.redis_timeout,
            # Nothing retried in here: a failed open is reported to the pool,
            # which owns the backoff.
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        if not unix:
            kwargs["socket_keepalive"] = True
        if tls is not None:
            kwargs["tls"] = tls
            label += " (TLS)"  # client.clone.TLS_MARK: a worker's redis:// URL for it is refused, not mixed
        return cls(kwargs, unix, label, db, config.protocol, config.client_name, tls)

    def connection_class(self) -> Any:
        if self.tls is not None:
            from sharedpool.tls.backend import ManagerTLSConnection

            return ManagerTLSConnection
        return UnixDomainSocketConnection if self.unix else Connection

    def name_of(self, pool_name: str, slot: int, db: int) -> str | None:
        return self.client_name.format(pool=pool_name, slot=slot, db=db) or None


class Backend:
    """One real Redis connection owned by the manager."""

    def __init__(self, target: RedisTarget, pool_name: str, slot: int, db: int) -> None:
        kwargs = dict(target.kwargs, client_name=target.name_of(pool_name, slot, db), db=db if target.selects else 0)
        self.connection: Connection = target.connection_class()(**kwargs)
        self._name = (target, pool_name)
        self.timeout = target.kwargs["socket_timeout"]
        self.slot = slot
        self.fileno = -1
        # poll, not select: the manager has more than FD_SETSIZE fds. One
        # poller per connection, registered once: checked on every grant.
        self._poller = select.poll()

    def open(self) -> Backend:
        self.connection.connect()
        sock = self.connection._sock
        assert sock is not None
        self.fileno = sock.fileno()
        self._poller.register(self.fileno, select.POLLIN)
        self._readonly()
        return self

    def _readonly(self) -> None:
        target, _pool_name = self._name
        if target.node_readonly:
            self.connection.send_command("READONLY", check_health=False)
            self.connection.read_response()

    def reset(self, db: int) -> None:
        """RESET the session, then redo our own handshake (RESET drops AUTH and RESP3),
        SELECTing ``db``: another database than before when the slot is rebound.

        Workers may have left the fd in either blocking mode (DESIGN fact 9),
        so our own timeout is applied first.
        """
        conn = self.connection
        sock = conn._sock
        if sock is None:
            raise redis.ConnectionError("connection already closed")
        target, pool_name = self._name
        conn.db = db if target.selects else 0
        conn.client_name = target.name_of(pool_name, self.slot, db)
        sock.settimeout(self.timeout)
        tls_take_up = getattr(sock, "take_up", None)
        if tls_take_up is not None:
            tls_take_up()  # where the last holder left the record sequence numbers
        conn.send_command("RESET", check_health=False)
        for _ in range(_MAX_STRAY_REPLIES):
            reply = conn.read_response(disable_decoding=True)
            if reply in (b"RESET", "RESET"):
                break
        else:
            raise redis.ConnectionError("no RESET reply among stray replies")
        # The RESP3 parser reads RESP2 too, so the handshake can run as is.
        conn.on_connect()
        self._readonly()
        if tls_take_up is not None:
            sock.write_back()  # type: ignore[union-attr]  # before the slot is granted again

    @property
    def handover(self) -> Any:
        """rediss://: the suite and traffic keys a worker is sent with the fd (None for plain Redis)."""
        return getattr(self.connection, "handover", None)

    def publish_tls(self, table_map: Any) -> None:
        """rediss://: put the record sequence numbers in the slot's row, before the slot is lent."""
        sock = self.connection._sock
        if self.handover is not None and sock is not None:
            from sharedpool.tls.row import RowSeqs

            sock.seqs = RowSeqs(table_map, self.slot)  # type: ignore[attr-defined]
            sock.write_back()  # type: ignore[attr-defined]

    def is_quiet(self) -> bool:
        """True when nothing is readable: no EOF, no reply nobody asked for."""
        try:
            return not self._poller.poll(0)  # EOF, error or stray data all show as events
        except OSError:
            return False

    def shut_down(self) -> None:
        """End the TCP connection for every process holding its fd, keeping ours open:
        a holder blocked on it wakes, and its next command fails at once."""
        sock = self.connection._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by Redis

    def close(self) -> None:
        try:
            self.connection.disconnect()
        except Exception:  # a dead socket must still be dropped
            log.debug("error closing slot %d", self.slot, exc_info=True)


def open_backend(target: RedisTarget, pool_name: str, slot: int, db: int) -> Backend:
    return Backend(target, pool_name, slot, db).open()


def server_databases(backend: Backend) -> int | None:
    """How many databases Redis has (CONFIG GET databases); None when CONFIG is refused
    (ACL, a renamed command, a managed Redis): the configured list stands then."""
    conn = backend.connection
    try:
        conn.send_command("CONFIG", "GET", "databases", check_health=False)
        reply = conn.read_response(disable_decoding=True)
    except redis.ResponseError:
        return None
    values = list(reply.items())[0] if isinstance(reply, dict) and reply else reply
    try:
        return int(values[1])
    except (TypeError, ValueError, IndexError):
        return None


def probe(target: RedisTarget, timeout: float = 2.0) -> str:
    """One-shot PING for ``sharedpool check``; returns an error text or ''."""
    kwargs = dict(target.kwargs, socket_timeout=timeout, socket_connect_timeout=timeout)
    conn = target.connection_class()(**kwargs)
    started = time.monotonic()
    try:
        conn.connect()
        conn.send_command("PING")
        conn.read_response()
    except redis.RedisError as exc:
        return f"{target.label}: {exc} after {time.monotonic() - started:.2f} s"
    finally:
        conn.disconnect()
    return ""



def describe_error(exc: BaseException) -> str:
    """A failure of Redis I/O as the manager reports it (logs, the table's outage text)."""
    return f"{type(exc).__name__}: {exc}"
