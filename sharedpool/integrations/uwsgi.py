"""uWSGI: every worker of a uWSGI master shares one sharedpool manager.

In the module uWSGI loads, import this module next to ``sharedpool``::

    import sharedpool
    import sharedpool.integrations.uwsgi  # noqa: F401  (registers the @postfork hook)

    r = sharedpool.Redis()

Why a hook at all
    uWSGI forks its workers in C, so the ``os.register_at_fork`` handler
    with which the client drops what a child inherited does not run
    (unless ``py-call-uwsgi-fork-hooks`` is on). The client would still
    notice the new pid on first use; the ``@postfork`` hook (from
    ``uwsgidecorators``, fired in every worker, respawns included) makes
    the reset happen at once and gives the worker fresh locks. Importing
    this module outside uWSGI, or under uWSGI without ``master``, registers
    nothing and is harmless.

lazy-apps off (the default)
    The app, and the module-level ``sharedpool.Redis()``, is created once
    in the master; each worker is forked from it and resets its client
    state in the hook. Do not use Redis in the master at import time
    beyond what you must: whatever the master leases is its own.
lazy-apps on
    Each worker imports the app itself after the fork, so nothing is
    inherited and the hook (registered too late to fire for that worker)
    has nothing to do. Both modes need nothing else.

``env =`` lines and pyuwsgi
    pyuwsgi starts Python before uWSGI reads its options, so ``env =``
    lines reach the C environment (and so the attached manager) but not
    ``os.environ``. Importing this module under uWSGI copies the
    ``SHAREDPOOL_*`` variables that ``os.environ`` lacks from the C
    environment, so import it before making a ``sharedpool.Redis()``.

Dead workers
    uWSGI's master runs no Python when a worker dies, so there is no
    ``child_exit``: a worker that exits, is recycled (``max-requests``,
    ``reload-on-rss``), SIGKILLed or killed by ``harakiri`` closes its
    control connections with its last fd, and the manager takes its leases
    back on that EOF. Its ``reap_interval`` sweep catches the rest (a
    worker whose control socket stays open in a process it forked).

Running the manager under uWSGI's master
    ``attach-daemon2`` runs ``sharedpool serve`` as a child of the master,
    restarts it when it dies and stops it with uWSGI (``stopsignal=15``:
    SIGTERM, on which the manager waits up to ``shutdown_grace`` for
    leases). Set ``die-on-term`` so that SIGTERM stops the whole instance
    cleanly instead of reloading it; ``env`` lines are inherited by the
    manager and the workers alike::

        [uwsgi]
        master = true
        die-on-term = true
        processes = 4
        env = SHAREDPOOL_SOCKET_PATH=/run/myapp/sharedpool.sock
        env = SHAREDPOOL_REDIS_URL=redis://127.0.0.1:6379/0
        env = SHAREDPOOL_MAX_CONNECTIONS=4
        attach-daemon2 = cmd=python -m sharedpool serve,stopsignal=15

    (attach-daemon2 takes comma-separated key=value pairs: keep commas out
    of ``cmd``, which is why the settings go by ``env``; it also keeps the
    Redis password out of argv.) Plain ``attach-daemon = python -m
    sharedpool serve`` works the same, with uWSGI's default stop signal.

    A reload (``uwsgi --reload``, SIGHUP, touch-reload) stops and restarts
    an attached daemon too, so every Redis connection is made again. To
    keep the manager and its connections across reloads, let a pidfile
    govern it instead; the manager writes its pid into ``<socket>.lock``::

        smart-attach-daemon = /run/myapp/sharedpool.sock.lock python -m sharedpool serve

    uWSGI then leaves it running when it reloads or stops: stop it
    yourself when the instance goes away for good (``sharedpool admin
    shutdown --socket-path /run/myapp/sharedpool.sock``, or
    ``hook-as-user-atexit = exec:sharedpool admin shutdown``).

    examples/uwsgi.ini is a complete, tested configuration.
"""

from __future__ import annotations

import ctypes
import logging
import os

from sharedpool.config import ENV_PREFIX
from sharedpool.integrations import after_fork_in_child

__all__ = ["import_uwsgi_environment", "postfork", "register"]

log = logging.getLogger("sharedpool.integrations.uwsgi")

_registered = False


def postfork() -> None:
    """The ``@postfork`` hook: start this worker's client state afresh."""
    try:
        after_fork_in_child()
    except Exception:  # a worker must boot even if the reset failed; first use retries it
        log.exception("sharedpool reset after uWSGI fork failed")


def register() -> bool:
    """Register ``postfork`` with uWSGI; False when not running under a uWSGI master."""
    global _registered
    if _registered:
        return True
    try:
        import uwsgidecorators  # type: ignore[import-untyped, import-not-found]
    except ImportError:
        return False  # not under uWSGI: nothing forks us
    except Exception as exc:
        # uwsgidecorators refuses to load without 'master = true'; without a
        # master there is one process and no fork to recover from.
        log.debug("uWSGI postfork hook not registered: %s", exc)
        return False
    uwsgidecorators.postfork(postfork)
    _registered = True
    return True


def import_uwsgi_environment() -> list[str]:
    """Copy ``SHAREDPOOL_*`` variables set by uWSGI's ``env =`` into ``os.environ``.

    Only those ``os.environ`` lacks; returns their names. A no-op outside
    uWSGI and wherever the C environment cannot be read.
    """
    try:
        import uwsgi  # type: ignore[import-untyped, import-not-found]  # noqa: F401  (only inside uWSGI)
    except ImportError:
        return []
    copied = []
    for key, value in _c_environment().items():
        if key.startswith(ENV_PREFIX) and key not in os.environ:
            os.environ[key] = value
            copied.append(key)
    return copied


def _c_environment() -> dict[str, str]:
    """The process's C ``environ``, which ``setenv()`` changes and ``os.environ`` does not see."""
    try:
        entries = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
    except (OSError, ValueError):
        return {}
    found: dict[str, str] = {}
    index = 0
    while True:
        entry = entries[index]
        if entry is None:
            return found
        key, sep, value = entry.partition(b"=")
        if sep:
            found[os.fsdecode(key)] = os.fsdecode(value)
        index += 1


import_uwsgi_environment()
register()
