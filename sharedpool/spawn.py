"""Starting a ``sharedpool serve`` process: its command line, environment and log, readiness, stop.

Shared by every launcher: the development ``ManagerProcess`` (demo, bench,
tests) and the server integrations' ``EmbeddedManager``. They supervise
differently (a pre-fork master reaps every child with ``waitpid(-1)``, so
the embedded manager is watched through a pidfd, never ``Popen.poll``), so
what is shared here takes the supervision as callables.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from sharedpool import admin
from sharedpool import config as _config
from sharedpool.config import ManagerConfig
from sharedpool.config_values import format_addresses

_MANAGER_FIELDS = frozenset(f.name for f in dataclasses.fields(ManagerConfig))
# Never on the command line: the URL may hold a password (argv is world-readable
# in /proc), and the socket path has its own argument.
_NOT_FLAGS = frozenset({"redis_url", "socket_path"})
# Settings that are secrets go by environment too, for the same reason.
_BY_ENVIRONMENT = frozenset({"ssl_password", "sentinel_password"})


def flag_value(name: str, value: Any) -> str:
    """``value`` written the way ``sharedpool serve`` parses the flag of field ``name``.

    A string is taken as already written that way (``socket_mode="660"``).
    """
    if isinstance(value, str):
        return value
    if name == "socket_mode":
        return f"{value:o}"  # parsed as octal: 0o660 is "660", never "432"
    if name == "sentinels" and isinstance(value, (tuple, list)) and all(isinstance(v, tuple) for v in value):
        return format_addresses(tuple(value))
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


class ServeCommand:
    """How to run ``sharedpool serve`` for one socket path with some settings.

    ``settings`` are ``ManagerConfig`` fields (values as Python objects or
    as the strings the flags take); ``redis_url`` goes by environment;
    ``config_file`` becomes ``--config``.
    """

    def __init__(
        self, socket_path: str, settings: Mapping[str, Any] | None = None, *,
        redis_url: str = "", config_file: str = "", log_path: str = "",
    ) -> None:
        settings = dict(settings or {})
        unknown = sorted(set(settings) - _MANAGER_FIELDS)
        if unknown:
            raise ValueError(f"not sharedpool serve settings: {', '.join(unknown)}")
        self.socket_path = socket_path
        self.redis_url = str(settings.pop("redis_url", "") or redis_url)
        settings.pop("socket_path", None)
        self.settings = settings
        self.config_file = config_file
        self.log_path = log_path

    def arguments(self) -> list[str]:
        """The ``serve`` arguments, without the program that takes them."""
        args = ["--socket-path", self.socket_path]
        if self.config_file:
            args += ["--config", self.config_file]
        for name, value in self.settings.items():
            if name not in _NOT_FLAGS and name not in _BY_ENVIRONMENT:
                args += [_config.flag_name(name), flag_value(name, value)]
        return args

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "sharedpool", "serve", *self.arguments()]

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        # An empty URL leaves it to the config file and the environment.
        if self.redis_url:
            env[_config.env_name("redis_url")] = self.redis_url
        for name in _BY_ENVIRONMENT & set(self.settings):
            env[_config.env_name(name)] = flag_value(name, self.settings[name])
        # The manager must import the same sharedpool as its starter, even one
        # found only through the starter's cwd or sys.path (gunicorn --chdir,
        # a source checkout). An installed copy needs nothing: putting
        # site-packages ahead of the standard library could shadow it.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.basename(package_root) not in ("site-packages", "dist-packages"):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        return env

    def popen(
        self, argv: list[str] | None = None, unlogged: int | None = subprocess.DEVNULL, **options: Any,
    ) -> subprocess.Popen[bytes]:
        """Start it, output appended to ``log_path`` (else to ``unlogged``: DEVNULL, or None to inherit)."""
        output: IO[bytes] | int | None = open(self.log_path, "ab") if self.log_path else unlogged
        try:
            return subprocess.Popen(
                argv or self.argv(), env=self.environ(), stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT if output is not None else None, **options,
            )
        finally:
            if self.log_path:
                output.close()  # type: ignore[union-attr]


def wait_until_answers(
    socket_path: str, timeout: float, gone: Callable[[], bool], pause: Callable[[float], None] = time.sleep,
) -> bool:
    """Ping until the manager answers (True), ``gone()`` says to stop, or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not gone():
        if admin.answers(socket_path):
            return True
        if time.monotonic() > deadline:
            return False
        pause(0.02)
    return False


def terminate(send: Callable[[int], None], exited: Callable[[float], bool], grace: float, kill_wait: float = 5.0) -> bool:
    """SIGTERM, wait ``grace`` for the exit, then SIGKILL; True when it had to be killed.

    ``exited(timeout)`` waits at most ``timeout`` and says whether the process is gone.
    """
    send(signal.SIGTERM)
    if exited(grace):
        return False
    send(signal.SIGKILL)
    exited(kill_wait)
    return True
