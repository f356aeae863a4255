"""The front door: `sharedpool demo` runs end to end and exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_for_5_seconds_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sharedpool", "demo", "--duration", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = result.stdout.lower()
    assert "requests" in summary and "reaped" in summary
