"""gunicorn hooks that make every worker of a master share one sharedpool manager.

Use them from ``gunicorn.conf.py``::

    from sharedpool.integrations.gunicorn import *  # noqa: F401,F403

or, with no config file of your own::

    gunicorn -c python:sharedpool.integrations.gunicorn app:app

Settings come from ``SHAREDPOOL_*`` environment variables (see
``sharedpool.integrations``) or from ``configure(...)`` in the config file::

    from sharedpool.integrations import gunicorn as sharedpool_hooks
    from sharedpool.integrations.gunicorn import *  # noqa: F401,F403

    sharedpool_hooks.configure(embedded=True, max_connections=4,
                               redis_url="redis://127.0.0.1:6379/0")

Embedded or separate manager
    With ``SHAREDPOOL_EMBEDDED=1`` (or ``configure(embedded=True)``) the
    master starts a manager as its child in ``on_starting``, restarts it
    whenever it dies (a supervisor thread in the master waits on its
    pidfd), and stops it in ``on_exit``, after the workers. Its settings
    are the usual ``SHAREDPOOL_*`` variables (``SHAREDPOOL_REDIS_URL``,
    ``SHAREDPOOL_MAX_CONNECTIONS``...) and the ``ManagerConfig`` fields
    given to ``configure()``. Without a socket path set, it listens in a
    fresh private directory whose path is exported in
    ``SHAREDPOOL_SOCKET_PATH`` for the workers.
    Otherwise the workers use a manager run separately (``sharedpool
    serve``, a systemd unit...) at ``SHAREDPOOL_SOCKET_PATH``.

preload_app
    A ``sharedpool.Redis()`` made at import time in a preloaded app is
    fine: each worker drops what it inherited and opens its own control
    connection (``post_fork``), and the master closes its own before it
    forks (``when_ready``, ``pre_fork``). The socket path must be known
    before the app is imported: set it in the real environment or call
    ``configure()`` in the config file, both of which happen before the
    preload. (gunicorn's ``raw_env``/``-e`` is applied after the config
    file is read, so do not rely on it for ``SHAREDPOOL_*``.) gunicorn
    imports a preloaded app before it calls any hook, so the embedded
    manager is not running yet then: the app may create its client at
    import time but must not use it before the workers run (or in a
    master-side hook after ``on_starting``); an app that needs Redis
    while it is imported needs a manager run separately.

The hooks
    ``on_starting``/``when_ready`` (master): start the embedded manager;
    release what the master itself holds. ``pre_fork`` (master): the same
    release, before every fork. ``post_fork`` (worker): start the client
    state afresh. ``child_exit`` (master, for every dead worker, SIGKILL
    included): tell the manager at once, so the worker's leases are taken
    back without waiting for the manager's sweep. ``worker_abort`` and
    ``worker_int`` (worker, on timeout or SIGINT/SIGQUIT): close the
    worker's control connections, so the manager takes back the lease of
    a stuck request immediately. ``on_exit`` (master): stop the embedded
    manager. No hook ever raises into gunicorn after the start: failures
    are logged.

Combining with hooks of your own
    A name defined later in the config file replaces the imported one, so
    call ours from yours, or use ``chain``::

        from sharedpool.integrations import gunicorn as sharedpool_hooks
        from sharedpool.integrations.gunicorn import *  # noqa: F401,F403

        def post_fork(server, worker):
            sharedpool_hooks.post_fork(server, worker)   # first: before any Redis use
            ...

        child_exit = sharedpool_hooks.chain(sharedpool_hooks.child_exit, my_child_exit)
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

from sharedpool import admin as _admin
from sharedpool import config as _config
from sharedpool.client.process import after_fork_in_child, close_control_channels, release_process_state
from sharedpool.integrations.embedded import EmbeddedManager
from sharedpool.integrations.settings import (
    SOCKET_ENV,
    IntegrationSettings,
    private_socket_path,
    remove_private_dir,
    settings_from,
)

__all__ = [
    "child_exit",
    "on_exit",
    "on_starting",
    "post_fork",
    "pre_fork",
    "when_ready",
    "worker_abort",
    "worker_int",
]

log = logging.getLogger("sharedpool.integrations.gunicorn")

_settings: IntegrationSettings | None = None
_private_path = ""  # a socket path we made up (and whose directory we remove)
_manager: EmbeddedManager | None = None
_announced = False  # the separately run manager was named in the log


# ----- settings ---------------------------------------------------------------


def configure(**settings: Any) -> IntegrationSettings:
    """Set the integration's settings; keywords override ``SHAREDPOOL_*`` variables.

    ``embedded``, ``socket_path``, ``config_file``, ``manager_log``,
    ``start_timeout``, ``report_timeout``, and any ``ManagerConfig`` field
    for the embedded manager. Call it in the config file, so that it runs
    before a preloaded app is imported.
    """
    global _settings
    resolved = _resolve(settings_from(**settings))
    if _manager is not None and resolved != _settings:
        log.warning("sharedpool settings changed while the embedded manager runs: they apply at the next start")
    _settings = resolved
    return resolved


def current_settings() -> IntegrationSettings:
    """The settings in force (from the environment, unless ``configure`` was called)."""
    return _settings if _settings is not None else configure()


def _resolve(settings: IntegrationSettings) -> IntegrationSettings:
    """Fix the socket path and export it, so that workers and the app find it."""
    global _private_path
    path = settings.socket_path
    if not path and settings.embedded and settings.config_file:
        path = str(_config.load_toml(settings.config_file).get("socket_path", "") or "")
    if not path and settings.embedded:
        if not _private_path:
            _private_path = private_socket_path("gunicorn")
        path = _private_path
    if path:
        os.environ[SOCKET_ENV] = path
    return dataclasses.replace(settings, socket_path=path)


# ----- master-side hooks ---------------------------------------------------------


def on_starting(server: Any) -> None:
    """Master, before anything else: start the embedded manager, if configured."""
    _adopt_server_logging(server)
    _start()


def when_ready(server: Any) -> None:
    """Master, listening and about to fork: make sure the manager runs; hold nothing."""
    _start()
    release_process_state()


def pre_fork(server: Any, worker: Any) -> None:
    """Master, before each fork: the worker must inherit no lease, fd or channel of ours."""
    release_process_state()


def child_exit(server: Any, worker: Any) -> None:
    """Master, after a worker died (SIGKILL included): reap its leases now."""
    pid = getattr(worker, "pid", None)
    if not isinstance(pid, int):
        return
    settings = current_settings()
    try:
        reaped = _admin.report_dead_worker(pid, settings.socket_path or None, timeout=settings.report_timeout)
    except Exception as exc:  # never let a report break the master's loop
        log.warning("could not report dead worker %d to the sharedpool manager: %s", pid, exc)
        return
    if reaped:
        log.warning("sharedpool manager took back %d lease(s) of dead worker %d", reaped, pid)


def on_exit(server: Any) -> None:
    """Master, last: stop the embedded manager (the workers are gone by now)."""
    global _manager
    manager, _manager = _manager, None
    if manager is not None:
        try:
            manager.stop()
        except Exception:
            log.exception("stopping the embedded sharedpool manager failed")
    if _private_path:
        remove_private_dir(os.path.dirname(_private_path))


def _start() -> None:
    global _manager, _announced
    settings = current_settings()
    if not settings.embedded:
        if not _announced:
            log.info("sharedpool: workers use the manager at %s", settings.socket_path or "the default socket")
            _announced = True
        return
    if _manager is not None:
        return
    # Raises on a bad setting or a manager that cannot start: gunicorn then
    # stops with the message, instead of running workers with no pool.
    manager = EmbeddedManager(settings)
    manager.start()
    _manager = manager


# ----- worker-side hooks ------------------------------------------------------------


def post_fork(server: Any, worker: Any) -> None:
    """Worker, just forked: start the client state afresh, keep nothing of the master's."""
    after_fork_in_child()
    if _manager is not None:
        _manager.close_inherited()


def worker_abort(worker: Any) -> None:
    """Worker, on SIGABRT (gunicorn's timeout): let the manager take our leases back now.

    The worker is alive, so the manager would refuse to reap its pid;
    closing its control connections is what ends its leases.
    """
    _close_channels("aborted")


def worker_int(worker: Any) -> None:
    """Worker, on SIGINT/SIGQUIT (quick exit): the same as ``worker_abort``."""
    _close_channels("interrupted")


def _close_channels(why: str) -> None:
    try:
        closed = close_control_channels()
    except Exception:
        log.exception("could not close sharedpool control connections")
        return
    if closed:
        log.info("worker %d %s: closed %d sharedpool control connection(s)", os.getpid(), why, closed)


# ----- helpers -------------------------------------------------------------------------


def chain(*hooks: Callable[..., object]) -> Callable[..., None]:
    """One gunicorn hook that calls ``hooks`` in order.

    gunicorn checks a hook's number of positional parameters, so the
    result declares the same number as the hooks it chains.
    """
    if not hooks:
        raise TypeError("chain() needs at least one hook")
    arities = {_arity(hook) for hook in hooks}
    if len(arities) != 1:
        names = ", ".join(f"{getattr(h, '__name__', h)!s}/{_arity(h)}" for h in hooks)
        raise TypeError(f"cannot chain hooks that take different numbers of arguments: {names}")
    arity = arities.pop()

    def chained(*args: Any) -> None:
        for hook in hooks:
            hook(*args)

    parameters = [inspect.Parameter(f"arg{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for i in range(arity)]
    chained.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    chained.__name__ = "+".join(getattr(h, "__name__", "hook") for h in hooks)
    return chained


def _arity(hook: Callable[..., object]) -> int:
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in inspect.signature(hook).parameters.values() if p.kind in positional)


class _ToServerLog(logging.Handler):
    """Hands our records to gunicorn's error logger, whatever handlers it has now."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def _adopt_server_logging(server: Any) -> None:
    """Send sharedpool's log lines to gunicorn's error log, unless logging is configured."""
    ours = logging.getLogger("sharedpool")
    if ours.handlers or logging.getLogger().handlers:
        return
    target = getattr(getattr(server, "log", None), "error_log", None)
    if isinstance(target, logging.Logger):
        ours.addHandler(_ToServerLog(target))
        ours.setLevel(target.getEffectiveLevel())
        ours.propagate = False


# With SHAREDPOOL_EMBEDDED in the environment, fix (and export) the socket
# path as soon as the config file imports this module: gunicorn imports a
# preloaded app before it calls any hook, and a sharedpool.Redis() made at
# import time reads the path then.
if os.environ.get("SHAREDPOOL_EMBEDDED", "") != "":
    configure()
