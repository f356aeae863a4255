"""Protocol module: what the manager's parts that serve workers and watch Redis need of the manager.

``loop.Manager`` satisfies ``ManagerContext``; ``control``, ``handlers``,
``snapshot``, ``sentinel`` and ``cluster`` are typed against it, so that they need not import the loop
that imports them (the loop builds the control server with its handlers,
and asks the snapshot for its stats).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sharedpool.config import ManagerConfig
    from sharedpool.manager.actions import Action
    from sharedpool.manager.backend import RedisTarget
    from sharedpool.manager.cluster import ClusterKeeper
    from sharedpool.manager.control import ControlServer
    from sharedpool.manager.pool_state import Pool
    from sharedpool.manager.reaper import Reaper
    from sharedpool.manager.sentinel import SentinelMonitor
    from sharedpool.manager.snapshot import LeaseTally
    from sharedpool.manager.table_keeper import TableKeeper


class ManagerContext(Protocol):
    """The manager as its control connections' code sees it."""

    config: ManagerConfig
    target: RedisTarget
    epoch: str
    keeper: TableKeeper
    pool: Pool
    counters: Any
    reaper: Reaper
    control: ControlServer
    started_at: float
    lease_tally: LeaseTally
    sentinel: SentinelMonitor | None
    cluster: ClusterKeeper | None

    @property
    def state(self) -> enum.Enum: ...
    def stop(self) -> None: ...
    def reload(self) -> str: ...
    def watch(self, fd: int, handler: Callable[[], None]) -> None: ...
    def unwatch(self, fd: int) -> None: ...
    def pause_accepts(self, seconds: float) -> None: ...
    def sweep_soon(self, at: float) -> None: ...
    def snapshot(self, max_workers: int | None = None) -> dict[str, Any]: ...
    def reap_pid(self, pid: int, now: float | None = None) -> int: ...
    def redispatch(self, now: float) -> None: ...
    def perform(self, actions: list[Action]) -> None: ...
    def call_soon(self, callback: Callable[[float], list[Action]]) -> None: ...
    def submit(self, work: Callable[[], Any], done: Callable[[float, Future[Any]], list[Action]]) -> None: ...
