"""The ``sharedpool`` command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping


def run_cli(*args: str, timeout: float = 30, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sharedpool ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "sharedpool", *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(env))
