"""Celery on the shared pool: a result backend and a broker transport, one setting each.

```python
# celeryconfig.py (or app.conf): broker_url stays as it was
broker_transport = "sharedpool.integrations.celery:Transport"
result_backend = "sharedpool.integrations.celery:Backend+redis://127.0.0.1:6379/1"
```

(kombu 5.7 refuses an import path in the broker URL itself, so the broker
takes ``broker_transport``, which leaves ``broker_url`` untouched.)

Both are Celery's and kombu's own Redis classes with the pool swapped for a
``SharedConnectionPool``: the URL names the database and must name the
manager's Redis (checked at the first lease); a password in it is dropped,
as in ``SharedConnectionPool.from_url`` (the manager authenticates). The
manager is found at ``SHAREDPOOL_SOCKET`` or the default socket, or at the
``sharedpool_socket_path`` setting (a transport option for the broker).

Prefork children take a lease per command for results and publishing. The
worker's consumer is kombu's event loop, which pins two connections for
the worker's life: one for its BRPOP polls and one for the fanout
PSUBSCRIBE (``celery inspect``, broadcasts). Those leases are marked
long-lived in the table (the BRPOP one ``blocking``, the PSUBSCRIBE one
``subscriber``): the manager neither warns about them as leaks nor revokes
them at ``max_lease_time``, and stats count them. Since each one holds a
connection for as long as the worker runs, ``sharedpool_max_long_lived``
(a transport option) bounds how many of the host's connections long-lived
leases may hold at once: a consumer that would pass it waits up to the
acquire timeout, then fails with ``PoolFull``, which kombu treats as a
connection error (it reconnects), rather than leaving nothing for the
children. No bound by default: while kombu reconnects (after a ``CLIENT
KILL``, a Redis restart) a worker holds its old pinned leases and asks for
new ones before the old channel is gone, so a bound set to exactly what
the fleet needs refuses those reconnects until the old leases end; set it
with room for one worker's reconnect (its pinned connections: 2 with
gossip off, 3 with it on).
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from celery.backends.redis import RedisBackend
from kombu.transport import redis as kombu_redis

from sharedpool import errors
from sharedpool.client.connection import LeasedConnection
from sharedpool.client.sync_pool import SharedConnectionPool
from sharedpool.table import RowFlag

__all__ = ["Backend", "Channel", "Transport"]

log = logging.getLogger("sharedpool.client")

SOCKET_SETTING = "sharedpool_socket_path"
MAX_LONG_LIVED_SETTING = "sharedpool_max_long_lived"


def _shared_pool(params: dict[str, Any], socket_path: str | None) -> SharedConnectionPool:
    # The manager logs in: credentials from the URL are dropped, never sent anywhere.
    for credential in ("password", "username"):
        params.pop(credential, None)
    return SharedConnectionPool(socket_path, **params)


class Backend(RedisBackend):  # type: ignore[misc]  # Celery is untyped
    """Celery's Redis result backend on the shared pool."""

    def _get_pool(self, **params: Any) -> SharedConnectionPool:
        return _shared_pool(params, self.app.conf.get(SOCKET_SETTING))


class Channel(kombu_redis.Channel):  # type: ignore[misc]  # kombu is untyped
    """kombu's Redis channel on the shared pool, its consumer's pinned connections marked long-lived."""

    connection_class = LeasedConnection  # type: ignore[assignment]
    from_transport_options = (*kombu_redis.Channel.from_transport_options, SOCKET_SETTING, MAX_LONG_LIVED_SETTING)  # type: ignore[assignment]
    sharedpool_socket_path: str | None = None
    sharedpool_max_long_lived: int | None = None

    def _get_pool(self, asynchronous: bool = False) -> SharedConnectionPool:
        if self.connection is None:
            # A closed channel (kombu's reconnect closed it) asked for a pool
            # again: kombu's _connparams would fail with an AttributeError,
            # which no retry of kombu's or Celery's catches. A connection
            # error is what they retry on a new channel.
            raise redis.exceptions.ConnectionError("kombu channel closed (reconnected meanwhile)")
        params = self._connparams(asynchronous=asynchronous)
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        return _shared_pool(params, self.sharedpool_socket_path)

    def _brpop_start(self, timeout: Any = None) -> None:
        # The BRPOP connection stays leased between polls: kombu's event loop
        # watches its fd. Marked before the command goes out, so that it never
        # reads as a leak.
        self._mark_long_lived(self.client.connection, RowFlag.BLOCKING)
        super()._brpop_start(timeout)

    def _subscribe(self) -> None:
        # kombu's poller took this connection for the PSUBSCRIBE (PSUBSCRIBE marks it a
        # subscriber by itself): here only the bound is checked.
        self._mark_long_lived(self.subclient.connection, RowFlag.SUBSCRIBER)
        super()._subscribe()

    def _on_connection_disconnect(self, connection: Any) -> None:
        super()._on_connection_disconnect(connection)
        # A pinned connection kombu disconnects (on a connection error) ends its
        # lease now, broken: kombu's reconnect may never close this channel, and
        # the lease would stay held until garbage collection. kombu's next poll
        # on the same object takes a fresh lease, as plain redis-py reconnects.
        if isinstance(connection, LeasedConnection) and connection.shared_pool is not None:
            connection.shared_pool.end_in_use(connection)

    def close(self) -> None:
        try:
            super().close()
        finally:
            # kombu's close first reads a BRPOP reply still due, and on a dead
            # connection that raises before it disconnects its pools: their
            # leases would then stay held until garbage collection, pinned
            # connections included, and the reconnected consumer would find the
            # long-lived bound taken by its own dead leases. So their leases in
            # use end here, but the pools stay this channel's: Celery still acks
            # the messages this channel delivered (acks_late tasks finishing in
            # the children after a reconnect) through it, and an ack that found
            # no pool would build one from a connection the close took away
            # (AttributeError in basic_ack, which kills the worker). On plain
            # redis-py the pools stay too, and reconnect for those acks.
            for pool in (self._pool, self._async_pool):
                if pool is not None:
                    pool.disconnect()

    def _mark_long_lived(self, connection: Any, flag: RowFlag) -> None:
        pool = self.async_pool
        if not isinstance(connection, LeasedConnection) or connection.lease is None:
            return
        limit = self.sharedpool_max_long_lived
        try:
            pool.mark_long_lived(connection, flag, None if limit is None else int(limit))
        except errors.PoolFull as exc:
            # Give the lease back now: kombu drops this connection on the error
            # and reconnects later, and nothing stays held meanwhile.
            which = "BRPOP" if flag is RowFlag.BLOCKING else "PSUBSCRIBE"
            pool.release(connection)
            refused = errors.PoolFull(f"{exc} (kombu's {which} connection; {MAX_LONG_LIVED_SETTING} sets the bound)")
            # Celery logs only the error's class when the consumer reconnects: say it here.
            log.warning("%s", refused)
            raise refused from None


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport on the shared pool (``Channel`` above)."""

    Channel = Channel
    driver_type = "redis"
    driver_name = "redis"
