"""The front door: `sharedpool demo` runs end to end and exits 0."""

from __future__ import annotations

import os
import subprocess

import pytest
from support.cli import run_cli

from sharedpool.dev.redis_server import SERVER_ENV, find_redis_server


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("demo", *args, timeout=120, env=env)


@pytest.mark.slow
def test_demo_runs_for_5_seconds_and_exits_0() -> None:
    result = run_demo("--duration", "5")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = result.stdout.lower()
    assert "requests" in summary and "reaped" in summary
    # The demo finds its server where the tests found theirs (the header of this run).
    assert find_redis_server().path in result.stdout


def test_demo_without_a_server_says_why_and_exits_1(tmp_path) -> None:
    missing = str(tmp_path / "no-such-server")
    result = run_demo("--duration", "1", env={**os.environ, SERVER_ENV: missing})
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"{SERVER_ENV}='{missing}' is not an executable file" in result.stderr
