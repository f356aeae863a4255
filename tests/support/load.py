"""Load on a server fleet: a bounded number of HTTP requests from a few threads, with worker SIGKILLs at fixed points."""

from __future__ import annotations

import http.client
import os
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from support.redis_view import manager_clients
from support.servers import Server


@dataclass
class Result:
    rid: str
    path: str
    expect: str
    started: float
    ended: float = 0.0
    status: int | None = None
    body: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        if self.status != 200 or not isinstance(self.body, dict):
            return False
        if self.path == "/incr":
            return isinstance(self.body.get("incr"), int)
        return self.body.get("echo") == self.expect


@dataclass
class Kill:
    pid: int
    at: float


class Load:
    """``total`` requests from ``threads`` threads; SIGKILL a random worker at each of ``kill_at`` done."""

    def __init__(self, server: Server, manager_pid: int, total: int = 300, threads: int = 4,
                 kill_at: tuple[int, ...] = (30, 80, 130, 180, 230), budget: float = 60.0) -> None:
        self.server = server
        self.manager_pid = manager_pid
        self.total = total
        self.threads = threads
        self.kill_at = kill_at
        self.deadline = time.monotonic() + budget
        self.results: list[Result] = []
        self.kills: list[Kill] = []
        self.peak = 0
        self.samples = 0
        self._next = 0
        self._done = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._rng = random.Random(os.getpid() ^ server.port)

    def run(self, sampler: redis.Redis, pool_name: str) -> None:
        workers = [threading.Thread(target=self._client, daemon=True) for _ in range(self.threads)]
        helpers = [
            threading.Thread(target=self._killer, daemon=True),
            threading.Thread(target=self._sample, args=(sampler, pool_name), daemon=True),
        ]
        for thread in workers + helpers:
            thread.start()
        for thread in workers:
            thread.join(max(0.0, self.deadline - time.monotonic()) + 15)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in helpers:
            thread.join(15)
        assert not any(t.is_alive() for t in workers + helpers), "load threads did not finish"
        assert len(self.results) == self.total, f"only {len(self.results)} of {self.total} requests ran within the budget"

    def _client(self) -> None:
        while time.monotonic() < self.deadline:
            with self._cond:
                if self._next >= self.total:
                    return
                index = self._next
                self._next += 1
            rid = uuid.uuid4().hex
            if index % 2:
                path, expect = f"/echo?v=v{rid}&rid={rid}", f"v{rid}"
            else:
                path, expect = f"/incr?rid={rid}", ""
            result = Result(rid, path.split("?")[0], expect, time.monotonic())
            try:
                result.status, result.body = self.server.get(path)
            except (OSError, http.client.HTTPException) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            result.ended = time.monotonic()
            with self._cond:
                self.results.append(result)
                self._done += 1
                self._cond.notify_all()

    def _killer(self) -> None:
        for threshold in self.kill_at:
            with self._cond:
                if not self._cond.wait_for(lambda t=threshold: self._done >= t or self._stop.is_set(), timeout=60):
                    return
                if self._stop.is_set():
                    return
            self.server.descendants()  # remember them all, for the cleanup
            for _attempt in range(20):
                candidates = self.server.workers(self.manager_pid)
                if not candidates:
                    break
                pid = self._rng.choice(candidates)
                at = time.monotonic()
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue  # recycled meanwhile: pick another
                self.kills.append(Kill(pid, at))
                break

    def _sample(self, sampler: redis.Redis, pool_name: str) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, len(manager_clients(sampler, pool_name)))
            self.samples += 1
            self._stop.wait(0.01)

    def unexplained_failures(self, admin: redis.Redis) -> list[str]:
        """Failed requests not taken by a killed worker, nor in flight when one was killed."""
        killed = {k.pid for k in self.kills}
        problems = []
        for result in self.results:
            if result.ok:
                continue
            if result.status is not None:
                problems.append(f"{result.path} answered {result.status}: {result.body!r}")
                continue
            taker = admin.get(f"sharedpool-test:rid:{result.rid}")
            if taker is not None:
                if int(taker) not in killed:
                    problems.append(f"{result.path} failed ({result.error}) on worker {taker}, which was not killed")
            elif not any(result.started - 0.5 <= k.at <= result.ended for k in self.kills):
                problems.append(f"{result.path} failed ({result.error}) with no worker killed while it ran")
        return problems
