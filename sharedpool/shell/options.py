"""The redis-py options a worker may not set, both shells': the manager owns the Redis connections.

A library that builds a pool from a full set of options (Celery's result
backend passes host, port, ``client_name=None``, ``driver_info``) gives
redis-py's own defaults: those ask nothing of the manager and are dropped.
Any other value is refused, saying where to set it instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import redis

from sharedpool import errors

# Settings that belong to the manager: a worker cannot change them per lease.
_MANAGER_OWNED = frozenset({
    "host", "port", "path", "unix_socket_path", "password", "username", "credential_provider",
    "client_name", "lib_name", "lib_version", "driver_info", "ssl", "ssl_keyfile", "ssl_certfile",
    "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "socket_keepalive",
    "socket_keepalive_options", "socket_connect_timeout", "redis_connect_func", "connection_class",
    "cache", "cache_config", "maint_notifications_config",
})
# What the manager's handshake tells Redis about the client (CLIENT SETINFO).
# Libraries pass their own (Celery's driver_info and lib_name): labels only,
# so they are dropped whatever they say.
_LABELS = frozenset({"lib_name", "lib_version", "driver_info"})


def _redis_py_defaults() -> dict[str, tuple[Any, ...]]:
    """The values redis-py itself gives the manager-owned options, read from the installed
    redis-py: libraries that build a pool from a full set of options pass them (Celery's
    result backend does), and a default asks nothing of the manager."""
    found: dict[str, list[Any]] = {name: [None] for name in _MANAGER_OWNED}
    for call in (redis.Redis.__init__, redis.Connection.__init__, redis.SSLConnection.__init__,
                 redis.connection.AbstractConnection.__init__):
        for name, parameter in inspect.signature(call).parameters.items():
            if name in found and parameter.default is not inspect.Parameter.empty:
                found[name].append(parameter.default)
    found["ssl"].append(False)
    found["connection_class"].append(redis.Connection)
    return {name: tuple(values) for name, values in found.items()}


_DEFAULTS = _redis_py_defaults()


def refuse_manager_owned(connection_kwargs: dict[str, Any], own_class: type | None = None) -> str | None:
    """Drop from ``connection_kwargs`` (in place) the manager-owned options a worker gave
    redis-py's default values (the asyncio pool's check too), and refuse the others.

    ``host`` and ``port`` (or a socket path) say where the caller thinks Redis is:
    returned as a location, which the pool checks against the manager's Redis at
    attach. ``own_class`` is the pool's connection class, accepted as
    ``connection_class``.
    """
    location = None
    host, port = connection_kwargs.pop("host", None), connection_kwargs.pop("port", None)
    path = connection_kwargs.pop("unix_socket_path", None) or connection_kwargs.pop("path", None)
    connection_kwargs.pop("path", None)
    if path:
        location = str(path)
    elif host is not None or port is not None:
        location = f"{host or 'localhost'}:{port or 6379}"
    for name in sorted(set(connection_kwargs) & _MANAGER_OWNED):
        value = connection_kwargs[name]
        if name in _LABELS or any(value is d or (type(value) is type(d) and value == d) for d in _DEFAULTS[name]):
            del connection_kwargs[name]
        elif name == "connection_class" and own_class is not None and isinstance(value, type) and issubclass(value, own_class):
            pass  # a subclass of the pool's own (kombu's, which tells its event loop of a disconnect): kept
        else:
            raise errors.ConfigError(
                name, "***" if name in ("password", "credential_provider") else value,
                "not settable in a worker: the sharedpool manager owns the Redis connections "
                "(set it on 'sharedpool serve', e.g. in --redis-url)",
            )
    return location
