"""Server integrations: what fits sharedpool into a pre-fork server.

* ``sharedpool.integrations.gunicorn``: gunicorn hooks under gunicorn's own
  names (``from sharedpool.integrations.gunicorn import *`` in
  ``gunicorn.conf.py``).
* ``sharedpool.integrations.uwsgi``: the ``@postfork`` registration and how
  to run the manager under uWSGI's master (``attach-daemon2``).

This module holds what both need, independent of any server:

* ``Settings`` / ``settings_from()``: the integration's own settings, from
  ``SHAREDPOOL_*`` environment variables and keyword overrides;
* ``EmbeddedManager``: a manager run as a child of the server's master,
  restarted when it dies and stopped with the master;
* re-exported from ``sharedpool.client.process`` (the public client hooks):
  ``after_fork_in_child()``, ``release_process_state()`` and
  ``close_control_channels()``.

Environment variables read here (the manager's own settings, such as
``SHAREDPOOL_REDIS_URL`` or ``SHAREDPOOL_MAX_CONNECTIONS``, are read by the
manager itself, which inherits the master's environment):

``SHAREDPOOL_EMBEDDED``
    ``1``/``true``/``yes``/``on``: the master starts and supervises its own
    manager. Otherwise the workers use a manager run separately
    (``sharedpool serve``, systemd, ``attach-daemon2``...).
``SHAREDPOOL_SOCKET_PATH`` (or ``SHAREDPOOL_SOCKET``)
    The control socket. Embedded and unset: a fresh private directory per
    master, exported in ``SHAREDPOOL_SOCKET_PATH`` so that the workers (and
    a ``sharedpool.Redis()`` made at import time) find it.
``SHAREDPOOL_CONFIG``
    A TOML file for the embedded manager (``sharedpool serve --config``).
``SHAREDPOOL_MANAGER_LOG``
    File the embedded manager logs to (default: the master's stderr).
``SHAREDPOOL_START_TIMEOUT``
    Seconds the master waits for the embedded manager to answer (15).
``SHAREDPOOL_REPORT_TIMEOUT``
    Seconds the master waits for the manager when reporting a dead worker (1).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import enum
import fcntl
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from sharedpool import config as _config
from sharedpool import errors
from sharedpool.client.process import after_fork_in_child, close_control_channels, release_process_state
from sharedpool.client.channel import ControlChannel
from sharedpool.config import ENV_PREFIX, SOCKET_ENV_ALIAS, ManagerConfig

__all__ = [
    "EmbeddedManager",
    "ManagerState",
    "Settings",
    "after_fork_in_child",
    "close_control_channels",
    "embedded_main",
    "release_process_state",
    "settings_from",
]

log = logging.getLogger("sharedpool.integrations")

SOCKET_ENV = _config.env_name("socket_path")  # SHAREDPOOL_SOCKET_PATH

_MANAGER_FIELDS = frozenset(f.name for f in dataclasses.fields(ManagerConfig))


# ----- settings ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The integration's settings; ``manager`` holds ``ManagerConfig`` overrides."""

    embedded: bool = False
    socket_path: str = ""
    config_file: str = ""
    manager_log: str = ""
    start_timeout: float = 15.0
    report_timeout: float = 1.0
    manager: Mapping[str, Any] = field(default_factory=dict)


_SETTING_ENV = {
    "embedded": ENV_PREFIX + "EMBEDDED",
    "config_file": ENV_PREFIX + "CONFIG",
    "manager_log": ENV_PREFIX + "MANAGER_LOG",
    "start_timeout": ENV_PREFIX + "START_TIMEOUT",
    "report_timeout": ENV_PREFIX + "REPORT_TIMEOUT",
}


def _parse_setting(name: str, raw: Any, source: str) -> Any:
    if name == "embedded":
        if isinstance(raw, bool):
            return raw
        try:
            return _config._parse_bool(str(raw))
        except ValueError:
            raise errors.ConfigError(name, raw, "1, true, yes, on, 0, false, no or off", source) from None
    if name in ("start_timeout", "report_timeout"):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise errors.ConfigError(name, raw, "a number of seconds", source) from None
        if isinstance(raw, bool) or not value > 0:
            raise errors.ConfigError(name, raw, "a number of seconds greater than 0", source)
        return value
    if not isinstance(raw, str):
        raise errors.ConfigError(name, raw, "a path", source)
    return raw


def settings_from(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from ``SHAREDPOOL_*`` variables, overridden by keyword arguments.

    Keyword arguments are the ``Settings`` fields other than ``manager``,
    plus any ``ManagerConfig`` field (``max_connections=2``,
    ``redis_url=...``), which goes to the embedded manager. Every value is
    checked here, so a typo stops the server at start, naming the setting.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, key in _SETTING_ENV.items():
        if environ.get(key, "") != "":
            values[name] = _parse_setting(name, environ[key], key)
    socket_path = environ.get(SOCKET_ENV) or environ.get(SOCKET_ENV_ALIAS) or ""
    manager: dict[str, Any] = {}
    for name, raw in overrides.items():
        if raw is None:
            continue
        if name == "socket_path":
            socket_path = str(raw)
        elif name in _SETTING_ENV:
            values[name] = _parse_setting(name, raw, f"configure({name}=...)")
        elif name in _MANAGER_FIELDS:
            manager[name] = raw
        else:
            allowed = sorted(set(_SETTING_ENV) | _MANAGER_FIELDS)
            raise errors.ConfigError(name, raw, "a known setting: " + ", ".join(allowed), "configure()")
    if manager:
        # Convert and check now, with the same rules as 'sharedpool serve'.
        checked = _config.build(ManagerConfig, environ={}, overrides=manager)
        manager = {name: getattr(checked, name) for name in manager}
    return Settings(socket_path=socket_path, manager=manager, **values)


def manager_config(settings: Settings, environ: Mapping[str, str] | None = None) -> ManagerConfig:
    """The config the embedded manager will run with: file < environment < settings."""
    toml = _config.load_toml(settings.config_file) if settings.config_file else None
    overrides = dict(settings.manager)
    if settings.socket_path:
        overrides["socket_path"] = settings.socket_path
    built: ManagerConfig = _config.build(
        ManagerConfig, toml=toml, toml_source=settings.config_file, environ=environ, overrides=overrides
    )
    return built


def private_socket_path(server: str) -> str:
    """A control socket in a fresh 0700 directory of its own (``mkdtemp``).

    The directory is removed at exit by the process that made it (not by
    the workers it forks, which inherit the ``atexit`` handler).
    """
    directory = tempfile.mkdtemp(prefix=f"sharedpool-{server}-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            remove_private_dir(directory)

    atexit.register(remove)
    return os.path.join(directory, "sp.sock")


def remove_private_dir(directory: str) -> None:
    """Remove a directory made by ``private_socket_path`` unless a manager still holds it."""
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if name.endswith(".lock") and not _lock_is_free(os.path.join(directory, name)):
            log.info("not removing %s: a manager still serves from it", directory)
            return
    shutil.rmtree(directory, ignore_errors=True)


def _lock_is_free(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# ----- the embedded manager ----------------------------------------------------


class ManagerState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    FOREIGN = "served by another manager"  # someone else holds the socket path
    BACKOFF = "waiting to restart"
    STOPPING = "stopping"


_RESTART_DELAY_MIN = 0.25
_RESTART_DELAY_MAX = 5.0
_STABLE_AFTER = 10.0  # a manager up this long resets the restart backoff
_FOREIGN_POLL = 1.0


def _flag_value(name: str, value: Any) -> str:
    if name == "socket_mode":
        return f"{value:o}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


class EmbeddedManager:
    """``sharedpool serve`` run as a child of a server's master and kept running.

    One supervisor thread starts the manager, waits on a pidfd for its
    exit, restarts it with a backoff, and stops it on ``stop()``. The pidfd
    matters because a pre-fork master reaps every child with
    ``waitpid(-1)``: once the master has reaped our manager its pid may be
    reused by a new worker, and a plain ``kill(pid)`` or ``waitpid(pid)``
    would then hit that worker. A pidfd always names our process.
    """

    def __init__(self, settings: Settings) -> None:
        self.config = manager_config(settings)
        self.socket_path = self.config.socket_path
        self.settings = settings
        self.state = ManagerState.STOPPED
        self.restarts = 0
        self.owner_pid = os.getpid()
        self._process: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._started_at = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._first_start_done = threading.Event()
        self._first_start_error: str = ""
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()

    def __repr__(self) -> str:
        return (
            f"<EmbeddedManager {self.socket_path} [{self.state.value}, pid {self.pid or '-'}, "
            f"{self.restarts} restarts]>"
        )

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    # ----- the master's side --------------------------------------------------

    def start(self) -> None:
        """Start the supervisor; return once the manager answers (or raise)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._supervise, name="sharedpool-manager-supervisor", daemon=True)
        self._thread.start()
        if not self._first_start_done.wait(self.settings.start_timeout + 5.0):
            self._first_start_error = f"no answer within {self.settings.start_timeout:.1f} s"
        if self._first_start_error:
            problem = self._first_start_error
            self.stop()
            raise RuntimeError(
                f"embedded sharedpool manager at {self.socket_path} did not start: {problem}"
                + (f" (log: {self.settings.manager_log})" if self.settings.manager_log else "")
            )

    def stop(self) -> int | None:
        """Stop the manager (SIGTERM, then SIGKILL after its grace); return its exit status."""
        if os.getpid() != self.owner_pid:
            return None  # a forked worker never stops its master's manager
        self._stopping.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.config.shutdown_grace + 10.0)
            if thread.is_alive():
                # Leave its descriptors open: closing them under a running
                # thread could make it write to a reused fd number.
                log.error("sharedpool manager supervisor did not stop in time")
                return None
        with self._lock:
            process = self._process
            wake = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = -1
        for fd in wake:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return process.returncode if process is not None else None

    def close_inherited(self) -> None:
        """In a forked child: drop the master's descriptors, touch nothing else."""
        if os.getpid() == self.owner_pid:
            return
        for fd in (self._pidfd, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfd = self._wake_r = self._wake_w = -1
        if self._process is not None and self._process.returncode is None:
            # Not our child: keep subprocess from ever waitpid()ing it here.
            self._process.returncode = -255
        self._process = None
        self._thread = None

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ----- the supervisor thread ----------------------------------------------

    def _supervise(self) -> None:
        delay = _RESTART_DELAY_MIN
        try:
            while not self._stopping.is_set():
                if _answers(self.socket_path):
                    # Another manager (an old master's during a USR2 upgrade,
                    # or one run by hand) serves the path: use it, and take
                    # over when it goes away.
                    if self.state is not ManagerState.FOREIGN:
                        log.warning("another manager already serves %s: using it until it stops", self.socket_path)
                        self.state = ManagerState.FOREIGN
                    self._first_start_done.set()
                    self._pause(_FOREIGN_POLL)
                    continue
                ready = self._spawn_and_wait_ready()
                if self._stopping.is_set():
                    break
                if not ready:
                    if not self._first_start_done.is_set():
                        self._first_start_error = self._exit_description() or "it never answered"
                        self._first_start_done.set()
                        return
                    self._terminate()
                else:
                    self.state = ManagerState.RUNNING
                    self._first_start_done.set()
                    self._wait_exit()
                    if self._stopping.is_set():
                        break
                uptime = time.monotonic() - self._started_at
                delay = _RESTART_DELAY_MIN if uptime >= _STABLE_AFTER else min(delay * 2, _RESTART_DELAY_MAX)
                log.error(
                    "embedded sharedpool manager (pid %s) %s after %.1f s; restarting in %.2f s",
                    self._last_pid, self._exit_description(), uptime, delay,
                )
                self.state = ManagerState.BACKOFF
                self._pause(delay)
                self.restarts += 1
        except Exception as exc:  # the master must outlive any bug of ours
            # The manager goes too (below, and by its parent-death signal).
            log.exception("sharedpool manager supervisor failed: stopping the embedded manager")
            self._first_start_error = self._first_start_error or f"{type(exc).__name__}: {exc}"
            self._first_start_done.set()
        finally:
            self.state = ManagerState.STOPPING
            self._terminate()
            self.state = ManagerState.STOPPED

    def _pause(self, seconds: float) -> None:
        if self._wake_r < 0:
            return
        readable, _, _ = select.select([self._wake_r], [], [], seconds)
        if readable:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 64)

    def _command(self) -> list[str]:
        args = ["--socket-path", self.socket_path]
        if self.settings.config_file:
            args += ["--config", self.settings.config_file]
        for name, value in self.settings.manager.items():
            if name in ("redis_url", "socket_path"):
                continue  # the URL goes by environment (it may hold a password)
            args += [_config.flag_name(name), _flag_value(name, value)]
        return [sys.executable, "-c", _ENTRY, str(os.getpid()), *args]

    def _child_environ(self) -> dict[str, str]:
        # The environment as it is now: the socket path was exported into it.
        env = dict(os.environ)
        if "redis_url" in self.settings.manager:
            env[_config.env_name("redis_url")] = str(self.settings.manager["redis_url"])
        # The manager must import the same sharedpool as the master, even one
        # found only through the master's cwd or sys.path (gunicorn --chdir,
        # a source checkout). An installed copy needs nothing: putting
        # site-packages ahead of the standard library could shadow it.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(_config.__file__)))
        if os.path.basename(package_root) not in ("site-packages", "dist-packages"):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        return env

    def _spawn_and_wait_ready(self) -> bool:
        self.state = ManagerState.STARTING
        output: IO[bytes] | None = None
        if self.settings.manager_log:
            output = open(self.settings.manager_log, "ab")
        try:
            process = subprocess.Popen(
                self._command(),
                env=self._child_environ(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                # Its own session: a Ctrl-C meant for the server reaches the
                # master, which stops the workers first and the manager last.
                start_new_session=True,
                close_fds=True,
            )
        finally:
            if output is not None:
                output.close()
        pidfd = -1
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(process.pid)
        with self._lock:
            self._process, self._pidfd = process, pidfd
        self._last_pid = process.pid
        self._started_at = time.monotonic()
        log.info("embedded sharedpool manager started: pid %d, socket %s", process.pid, self.socket_path)
        deadline = self._started_at + self.settings.start_timeout
        while not self._stopping.is_set():
            if self._exited(timeout=0.0):
                return False
            if _answers(self.socket_path):
                return True
            if time.monotonic() > deadline:
                return False
            self._pause(0.02)
        return False

    def _exited(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for the manager to exit (None: until woken)."""
        process = self._process
        if process is None or process.returncode is not None:
            return True
        if self._pidfd >= 0:
            watch = [self._pidfd] + ([self._wake_r] if self._wake_r >= 0 else [])
            readable, _, _ = select.select(watch, [], [], timeout)
            if self._pidfd in readable:
                self._collect()
                return True
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
            return False
        # No pidfd (not Linux >= 5.3): poll, accepting the pid-reuse window.
        if process.poll() is not None:
            return True
        self._pause(min(timeout if timeout is not None else 1.0, 1.0))
        return process.poll() is not None

    def _collect(self) -> None:
        """Record the exit status, whoever reaped the process."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        status: int | None = None
        try:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            if result is not None:
                status = result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
        except ChildProcessError:
            status = None  # the master's waitpid(-1) reaped it first: status unknown
        # Setting returncode keeps subprocess from ever calling waitpid() on
        # this pid again (Popen.__del__ would queue it for that), which after
        # reuse could reap one of the master's workers.
        process.returncode = status if status is not None else -255
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        self._pidfd = -1

    def _wait_exit(self) -> None:
        while not self._stopping.is_set():
            if self._exited(timeout=None if self._pidfd >= 0 else 1.0):
                return

    def _exit_description(self) -> str:
        process = self._process
        if process is None or process.returncode is None:
            return ""
        code = process.returncode
        if code == -255:
            return "exited (status collected by the server)"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def _terminate(self) -> None:
        """SIGTERM the manager, wait its shutdown grace, then SIGKILL."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + 5.0
        while not self._exited_no_wake(max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                log.warning("embedded sharedpool manager (pid %d) ignored SIGTERM: killing it", process.pid)
                self._signal(signal.SIGKILL)
                self._exited_no_wake(5.0)
                break
        log.info("embedded sharedpool manager (pid %d) %s", process.pid, self._exit_description() or "stopped")

    def _exited_no_wake(self, timeout: float) -> bool:
        # During a stop the wake pipe is full of stop requests: wait on the pidfd only.
        process = self._process
        if process is None or process.returncode is not None:
            return True
        if self._pidfd >= 0:
            readable, _, _ = select.select([self._pidfd], [], [], timeout)
            if readable:
                self._collect()
                return True
            return False
        try:
            process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _signal(self, signum: int) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        try:
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, signum)
            else:
                process.send_signal(signum)
        except ProcessLookupError:
            pass

    _last_pid: int = 0


_ENTRY = "import sharedpool.integrations as i; i.embedded_main()"
_PR_SET_PDEATHSIG = 1


def embedded_main() -> None:
    """The embedded manager's process: ``sharedpool serve``, tied to the master's life.

    argv: the master's pid, then ``serve`` arguments. On Linux it first asks
    the kernel for SIGTERM when the thread that started it (the supervisor,
    which lives as long as the master) dies, so a SIGKILLed master leaves
    no orphan holding Redis connections. Done here, after exec, because
    ``preexec_fn`` is unsafe in a process with threads.
    """
    master = int(sys.argv[1])
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != master:
        sys.exit(0)  # the master died before the request took effect
    from sharedpool.cli import main

    sys.exit(main(["serve", *sys.argv[2:]]))


def _answers(socket_path: str) -> bool:
    """Whether a manager answers a PING at ``socket_path`` right now."""
    try:
        channel = ControlChannel(socket_path, connect_timeout=1.0, reply_timeout=2.0)
    except errors.SharedPoolError:
        return False
    try:
        channel.ping()
        return True
    except errors.SharedPoolError:
        return False
    finally:
        channel.close()
