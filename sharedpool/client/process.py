"""Hooks for servers: what a master, a fresh worker and a dying worker do with
the client state of their process.

Every ``SharedConnectionPool`` registers itself here when made, so that the
hooks reach pools the application made wherever it likes (at import time in
a preloaded master, in a thread, in a library).
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from typing import Protocol

log = logging.getLogger("sharedpool.client")


class ProcessPool(Protocol):
    """What the hooks do with a sync ``SharedConnectionPool`` (``client.sync_pool``)."""

    pid: int

    def after_fork_in_child(self) -> None: ...
    def disconnect(self, inuse_connections: bool = True) -> None: ...
    def abort(self) -> int: ...


_POOLS: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


class ProcessHooks(Protocol):
    """What another kind of pool (``sharedpool.asyncio``) does at the hooks below, all sync."""

    def after_fork_in_child(self) -> None: ...
    def release_process_state(self) -> None: ...
    def abort(self) -> int: ...


# Kept strongly: each is one module-level registry of its own pools.
_OTHER_HOOKS: list[ProcessHooks] = []


def register_hooks(hooks: ProcessHooks) -> None:
    """Have the server hooks and ``os.fork`` reach pools this module does not know."""
    if hooks not in _OTHER_HOOKS:
        _OTHER_HOOKS.append(hooks)


def register(pool: ProcessPool) -> None:
    _POOLS.add(pool)


def all_pools() -> list[ProcessPool]:
    """Every live ``SharedConnectionPool`` of this process."""
    return list(_POOLS)


def after_fork_in_child() -> None:
    """In a fresh worker: start every pool afresh, keeping nothing of the parent's.

    ``os.fork()`` runs this by itself (``os.register_at_fork``); servers that
    fork in C (uWSGI, unless ``py-call-uwsgi-fork-hooks``) do not, so their
    post-fork hook calls it. Idempotent.
    """
    for pool in all_pools():
        try:
            pool.after_fork_in_child()
        except Exception:  # one pool must not break a fork
            log.debug("pool reset after fork failed", exc_info=True)
    for hooks in _OTHER_HOOKS:
        try:
            hooks.after_fork_in_child()
        except Exception:
            log.debug("pool reset after fork failed", exc_info=True)


def release_process_state() -> None:
    """Close this process's control channels and cached fds (not leases in use).

    A master calls it before forking so that its workers inherit nothing of
    it (an app preloaded in the master may have used Redis at import time).
    """
    for pool in all_pools():
        try:
            pool.disconnect(inuse_connections=False)
        except Exception:
            log.debug("could not release %r", pool, exc_info=True)
    for hooks in _OTHER_HOOKS:
        try:
            hooks.release_process_state()
        except Exception:
            log.debug("could not release %r", hooks, exc_info=True)


def close_control_channels() -> int:
    """End every lease and control channel of this process at once; return how many.

    For a worker about to die while a request may be stuck holding a lease
    (gunicorn's ``worker_abort``): the manager shuts those connections down,
    which also wakes a thread blocked reading from Redis, and replaces them.
    Takes no lock, because the thread that was interrupted may hold one.
    """
    ended = 0
    for pool in all_pools():
        try:
            ended += pool.abort()
        except Exception:
            log.debug("could not abort %r", pool, exc_info=True)
    for hooks in _OTHER_HOOKS:
        try:
            ended += hooks.abort()
        except Exception:
            log.debug("could not abort %r", hooks, exc_info=True)
    return ended


def _close_at_exit() -> None:
    # A worker leaving normally closes its descriptions: the manager sees
    # its channel end and nothing is left for a sweep to find.
    for pool in all_pools():
        try:
            if pool.pid == os.getpid():
                pool.disconnect(inuse_connections=False)
        except Exception:
            pass
    for hooks in _OTHER_HOOKS:
        try:
            hooks.release_process_state()
        except Exception:
            pass


os.register_at_fork(after_in_child=after_fork_in_child)
atexit.register(_close_at_exit)
