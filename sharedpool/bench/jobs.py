"""What the bench's runner and its rig share: a job for forked workers, and what the runner asks of the rig.

Its own module so that ``workers`` (the runner) and ``rig`` (the systems
under test) need not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sharedpool.bench.settings import BenchSettings

KEY_PREFIX = "sharedpool-bench:"


@dataclass(frozen=True)
class Job:
    """Everything a forked worker needs; the parent's state is not to be used there."""

    kind: str  # "latency" (S1, every mode in one process), "requests" (S2, S3), "leases" (S5a), "handoffs" (S5b)
    system: str  # PLAIN, SHARED or TWEMPROXY
    address: str  # Redis URL, manager socket path or twemproxy socket path
    protocol: int = 3
    manager: str = ""  # S1: the manager's socket (address is then the Redis URL)
    redis_pid: int = 0  # S1: to charge Redis's CPU to the mode that caused it (0: unknown)
    manager_pid: int = 0
    commands: int = 5
    cpu_us: float = 0.0
    io_ms: float = 0.0
    life: int = 0  # S3: requests before the worker exits to be replaced (0: run to the end)
    warm: bool = True  # False for an S3 replacement: its connection setup is what S3 measures
    pure_python: bool = False  # S5(a): the worker maps the table with the pure-Python core


class Systems(Protocol):
    """What ``run_workers`` needs from the rig: the time budget, Redis's counts, the system's own processes."""

    settings: BenchSettings

    def check_time(self, runs: int = 1, seconds: float | None = None) -> None: ...

    def connected_clients(self) -> int: ...

    def connections_received(self) -> int: ...

    def own_connections(self, job: Job) -> int: ...

    def sidecar_pids(self, job: Job) -> list[int]: ...

    def wait_histogram(self, path: str) -> list[int]: ...
