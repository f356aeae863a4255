"""Put the shared pool under a library's own tests, as a user converting their settings would.

A library's suite builds its clients the ways its users do:
``redis.ConnectionPool(**parse_url(url))``, ``redis.Redis(db=5)``,
``Redis.from_url(url)``, asyncio alike. In ``shared`` mode every such pool
of plain TCP connections to the suite's Redis is made a
``SharedConnectionPool`` (sync) or ``sharedpool.asyncio.SharedConnectionPool``
instead, at its default configuration, with the options a user would keep:
the client's own (db, decode_responses, socket_timeout, retry, protocol...).
What only says where Redis is and how to log in (host, port, the plain
connection class, and manager-owned options left at redis-py's defaults) is
dropped, as a user drops it when the manager owns it; a manager-owned option
set to anything else is passed on, so the pool refuses it as it would
refuse the user. Pools of other servers, unix sockets, TLS or a connection
class of the suite's own stay plain.

In both modes redis-py's default address, localhost:6379, means the suite's
server (suites written for a Redis on 6379 run against ours on its own
port, and never against a system server that happens to be there).

Installed by the pytest plugin (``sharedpool.dev.suites.plugin``) and, for
interpreters the suite starts itself (``rqworker`` in a subprocess), by the
``sitecustomize`` the runner puts first on their PYTHONPATH.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection
from redis.driver_info import resolve_driver_info

from sharedpool.asyncio import SharedConnectionPool as AsyncSharedConnectionPool
from sharedpool.client.sync_pool import SharedConnectionPool

MODE_ENV = "SHAREDPOOL_SUITE_MODE"  # "plain" or "shared"; unset: nothing installed
REDIS_PORT_ENV = "SHAREDPOOL_SUITE_REDIS_PORT"  # the suite's server, on 127.0.0.1
POOL_OPTIONS_ENV = "SHAREDPOOL_SUITE_POOL_OPTIONS"  # JSON keyword arguments for every shared pool
# "1": redis.asyncio clients of a shared pool autopipeline, as sharedpool.asyncio.Redis(autopipeline=True)
CLIENT_AUTOPIPELINE_ENV = "SHAREDPOOL_SUITE_CLIENT_AUTOPIPELINE"
MODES = ("plain", "shared")

DEFAULT_PORT = 6379  # redis-py's default, where suites expect their server
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})

# What a client's settings say about where Redis is and how to log in: the
# manager's business. Dropped at redis-py's defaults, passed on otherwise.
MANAGER_OWNED = (
    "username", "password", "credential_provider", "client_name", "lib_name", "lib_version", "driver_info",
    "socket_keepalive", "socket_keepalive_options", "socket_connect_timeout", "redis_connect_func",
    "cache", "cache_config", "maint_notifications_config", "ssl",
)

_installed: str | None = None
_pool_options: dict[str, Any] = {}


def _defaults(*functions: Callable[..., Any]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for function in functions:
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                found.setdefault(name, []).append(parameter.default)
    return found


# redis-py's own defaults for each option, from the installed version: what a
# client that never mentioned an option passes to its pool.
_REDIS_DEFAULTS = _defaults(
    redis.Redis.__init__, redis.connection.AbstractConnection.__init__, redis.connection.Connection.__init__,
    redis.asyncio.Redis.__init__, redis.asyncio.connection.AbstractConnection.__init__,
    redis.asyncio.connection.Connection.__init__,
)
_REDIS_DEFAULTS.setdefault("driver_info", []).append(resolve_driver_info())


def at_default(name: str, value: Any) -> bool:
    """Whether ``value`` is what redis-py passes for ``name`` when the user did not set it."""
    if value is None:
        return True
    return any(value is default or _equal(value, default) for default in _REDIS_DEFAULTS.get(name, ()))


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an option type whose == raises is not a default we know
        return False


def is_suite_server(kwargs: Mapping[str, Any], port: int, plain_class: type) -> bool:
    """Whether a pool made with ``kwargs`` connects over plain TCP to the suite's server."""
    if kwargs.get("connection_class", plain_class) is not plain_class:
        return False
    if kwargs.get("path") or kwargs.get("unix_socket_path") or kwargs.get("ssl"):
        return False
    host = str(kwargs.get("host", "localhost")).lower()
    try:
        given = int(kwargs.get("port", DEFAULT_PORT))
    except (TypeError, ValueError):
        return False
    return host in _LOOPBACK and given in (port, DEFAULT_PORT)


def shared_kwargs(kwargs: Mapping[str, Any], pool_options: Mapping[str, Any]) -> dict[str, Any]:
    """The shared pool's arguments for a plain pool's ``kwargs``: the client's options, what the
    user set of the manager's (so that it is refused), and ``pool_options``."""
    kept = {key: value for key, value in kwargs.items() if key not in ("host", "port", "connection_class")}
    for name in MANAGER_OWNED:
        if name in kept and at_default(name, kept[name]):
            del kept[name]
    return {**kept, **pool_options}


def install_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """Install the mode ``SHAREDPOOL_SUITE_MODE`` names; returns it (None when unset)."""
    environ = os.environ if environ is None else environ
    mode = environ.get(MODE_ENV, "")
    if not mode:
        return None
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: one of {', '.join(MODES)}")
    port = int(environ[REDIS_PORT_ENV])
    options = json.loads(environ.get(POOL_OPTIONS_ENV) or "{}")
    install(mode, port, options)
    if mode == "shared" and environ.get(CLIENT_AUTOPIPELINE_ENV) == "1":
        autopipeline_clients()
    return mode


def install(mode: str, port: int, pool_options: Mapping[str, Any] | None = None) -> None:
    """Redirect localhost:6379 to ``port``; in ``shared`` mode, swap the pools too. Once per process."""
    global _installed
    if _installed is not None:
        if _installed != mode:
            raise RuntimeError(f"suite mode {_installed!r} already installed; cannot switch to {mode!r}")
        return
    _installed = mode
    for connection_class in (redis.connection.Connection, redis.asyncio.connection.Connection):
        _redirect_default_port(connection_class, port)
    if mode == "shared":
        _pool_options.update(pool_options or {})
        _swap(redis.connection.ConnectionPool, redis.connection.Connection, SwappedPool, port)
        _swap(redis.asyncio.connection.ConnectionPool, redis.asyncio.connection.Connection, AsyncSwappedPool, port)


def autopipeline_clients() -> None:
    """Make every ``redis.asyncio.Redis`` of a shared pool batch as ``sharedpool.asyncio.Redis(autopipeline=True)``.

    Today autopipelining is the client's (``SharedRedis``), and the suites
    make plain ``redis.asyncio.Redis`` clients around the pool: this gives
    each such client the batcher that client would have, to see what
    autopipelining by default will show before the pool takes it.
    """
    from sharedpool.asyncio.autopipeline import AutoPipeline

    original = redis.asyncio.Redis.execute_command

    async def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        if isinstance(self.connection_pool, AsyncSharedConnectionPool) and not self.single_connection_client:
            batcher = self.__dict__.get("_suite_autopipeline")
            if batcher is None:
                batcher = self.__dict__["_suite_autopipeline"] = AutoPipeline()
            if batcher.takes(args[0]):
                return await batcher.execute(self, args, options)
        return await original(self, *args, **options)  # type: ignore[no-untyped-call]

    redis.asyncio.Redis.execute_command = execute_command  # type: ignore[method-assign]


def _redirect_default_port(connection_class: type, port: int) -> None:
    # Only the socket's connect is redirected: the connection object keeps
    # the host and port it was given, which suites compare with what they
    # configured (rq's worker clones its connection from them).
    original: Callable[..., Any] = connection_class._connect  # type: ignore[attr-defined]

    def redirected(self: Any) -> bool:
        return bool(self.port == DEFAULT_PORT and str(self.host).lower() in _LOOPBACK)

    if inspect.iscoroutinefunction(original):
        async def _connect_async(self: Any) -> Any:
            if not redirected(self):
                return await original(self)
            self.port = port
            try:
                return await original(self)
            finally:
                self.port = DEFAULT_PORT

        connection_class._connect = functools.wraps(original)(_connect_async)  # type: ignore[attr-defined]
    else:
        def _connect(self: Any) -> Any:
            if not redirected(self):
                return original(self)
            self.port = port
            try:
                return original(self)
            finally:
                self.port = DEFAULT_PORT

        connection_class._connect = functools.wraps(original)(_connect)  # type: ignore[attr-defined]


class SwappedPool(SharedConnectionPool):
    """``SharedConnectionPool``, made from a plain pool's arguments (``shared_kwargs``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**shared_kwargs(kwargs, _pool_options))


class AsyncSwappedPool(AsyncSharedConnectionPool):
    """``sharedpool.asyncio.SharedConnectionPool``, made from a plain pool's arguments."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**shared_kwargs(kwargs, _pool_options))


def _swap(plain_pool: type, plain_connection: type, swapped: type, port: int) -> None:
    # Made in __new__, so that every way of making a plain pool (the class,
    # from_url, redis.Redis(...), a library's own copy of one) reaches it;
    # Python then runs the swapped class's __init__ with the same arguments.
    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        if cls is plain_pool and not args and is_suite_server(kwargs, port, plain_connection):
            return object.__new__(swapped)
        return object.__new__(cls)

    plain_pool.__new__ = __new__  # type: ignore[assignment]
