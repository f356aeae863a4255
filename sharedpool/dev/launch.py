"""Run ``sharedpool serve`` as a child process and wait until it answers.

Used by ``sharedpool demo``, ``sharedpool bench`` and the tests. The command
line, environment, log, readiness and stop are ``sharedpool.spawn``'s, the
same the server integrations' embedded manager uses; what is ours is the
plain ``Popen`` supervision, fine for a process that is not a pre-fork master.
"""

from __future__ import annotations

import subprocess
from typing import Any

from sharedpool import admin, spawn


class ManagerProcess:
    """A manager child. ``settings`` are ``ManagerConfig`` fields, plus ``config`` (a TOML file)."""

    def __init__(self, socket_path: str, redis_url: str, log_path: str | None = None, **settings: Any) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        config_file = str(settings.pop("config", "") or "")
        self.settings = settings
        self.command = spawn.ServeCommand(socket_path, settings, redis_url=redis_url, config_file=config_file,
                                          log_path=log_path or "")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> ManagerProcess:
        self.process = self.command.popen()
        self.wait_ready(timeout)
        return self

    def _exited(self, timeout: float) -> bool:
        assert self.process is not None
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def wait_ready(self, timeout: float = 15.0) -> None:
        process = self.process
        if spawn.wait_until_answers(self.socket_path, timeout, gone=lambda: process is not None and process.poll() is not None):
            return
        if process is not None and process.returncode is not None:
            raise RuntimeError(f"manager exited with {process.returncode}; log: {self.log_path}")
        raise RuntimeError(f"manager at {self.socket_path} not ready within {timeout} s; log: {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        return admin.stats(self.socket_path)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            spawn.terminate(self.process.send_signal, self._exited, timeout)
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ManagerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
