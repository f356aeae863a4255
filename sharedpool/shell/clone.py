"""What a copy of a shared pool needs, and ``from_url``: clients rebuilt from a pool land on the same one.

Libraries rebuild clients from what a pool says about itself: rq's
scheduler and worker pool call ``redis.ConnectionPool(connection_class=
pool.connection_class, **pool.connection_kwargs)``, django-redis calls
``CONNECTION_POOL_CLASS.from_url(url, ...)``, others pickle a client into
a spawned process. A shared pool keeps in ``connection_kwargs`` all that
reaches the same manager and database (the socket path, the timeouts, the
db, the client options), so each of these lands where the original does.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from redis.connection import parse_url

from sharedpool import errors

# What redis-py's ConnectionPool adds to connection_kwargs about its own
# running state (handlers holding locks, copies of timeouts): another pool's,
# never an option. A clone drops them and makes its own.
RUNTIME_KEYS = frozenset({
    "maint_notifications_config", "maint_notifications_pool_handler", "himport_registry",
    "event_dispatcher", "orig_host_address", "orig_socket_timeout", "orig_socket_connect_timeout",
})

# The pool's own keyword arguments, kept in connection_kwargs for clones and
# never passed on to a connection.
POOL_KEYS = ("socket_path", "acquire_timeout", "manager_timeout", "db")
# What a pool keeps in connection_kwargs and never passes to a connection:
# its own options, and where a URL said Redis is (checked at attach).
NOT_FOR_CONNECTIONS = frozenset(POOL_KEYS) | {"redis_location"}

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def database(value: Any, source: str = "db") -> int | None:
    """A db number as given (keyword or URL), or None for the manager's default."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise errors.ConfigError(source, value, "a database number (0, 1, ...)") from None
    if number < 0:
        raise errors.ConfigError(source, value, "a database number (0, 1, ...)")
    return number


TLS_MARK = " (TLS)"


def parse_redis_url(url: str) -> tuple[dict[str, Any], str]:
    """The client options and database of a redis:// or unix:// URL, and where it says Redis is.

    Returns (keyword arguments for the pool, the URL's Redis location as
    ``host:port`` or a socket path). Credentials in the URL are dropped: the
    manager authenticates, and a worker never sends them anywhere.
    """
    scheme = urlsplit(url).scheme
    if scheme == "rediss":
        from sharedpool.tls.handshake import without_options

        # The manager verifies Redis and holds the TLS session: a worker's ssl_* options have no say.
        url = without_options(url)
    elif scheme not in ("redis", "unix"):
        raise errors.ConfigError("url", url, "a redis://, rediss:// or unix:// URL")
    try:
        parsed = dict(parse_url(url))
    except ValueError as exc:
        raise errors.ConfigError("url", url, str(exc)) from None
    parsed.pop("connection_class", None)
    for credential in ("username", "password"):
        parsed.pop(credential, None)
    if scheme == "unix":
        location = str(parsed.pop("path", ""))
    else:
        location = f"{parsed.pop('host', 'localhost')}:{parsed.pop('port', 6379)}"
        if scheme == "rediss":
            location += TLS_MARK  # as the manager labels a TLS Redis: plain and TLS never match
    db = database(parsed.pop("db", None), "db in the URL")
    if db is not None:
        parsed["db"] = db
    return parsed, location


def same_redis(url_location: str, manager_label: str) -> bool:
    """Whether a URL's Redis is the one the manager connects to (loopback names count as one)."""
    if url_location == manager_label:
        return True
    if ":" not in url_location or ":" not in manager_label:
        return False  # a socket path against host:port, or two different paths
    url_host, _, url_port = url_location.rpartition(":")
    manager_host, _, manager_port = manager_label.rpartition(":")
    return url_port == manager_port and _is_loopback(url_host) and _is_loopback(manager_host)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pool_options(connection_kwargs: dict[str, Any]) -> str | None:
    """Take out of ``connection_kwargs`` (in place) what a pool does not accept as options:
    another pool's running state and its cap. Returns where a URL said Redis is."""
    for key in RUNTIME_KEYS:
        connection_kwargs.pop(key, None)  # a copied pool's running state, not an option
    # redis-py's per-pool cap: here the manager's max_connections is the cap.
    connection_kwargs.pop("max_connections", None)
    location = connection_kwargs.pop("redis_location", None)
    return None if location is None else str(location)


def record_for_clones(
    connection_kwargs: dict[str, Any], socket_path: str, acquire_timeout: float | None, manager_timeout: float | None,
    db: int | None, redis_location: str | None,
) -> None:
    """Keep in a pool's ``connection_kwargs`` what a copy needs to reach the same shared pool and database."""
    connection_kwargs.update(socket_path=socket_path, acquire_timeout=acquire_timeout, manager_timeout=manager_timeout, db=db)
    if redis_location is not None:
        connection_kwargs["redis_location"] = redis_location


def clone_kwargs(connection_kwargs: dict[str, Any]) -> dict[str, Any]:
    """connection_kwargs without another pool's running state: what a copy is made from."""
    return {key: value for key, value in connection_kwargs.items() if key not in RUNTIME_KEYS}



def client_from_url(cls: Any, pool_class: Any, url: str, kwargs: dict[str, Any]) -> Any:
    """``cls.from_url`` of the sync and asyncio ``SharedRedis``: a client of its own pool made by ``pool_class.from_url``."""
    single = bool(kwargs.pop("single_connection_client", False))
    client = cls(connection_pool=pool_class.from_url(url, **kwargs), single_connection_client=single)
    client.auto_close_connection_pool = True
    return client


def reduce_client(client: Any, single_connection_client: bool) -> tuple[Any, ...]:
    """``__reduce__`` of the sync and asyncio ``SharedRedis``: for a spawned process only the
    options travel, and it attaches afresh."""
    pool_kwargs = clone_kwargs(client.connection_pool.connection_kwargs)
    return (_rebuild_client, (type(client), pool_kwargs, single_connection_client))


def _rebuild_client(cls: Any, pool_kwargs: dict[str, Any], single_connection_client: bool) -> Any:
    return cls(single_connection_client=single_connection_client, **pool_kwargs)
