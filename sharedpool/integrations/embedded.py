"""A manager run as a child of a server's master, restarted when it dies, stopped with the master.

Its command line, environment, log, readiness ping and SIGTERM-then-SIGKILL
are ``sharedpool.spawn``'s, as for every launcher; the supervision is its
own, because a pre-fork master reaps every child with ``waitpid(-1)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time

from sharedpool import admin, spawn
from sharedpool.integrations.settings import IntegrationSettings, manager_config

log = logging.getLogger("sharedpool.integrations")


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


class EmbeddedManager:
    """``sharedpool serve`` run as a child of a server's master and kept running.

    One supervisor thread starts the manager, waits on a pidfd for its
    exit, restarts it with a backoff, and stops it on ``stop()``. The pidfd
    matters because a pre-fork master reaps every child with
    ``waitpid(-1)``: once the master has reaped our manager its pid may be
    reused by a new worker, and a plain ``kill(pid)`` or ``waitpid(pid)``
    would then hit that worker. A pidfd always names our process.
    """

    def __init__(self, settings: IntegrationSettings) -> None:
        self.config = manager_config(settings)
        self.socket_path = self.config.socket_path
        self.settings = settings
        self._serve = spawn.ServeCommand(self.socket_path, settings.manager, config_file=settings.config_file,
                                         log_path=settings.manager_log)
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
                if admin.answers(self.socket_path):
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

    def _spawn_and_wait_ready(self) -> bool:
        self.state = ManagerState.STARTING
        argv = [sys.executable, "-c", _ENTRY, str(os.getpid()), *self._serve.arguments()]
        # Its own session: a Ctrl-C meant for the server reaches the master,
        # which stops the workers first and the manager last. No log file:
        # the manager writes to the master's stderr.
        process = self._serve.popen(argv, unlogged=None, start_new_session=True, close_fds=True)
        pidfd = -1
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(process.pid)
        with self._lock:
            self._process, self._pidfd = process, pidfd
        self._last_pid = process.pid
        self._started_at = time.monotonic()
        log.info("embedded sharedpool manager started: pid %d, socket %s", process.pid, self.socket_path)
        return spawn.wait_until_answers(
            self.socket_path, self.settings.start_timeout,
            gone=lambda: self._stopping.is_set() or self._exited(timeout=0.0), pause=self._pause,
        )

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
        if spawn.terminate(self._signal, self._exited_no_wake, self.config.shutdown_grace + 5.0):
            log.warning("embedded sharedpool manager (pid %d) ignored SIGTERM: killed it", process.pid)
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


_ENTRY = "import sharedpool.integrations.embedded as e; e.embedded_main()"
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
