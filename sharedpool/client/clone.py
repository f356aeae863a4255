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


def parse_redis_url(url: str) -> tuple[dict[str, Any], str]:
    """The client options and database of a redis:// or unix:// URL, and where it says Redis is.

    Returns (keyword arguments for the pool, the URL's Redis location as
    ``host:port`` or a socket path). Credentials in the URL are dropped: the
    manager authenticates, and a worker never sends them anywhere.
    """
    scheme = urlsplit(url).scheme
    if scheme == "rediss":
        raise errors.ConfigError(
            "url", _without_password(url),
            "rediss:// is not supported: TLS state cannot travel with a passed socket; use the manager's own URL",
        )
    if scheme not in ("redis", "unix"):
        raise errors.ConfigError("url", _without_password(url), "a redis:// or unix:// URL")
    try:
        parsed = dict(parse_url(url))
    except ValueError as exc:
        raise errors.ConfigError("url", _without_password(url), str(exc)) from None
    parsed.pop("connection_class", None)
    for credential in ("username", "password"):
        parsed.pop(credential, None)
    if scheme == "unix":
        location = str(parsed.pop("path", ""))
    else:
        location = f"{parsed.pop('host', 'localhost')}:{parsed.pop('port', 6379)}"
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


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def clone_kwargs(connection_kwargs: dict[str, Any]) -> dict[str, Any]:
    """connection_kwargs without another pool's running state: what a copy is made from."""
    return {key: value for key, value in connection_kwargs.items() if key not in RUNTIME_KEYS}
