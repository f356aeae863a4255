"""``sharedpool demo``: one command that shows many workers sharing few Redis connections.

It starts a throwaway ``redis-server`` (unless ``--redis-url`` is given), a
manager allowed ``--max-connections`` connections, and ``--workers``
forked worker processes, each running a request mix through
``sharedpool.Redis`` and checking that it reads back what it wrote. Every
``--kill-every`` seconds one worker is SIGKILLed, sometimes mid-lease, and
replaced, as gunicorn replaces a dead worker. Redis's own ``CLIENT LIST``
is the witness for how many connections the whole fleet used.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import multiprocess
import redis

import sharedpool
from sharedpool.config import mask_url
from sharedpool.dev.launch import ManagerProcess
from sharedpool.dev.redis_server import RedisServer, RedisServerNotFound

POOL_NAME = "demo"
CLIENT_NAME_PREFIX = f"sharedpool:{POOL_NAME}:"
KEY_TTL = 600  # keys of a demo run against a real --redis-url vanish on their own
# Slots of each worker's shared counter array. Lock-free on purpose: a
# worker SIGKILLed while holding a lock would leave it held for ever.
REQUESTS, MISMATCHES, ERRORS, HOLDING = range(4)


class _Session:
    """One worker's request mix; it knows what it wrote, so it can check every read."""

    def __init__(self, client: sharedpool.SharedRedis, prefix: str, seed: int) -> None:
        self.r = client
        self.rng = random.Random(seed)
        self.session, self.stats, self.feed = f"{prefix}:session", f"{prefix}:stats", f"{prefix}:feed"
        self.token = ""
        self.hits = -1  # unknown until synced

    def sync(self) -> None:
        # After an error we cannot know which writes landed: learn them again.
        self.token = f"t{self.rng.getrandbits(48):x}"
        self.r.set(self.session, self.token, ex=KEY_TTL)
        self.hits = int(self.r.hget(self.stats, "hits") or 0)

    def request(self, cells: Any) -> int:
        """One "web request"; returns how many reads disagreed with our writes."""
        if self.hits < 0:
            self.sync()
        bad = int(self.r.get(self.session) != self.token)
        self.hits += 1
        bad += int(self.r.hincrby(self.stats, "hits", 1) != self.hits)
        self.token = f"t{self.rng.getrandbits(48):x}"
        with self.r.pipeline() as pipe:
            pipe.set(self.session, self.token, ex=KEY_TTL)
            pipe.expire(self.stats, KEY_TTL)
            pipe.get(self.session)
            pipe.hget(self.stats, "hits")
            _, _, token, hits = pipe.execute()
        bad += int(token != self.token or int(hits) != self.hits)
        if self.rng.random() < 0.3:
            cells[HOLDING] = 1
            try:
                with self.r.lease() as pinned:
                    pinned.rpush(self.feed, self.token)
                    pinned.ltrim(self.feed, -5, -1)
                    pinned.expire(self.feed, KEY_TTL)
                    time.sleep(self.rng.uniform(0.002, 0.01))  # work done while pinned: a kill may land here
                    bad += int(pinned.lrange(self.feed, -1, -1) != [self.token])
            finally:
                cells[HOLDING] = 0
        time.sleep(self.rng.uniform(0.001, 0.005))  # the request's other I/O
        return bad


def _worker_main(wid: int, socket_path: str, prefix: str, cells: Any) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True  # finish the current request, so its lease is returned

    signal.signal(signal.SIGTERM, on_term)
    client = sharedpool.Redis(socket_path=socket_path, decode_responses=True)
    session = _Session(client, f"{prefix}:{wid}", seed=wid)
    while not stopping:
        try:
            bad = session.request(cells)
            cells[REQUESTS] += 1
            if bad:
                cells[MISMATCHES] += bad
                session.hits = -1  # resync, so one mismatch is not counted again on every request
        except redis.RedisError as exc:  # sharedpool's errors are RedisErrors too
            cells[ERRORS] += 1
            session.hits = -1
            if cells[ERRORS] <= 3:
                print(f"worker {os.getpid()}: {type(exc).__name__}: {exc}", file=sys.stderr)
            time.sleep(0.05)
    client.close()


class _Fleet:
    """The worker processes, and the replacement of dead ones, as a pre-fork server does it."""

    def __init__(self, socket_path: str, prefix: str) -> None:
        self.ctx = multiprocess.get_context("fork")
        self.socket_path, self.prefix = socket_path, prefix
        self.alive: dict[int, tuple[Any, Any]] = {}  # wid -> (process, cells)
        self.all_cells: list[Any] = []
        self.killed = self.killed_holding = self.died = 0

    def spawn(self) -> None:
        wid = len(self.all_cells)
        cells = self.ctx.RawArray("q", 4)
        process = self.ctx.Process(target=_worker_main, args=(wid, self.socket_path, self.prefix, cells), daemon=True)
        process.start()
        self.all_cells.append(cells)
        self.alive[wid] = (process, cells)

    def kill_one(self, rng: random.Random) -> None:
        holding = [wid for wid, (_, cells) in self.alive.items() if cells[HOLDING]]
        wid = rng.choice(holding) if holding and rng.random() < 0.5 else rng.choice(list(self.alive))
        process, cells = self.alive.pop(wid)
        self.killed_holding += int(cells[HOLDING])  # racy by a few ms; the manager's counters are the truth
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        self.killed += 1
        self.spawn()

    def replace_exited(self) -> None:
        for wid, (process, _) in list(self.alive.items()):
            if not process.is_alive():
                print(f"worker {process.pid} exited on its own with {process.exitcode}", file=sys.stderr)
                del self.alive[wid]
                self.died += 1
                self.spawn()

    def total(self, index: int) -> int:
        return sum(int(cells[index]) for cells in self.all_cells)

    def stop(self, timeout: float = 5.0) -> None:
        processes = [process for process, _ in self.alive.values()]
        self.alive.clear()
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join()


def _redis_connections(monitor: redis.Redis) -> int:
    return sum(1 for c in monitor.client_list() if str(c.get("name", "")).startswith(CLIENT_NAME_PREFIX))


def _start_manager(socket_path: str, redis_url: str, log_path: str, max_connections: int) -> ManagerProcess:
    # Ctrl-C signals the whole foreground process group, but the manager
    # must outlive the workers to prove that no lease is left. A blocked
    # signal mask survives fork and exec, so the manager never sees it.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        manager = ManagerProcess(socket_path, redis_url, log_path, pool_name=POOL_NAME, max_connections=max_connections)
        return manager.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _wait_no_leases(manager: ManagerProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        held = int(manager.stats()["leases"]["held"])
        if held == 0 or time.monotonic() > deadline:
            return held
        time.sleep(0.1)


def _watch(args: argparse.Namespace, fleet: _Fleet, manager: ManagerProcess, monitor: redis.Redis) -> tuple[int, float, bool]:
    """Kill on schedule and print a line a second until the time is up: (peak connections, seconds, interrupted)."""
    rng = random.Random()
    started = last_tick = time.monotonic()
    end, next_tick = started + args.duration, started + 1.0
    next_kill = started + args.kill_every if args.kill_every > 0 else math.inf
    peak = last_requests = 0
    try:
        while (now := time.monotonic()) < end:
            time.sleep(max(0.0, min(next_tick, next_kill, end) - now))
            fleet.replace_exited()
            if time.monotonic() >= next_kill:
                fleet.kill_one(rng)
                next_kill += args.kill_every
            if time.monotonic() < min(next_tick, end):
                continue
            next_tick += 1.0
            stats, in_redis = manager.stats(), _redis_connections(monitor)
            peak = max(peak, in_redis)
            now, done = time.monotonic(), fleet.total(REQUESTS)
            print(f"{now - started:5.1f}s  {len(fleet.alive)} workers served by {in_redis} Redis connections "
                  f"(manager: {stats['connections']['open']} open)  {done} requests "
                  f"({(done - last_requests) / max(now - last_tick, 1e-6):.0f}/s)  "
                  f"leases {stats['counters'].get('leases_granted', 0)} taken, {_reaped(stats['counters'])} reaped  "
                  f"{fleet.killed} workers killed", flush=True)
            last_requests, last_tick = done, now
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the workers")
        return peak, time.monotonic() - started, True
    return peak, time.monotonic() - started, False


def run_demo(args: argparse.Namespace) -> int:
    if args.workers < 1 or args.max_connections < 1 or args.duration <= 0:
        print("sharedpool demo: --workers and --max-connections must be at least 1, --duration above 0", file=sys.stderr)
        return 2
    server: RedisServer | None = None
    manager: ManagerProcess | None = None
    fleet: _Fleet | None = None
    monitor: redis.Redis | None = None
    workdir = tempfile.mkdtemp(prefix="sharedpool-demo-")
    try:
        redis_url = args.redis_url
        if redis_url is None:
            try:
                server = RedisServer(directory=os.path.join(workdir, "redis"))  # creates the directory
            except RedisServerNotFound as exc:
                print(f"sharedpool demo: {exc}; or pass --redis-url", file=sys.stderr)
                return 1
            redis_url = server.start().url
        monitor = redis.Redis.from_url(redis_url, decode_responses=True, single_connection_client=True)
        info = monitor.info("server")
        version = f"Redis {info.get('redis_version', '?')}"
        if "valkey_version" in info:  # Valkey answers redis_version 7.2.4 for compatibility
            version = f"Valkey {info['valkey_version']} (as {version})"
        socket_path, log_path = os.path.join(workdir, "sp.sock"), os.path.join(workdir, "manager.log")
        manager = _start_manager(socket_path, redis_url, log_path, args.max_connections)
        where = f"127.0.0.1:{server.port} ({server.binary}, {server.origin})" if server else mask_url(redis_url)
        print(f"{version} at {where}; "
              f"manager pid {manager.pid} may open {args.max_connections} connection(s); log {log_path}")
        print(f"{args.workers} worker processes run a request mix through sharedpool.Redis"
              + (f"; one is SIGKILLed every {args.kill_every:g} s and replaced" if args.kill_every > 0 else ""))
        prefix = f"sharedpool-demo:{os.getpid()}:{random.getrandbits(32):x}"
        fleet = _Fleet(socket_path, prefix)
        for _ in range(args.workers):
            fleet.spawn()
        peak, elapsed, interrupted = _watch(args, fleet, manager, monitor)
        fleet.stop()
        return _report(args, fleet, manager, monitor, peak, elapsed, interrupted)
    except (RuntimeError, redis.RedisError) as exc:
        print(f"sharedpool demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        log_path = os.path.join(workdir, "manager.log")
        if os.path.exists(log_path):  # the log goes with the temp dir: show its end now
            with open(log_path, errors="replace") as log_file:
                sys.stderr.writelines(log_file.readlines()[-15:])
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave processes behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if fleet is not None:
                fleet.stop()
            if monitor is not None:
                monitor.close()
            if manager is not None:
                manager.stop()
            if server is not None:
                server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)


def _report(
    args: argparse.Namespace, fleet: _Fleet, manager: ManagerProcess, monitor: redis.Redis,
    peak: int, elapsed: float, interrupted: bool,
) -> int:
    held = _wait_no_leases(manager, timeout=10.0)
    counters = manager.stats()["counters"]
    peak = max(peak, _redis_connections(monitor))
    requests, mismatches, errors = fleet.total(REQUESTS), fleet.total(MISMATCHES), fleet.total(ERRORS)
    for key in monitor.scan_iter(match=f"{fleet.prefix}:*", count=500):
        monitor.delete(key)
    ran = len(fleet.all_cells)
    print(f"\nsummary after {elapsed:.1f} s{' (interrupted)' if interrupted else ''}:")
    print(f"  worker processes that ran:       {ran} ({args.workers} at a time, {fleet.killed} SIGKILLed and replaced)")
    print(f"  peak Redis connections from the manager: {peak} (CLIENT LIST; max_connections {args.max_connections})"
          f" -- one redis-py pool per worker would have needed at least {ran}")
    print(f"  requests:                        {requests} ({requests / max(elapsed, 1e-6):.0f}/s), every read checked")
    print(f"  mismatched reads:                {mismatches}")
    print(f"  errors in workers:               {errors} ({fleet.died} workers died on their own)")
    print(f"  leases taken:                    {counters.get('leases_granted', 0)}")
    inside = f" ({fleet.killed_holding} of the kills landed inside a lease() block)" if fleet.killed else ""
    print(f"  leases reaped from dead workers: {_reaped(counters)}{inside}")
    print(f"  leases still held after the workers stopped: {held}")
    failed = mismatches > 0 or errors > 0 or held > 0 or fleet.died > 0
    print("FAILED" if failed else "ok: many workers, few connections, nothing leaked")
    return 1 if failed else 0


def _reaped(counters: dict[str, Any]) -> int:
    return int(counters.get("reaped_holder_closed", 0)) + int(counters.get("reaped_holder_dead", 0))
