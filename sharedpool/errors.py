"""sharedpool's exceptions.

Errors a caller may meet in the middle of a Redis command subclass the
redis-py exceptions code already catches: a pool timeout is a
``redis.TimeoutError``, an unreachable manager or Redis a
``redis.ConnectionError``, so that redis-py's retries and the retry loops
of libraries (rq, Celery, django-redis) treat them as the outages they are.

A mistake that retrying cannot fix (a protocol or database the manager does
not serve, a uid it refuses) is a ``Misconfigured``, which is *not* a
``ConnectionError``: a retry loop must not spin on it. Bad configuration
values are ``ConfigError``, a ``ValueError``.
"""

from __future__ import annotations

import re

import redis.exceptions


class SharedPoolError(redis.exceptions.RedisError):
    """Base of every error sharedpool raises at run time."""


class PoolTimeout(SharedPoolError, redis.exceptions.TimeoutError):
    """No lease could be taken within the acquire timeout."""


class PoolFull(SharedPoolError, redis.exceptions.ConnectionError):
    """The manager refused to queue another waiter (``max_waiting``)."""


class ManagerUnavailable(SharedPoolError, redis.exceptions.ConnectionError):
    """No manager answers on the control socket, or it went away."""


class RedisUnavailable(SharedPoolError, redis.exceptions.ConnectionError):
    """The manager cannot open a connection to Redis right now."""


class ShuttingDown(SharedPoolError, redis.exceptions.ConnectionError):
    """The manager is stopping: no new leases."""


class LeaseLost(SharedPoolError, redis.exceptions.ConnectionError):
    """The leased connection was revoked or lost in the middle of a lease."""


class ReplicaAnswered(SharedPoolError, redis.exceptions.ConnectionError):
    """Redis answered READONLY: the server is a replica now (a failover demoted it). The lease ends
    broken and its connection is replaced; a ``ConnectionError``, as redis-py's Sentinel raises, so
    that a retry runs the command again on a fresh lease."""


class LeaseError(SharedPoolError):
    """A lease was misused: released twice, or released by the wrong pool."""


class WorkerLimit(SharedPoolError):
    """This process already holds ``max_leases_per_worker`` leases."""


class StaleSlot(SharedPoolError):
    """Internal: the slot was replaced between reading its row and asking for its fd."""


class Misconfigured(SharedPoolError):
    """Client and manager cannot work together as configured; retrying will not help."""


class Forbidden(Misconfigured):
    """The manager refused this process (uid not allowed, admin denied)."""


class ProtocolMismatch(Misconfigured):
    """Client and manager disagree on the wire protocol or the RESP version."""


class DatabaseNotServed(ProtocolMismatch):
    """The client asked for a database the manager does not serve."""


class ConfigError(ValueError):
    """A configuration value was refused. The message names field, value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        # A refused URL is shown as it was given, but never its password:
        # this message goes to stderr, the journal and tracebacks.
        if isinstance(value, str):
            value = mask_secrets(value)
        allowed = mask_secrets(allowed)
        super().__init__(mask_secrets(f"invalid {field}={value!r}{where}: {allowed}"))
        self.field = field
        self.value = value
        self.allowed = allowed


# scheme://netloc: the netloc ends where a path, query or fragment starts
# (and where a quoted URL in a message ends).
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<netloc>[^/?#\s'\"]*)")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&;](?:ssl_password|password|passwd|pass|pwd|auth|token)=)[^&#\s'\"]*")


def _mask_netloc(match: re.Match[str]) -> str:
    netloc = match.group("netloc")
    credentials, at, host = netloc.rpartition("@")
    if not at or ":" not in credentials:
        return match.group(0)
    user = credentials.partition(":")[0]
    return f"{match.group('scheme')}{user}:***@{host}"


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it (``user:password@`` and
    ``?password=``) replaced by ``***``; whatever the scheme, and even when the
    URL is otherwise malformed (a port that is not a number)."""
    return _QUERY_SECRET.sub(lambda m: m.group("key") + "***", _URL.sub(_mask_netloc, text))


class TLSRecordError(SharedPoolError, redis.exceptions.ConnectionError):
    """A TLS record could not be trusted (tag, alert, KeyUpdate): the connection is broken and replaced."""


class TLSRefused(SharedPoolError, redis.exceptions.ConnectionError):
    """The TLS handshake with Redis failed verification or protocol (one line says which); retrying cannot help."""
