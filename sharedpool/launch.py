"""Run ``sharedpool serve`` as a child process and wait until it answers.

Used by ``sharedpool demo``, ``sharedpool bench`` and the tests, so that
they start a manager the same way. (The server integrations supervise
their manager themselves: a pre-fork master reaps children with
``waitpid(-1)``, so a ``Popen`` there could poll a reused pid.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from sharedpool import errors, protocol
from sharedpool.client.channel import ControlChannel


class ManagerProcess:
    def __init__(self, socket_path: str, redis_url: str, log_path: str | None = None, **settings: Any) -> None:
        self.socket_path = socket_path
        self.redis_url = redis_url
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "sharedpool", "serve", "--socket-path", self.socket_path]
        for name, value in self.settings.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        return args

    def start(self, timeout: float = 15.0) -> ManagerProcess:
        env = dict(os.environ)
        # The URL goes by environment, never argv, in case it has a password;
        # an empty one leaves it to the config file.
        if self.redis_url:
            env["SHAREDPOOL_REDIS_URL"] = self.redis_url
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.command(), env=env, stdout=output, stderr=subprocess.STDOUT)
        finally:
            if self.log_path:
                output.close()  # type: ignore[union-attr]
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"manager exited with {self.process.returncode}; log: {self.log_path}")
            try:
                channel = ControlChannel(self.socket_path, connect_timeout=1.0, reply_timeout=2.0)
                channel.ping()
                channel.close()
                return
            except errors.SharedPoolError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"manager at {self.socket_path} not ready within {timeout} s; log: {self.log_path}") from None
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        channel = ControlChannel(self.socket_path, connect_timeout=2.0, reply_timeout=5.0)
        try:
            return channel.request(protocol.encode_empty(protocol.FrameType.STATS), protocol.FrameType.STATS_REPLY)
        finally:
            channel.close()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ManagerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
