"""A sync pool's per-process state: its attachment to the manager, each
thread's taker, and starting afresh after a fork.

``Attaching`` is the half of ``SharedConnectionPool`` that finds the
manager (a control channel, its WELCOME checked against the pool's
options), notices when that manager is gone (at most every
``LIVENESS_S``) and drops its table and connections, and gives each thread
its own ``Taker`` with the poller its blocking waits use. A forked child
closes its copies of the parent's fds and starts with none of them.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Any

from sharedpool import errors
from sharedpool.client.channel import open_channel
from sharedpool.lease.core import Taker
from sharedpool.shell import links
from sharedpool.shell.attachment import Attachment
from sharedpool.shell.pool_base import PoolBase


class ThreadState(Taker):
    """A thread's taker, with the poller its blocking waits use. Closed with the thread."""

    def __init__(self, attachment: Attachment) -> None:
        super().__init__(attachment)
        self.poller = select.poll()

    def wake_socket(self) -> socket.socket:
        if self.wake is None:
            self.poller.register(super().wake_socket().fileno(), select.POLLIN)
        return super().wake_socket()


class Attaching(PoolBase):
    """This process's attachment and threads' takers, for ``SharedConnectionPool``."""

    _fork_lock: Any  # redis-py's, around _checkpid

    def reset(self) -> None:
        """Start this process's state afresh (also what a forked child does)."""
        old: Attachment | None = getattr(self, "_attachment", None)
        old_local: threading.local | None = getattr(self, "_local", None)
        inherited = getattr(self, "pid", os.getpid()) != os.getpid()
        self.pid = os.getpid()
        self._local = threading.local()
        self._attach_lock = threading.Lock()
        self._attachment: Attachment | None = None
        self._created_connections = 0
        self._available_connections: list[Any] = []
        self._in_use_connections: set[Any] = set()
        if inherited:
            # The parent's fds, table and channel are the parent's: close our
            # copies, unlock nothing, tell no one (DESIGN facts 5 and 12).
            state = getattr(old_local, "state", None) if old_local is not None else None
            if state is not None:
                state.close()
            if old is not None:
                old.abandon()

    def _checkpid(self) -> None:
        if self.pid != os.getpid():
            with self._fork_lock:
                if self.pid != os.getpid():
                    self.reset()

    def _attach(self, deadline: float) -> Attachment:
        att = self._attachment
        if att is not None and not att.detached:
            if att.still_serves():
                return att
            self._detach(att)
        if not self._attach_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise errors.ManagerUnavailable(
                f"no sharedpool manager at {self.config.socket_path}: another thread is still connecting"
            )
        try:
            att = self._attachment
            if att is not None and not att.detached:
                return att
            # One control connection per process and manager, shared by its sync pools.
            link = links.find(self.config.socket_path)
            if link is None:
                link = links.add(self.config.socket_path, open_channel(self.config.socket_path, deadline))
            att = self._attachment_on(link)
            self._attachment = att
            return att
        finally:
            self._attach_lock.release()

    def _detach(self, att: Attachment) -> None:
        if self._attachment is att:
            self._attachment = None
        att.detach()

    def _thread_state(self, att: Attachment) -> ThreadState:
        state: ThreadState | None = getattr(self._local, "state", None)
        if state is not None and state.attachment is att and state.lock_fd >= 0:
            return state
        if state is not None:
            state.close()
        state = ThreadState(att)
        self._local.state = state
        return state
