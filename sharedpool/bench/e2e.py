"""E2E's processes: gunicorn serving ``wsgi_app`` and wrk loading it.

gunicorn runs in its own session so that its master and workers can all be
killed at once; wrk's text output is parsed for requests/s and latency.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from sharedpool.dev.redis_server import free_port

START_TIMEOUT = 30.0  # master up and every worker past its import and first command
WRK_GRACE = 15.0  # past wrk's own duration before it is killed


class Gunicorn:
    """A gunicorn master with ``workers`` sync workers serving ``sharedpool.bench.wsgi_app`` on 127.0.0.1."""

    def __init__(self, directory: str, name: str, workers: int, app_env: dict[str, str]) -> None:
        self.name, self.workers = name, workers
        self.log_path = os.path.join(directory, f"gunicorn-{name}.log")
        self.ready_dir = tempfile.mkdtemp(prefix=f"ready-{name}-", dir=directory)
        self.env = dict(os.environ, SHAREDPOOL_BENCH_READY_DIR=self.ready_dir, **app_env)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._deadline = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def launch(self) -> Gunicorn:
        """Start the master; ``wait_ready`` waits for its workers (so several can boot at once)."""
        self.port = free_port()
        argv = [sys.executable, "-m", "gunicorn", "--workers", str(self.workers), "--worker-class", "sync",
                "--bind", f"127.0.0.1:{self.port}", "--backlog", "1024", "--log-level", "warning",
                "--error-logfile", self.log_path, "--graceful-timeout", "2",
                # gunicorn 27 opens ~/.gunicorn/gunicorn.ctl by default: parallel instances would collide.
                "--no-control-socket", "sharedpool.bench.wsgi_app:app"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        self._deadline = time.monotonic() + START_TIMEOUT
        return self

    def wait_ready(self) -> Gunicorn:
        """Wait until every worker has built its client and used it once."""
        assert self.process is not None, "launch() first"
        while len(os.listdir(self.ready_dir)) < self.workers:
            if self.process.poll() is not None or time.monotonic() > self._deadline:
                booted = len(os.listdir(self.ready_dir))
                self.stop()
                raise RuntimeError(f"gunicorn ({self.name}) did not boot {self.workers} workers within "
                                   f"{START_TIMEOUT:.0f} s ({booted} ready); see {self.log_path}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM the master, then SIGKILL whatever of its session is left."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its session: workers a dead master left behind too
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(5.0)
        self.process = None
        shutil.rmtree(self.ready_dir, ignore_errors=True)


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: str  # "" when every response was a 2xx and no socket failed


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text.strip()).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS_MS[unit]


def parse_wrk(output: str) -> WrkResult:
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s*(\d+) requests in ", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rate and total and p50 and p99):
        raise RuntimeError(f"cannot read wrk's output: {output.strip()[:300]!r}")
    errors = [m.group(0).strip() for m in re.finditer(r"^\s*(Socket errors:.*|Non-2xx or 3xx responses:.*)$", output, re.M)]
    return WrkResult(float(rate.group(1)), int(total.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), "; ".join(errors))


def run_wrk(binary: str, url: str, connections: int, seconds: int) -> WrkResult:
    """``wrk -t2 -c<connections> -d<seconds>s --latency``, killed if it outlives its window by WRK_GRACE."""
    threads = min(2, connections)
    argv = [binary, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s", url]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        try:
            raw, _ = proc.communicate(timeout=seconds + WRK_GRACE)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"wrk still running {WRK_GRACE:.0f} s after its {seconds} s window") from None
        output = raw.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"wrk exited with code {proc.returncode}: {output.strip()[:300]}")
        return parse_wrk(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
