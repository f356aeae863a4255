"""Fault injection: starvation and stalls (issue "Starvation and stalls found by fault injection").

Each test injects one fault into real processes (a signal handler that
raises mid-wait, thousands of short-lived threads, Redis closing or
refusing connections, a frozen manager or Redis, a deleted socket file, an
exec'd child, a session left with its replies switched off, a fork or a
uid that may not connect) and checks that nothing is leaked, nobody
starves and no call stalls past its own bounds.

Worker processes are forked children (``_Worker``): they report their
result, or the traceback of a failed assertion, through a queue, and are
killed and reaped when the test ends whatever happened.
"""

from __future__ import annotations

import errno
import os
import pwd
import random
import re
import signal
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import multiprocess
import psutil
import pytest
import redis
from support.both_clients import KINDS, shared_redis
from support.cli import run_cli
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool
from sharedpool.dev.redis_server import RedisServer
from sharedpool.shell.frames import explain_connect_error

ctx = multiprocess.get_context("fork")


# ----- helpers ------------------------------------------------------------------


class Interrupted(Exception):
    """What our SIGALRM handler raises in the middle of a call."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted()


class _Worker:
    """``body(*args)`` in a forked worker process; ``result()`` is what it returned.

    An exception in the worker (a failed assertion) comes back as its
    traceback and fails the test here.
    """

    def __init__(self, body: Callable[..., Any], *args: Any) -> None:
        self._results = ctx.Queue()
        results = self._results

        def main() -> None:
            try:
                results.put(("ok", body(*args)))
            except BaseException:
                results.put(("error", traceback.format_exc()))

        self.process = ctx.Process(target=main, daemon=True)
        self.process.start()

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def wait(self, event: Any, timeout: float = 60.0) -> None:
        """Wait for ``event``; a worker that failed first fails the test with its traceback."""
        deadline = time.monotonic() + timeout
        while not event.wait(0.05):
            if not self.process.is_alive():
                self.result(timeout=5)
                raise AssertionError(f"worker process {self.pid} ended without setting the event")
            assert time.monotonic() < deadline, f"worker process {self.pid}: no event within {timeout} s"

    def result(self, timeout: float = 60.0) -> Any:
        kind, value = self._results.get(timeout=timeout)
        if kind == "error":
            raise AssertionError(f"worker process {self.pid} failed:\n{value}")
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self._results.close()
        self._results.join_thread()


@pytest.fixture
def workers() -> Iterator[Callable[..., _Worker]]:
    """Start worker processes; every one is killed and reaped at the end of the test."""
    started: list[_Worker] = []

    def start(body: Callable[..., Any], *args: Any) -> _Worker:
        worker = _Worker(body, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def own_redis(tmp_path: Any) -> Iterator[RedisServer]:
    """A private redis-server (own port and directory) this test may stop, freeze or reconfigure."""
    server = RedisServer(directory=str(tmp_path / "own-redis")).start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)  # in case a test froze it
        server.cleanup()


def _unique(tag: str) -> str:
    return f"{tag}:{os.getpid()}:{uuid.uuid4().hex}"


def _round_trips(r: redis.Redis, rounds: int, tag: str = "mine") -> None:
    """SET then GET unique values: every reply must be this caller's own."""
    for i in range(rounds):
        key = _unique(f"{tag}{i}")
        assert r.set(key, key) is True
        got = r.get(key)
        assert got == key, f"round {i}: wrote {key!r}, read {got!r}"


def _idle_leases(r: sharedpool.SharedRedis) -> dict[str, int]:
    return wait_for(
        lambda: (leases := r.connection_pool.stats()["leases"]) == {"held": 0, "waiting": 0} and leases,
        timeout=5, what="no lease held and nobody waiting",
    )


def _redis_fds(port: int) -> int:
    """This process's TCP sockets to the Redis on ``port``."""
    return sum(1 for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port)


def _log(manager: Any) -> str:
    with open(manager.log_path, encoding="utf-8", errors="replace") as log:
        return log.read()


# ----- 1. a signal handler that raises in the middle of a wait ------------------------


def _interrupted_waits(socket_path: str, rounds: int, checked: Any, finish: Any) -> dict[str, Any]:
    r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=10, manager_timeout=2)
    key = _unique("interrupted")
    r.set(key, "before")  # this process has the only slot's fd now
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with r.lease() as pinned:
            pinned.ping()
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    interrupted, elapsed = 0, []
    try:
        assert held.wait(10)
        previous = signal.signal(signal.SIGALRM, _raise_interrupted)
        try:
            for _ in range(rounds):
                # One aimed interrupt, or many at varied points of the wait.
                signal.setitimer(signal.ITIMER_REAL, 0.2 if rounds == 1 else random.uniform(0.005, 0.06))
                started = time.monotonic()
                try:
                    r.get(key)
                except Interrupted:
                    interrupted += 1
                    elapsed.append(time.monotonic() - started)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
        # The holder still holds; the interrupted waiter must be out of the queue.
        wait_for(lambda: r.connection_pool.stats()["leases"] == {"held": 1, "waiting": 0}, timeout=5,
                 what="the interrupted waiter dequeued")
    finally:
        release.set()
        thread.join(30)
    # The same thread, next requests: its own replies, not an interrupted one's.
    _round_trips(r, 20, "after-interrupt")
    leases = _idle_leases(r)
    checked.set()
    assert finish.wait(30)  # still alive while another process takes the lease
    r.close()
    return {"interrupted": interrupted, "max_elapsed": max(elapsed), "leases": leases}


@pytest.mark.parametrize("rounds", [1, 50])
def test_signal_handler_raising_mid_wait_leaves_nothing_behind(start_manager, workers, rounds: int) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    checked, finish = ctx.Event(), ctx.Event()
    worker = workers(_interrupted_waits, manager.socket_path, rounds, checked, finish)
    worker.wait(checked)
    # While the interrupted process lives on: another process gets the lease.
    other = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=3)
    try:
        _round_trips(other, 5, "other-process")
    finally:
        other.close()
    finish.set()
    result = worker.result()
    assert result["interrupted"] == rounds  # the exception reached the caller every time
    assert result["max_elapsed"] < 5  # the interrupt ended the wait, not the 10 s acquire_timeout
    assert result["leases"] == {"held": 0, "waiting": 0}
    assert manager.stats()["leases"] == {"held": 0, "waiting": 0}


def _interrupted_fetch(socket_path: str, manager_pid: int, redis_port: int) -> dict[str, Any]:
    """Interrupt a first lease while it waits for the manager's FD reply (the manager is frozen)."""
    r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=5, manager_timeout=2)
    pool = r.connection_pool
    pool.manager_info()  # attached: the table and the channel, no fd yet
    assert _redis_fds(redis_port) == 0
    key = _unique("fetch")
    previous = signal.signal(signal.SIGALRM, _raise_interrupted)
    os.kill(manager_pid, signal.SIGSTOP)
    try:
        # The slot is free in the table, but this process has no fd for it:
        # the lease sends FETCH_FD and waits for a reply that cannot come yet.
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        started = time.monotonic()
        try:
            r.set(key, "interrupted")
            outcome = "not interrupted"
        except Interrupted:
            outcome = "interrupted"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        waited = time.monotonic() - started
    finally:
        os.kill(manager_pid, signal.SIGCONT)
        signal.signal(signal.SIGALRM, previous)
    # The manager now answers the abandoned FETCH_FD: that reply (and its fd)
    # must be dropped, never taken as the answer to the next request.
    _round_trips(r, 20, "after-fetch")
    redis_fds = _redis_fds(redis_port)
    leases = _idle_leases(r)
    r.close()
    return {"outcome": outcome, "waited": waited, "redis_fds": redis_fds, "leases": leases}


def test_signal_handler_raising_while_waiting_for_the_managers_fd(start_manager, workers, redis_server) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    wait_for(lambda: manager.stats()["connections"]["idle"] == 1, what="the slot open")
    try:
        result = workers(_interrupted_fetch, manager.socket_path, manager.pid, redis_server.port).result()
    finally:
        os.kill(manager.pid, signal.SIGCONT)
    assert result["outcome"] == "interrupted"
    assert result["waited"] < 3
    assert result["redis_fds"] == 1  # the fd of the dropped reply was closed, not kept
    assert result["leases"] == {"held": 0, "waiting": 0}


# ----- 2. ten thousand short-lived threads ------------------------------------------------------


def _thread_storm(socket_path: str, total: int, batch: int) -> dict[str, Any]:
    r = sharedpool.Redis(socket_path=socket_path, acquire_timeout=30)
    key = _unique("storm")
    r.incr(key, 0)
    failures: list[str] = []

    def one() -> None:
        try:
            r.incr(key)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")

    baseline = len(os.listdir("/proc/self/fd"))
    fds_after_batch, channels = [], []
    for done in range(0, total, batch):
        threads = [threading.Thread(target=one) for _ in range(min(batch, total - done))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        fds_after_batch.append(len(os.listdir("/proc/self/fd")))
        if (done // batch) % 10 == 0:
            channels.append(r.connection_pool.stats()["control_connections"])
    channels.append(r.connection_pool.stats()["control_connections"])
    final = int(r.get(key))
    r.close()
    return {"baseline": baseline, "fds": fds_after_batch, "channels": channels, "final": final, "failures": failures[:5]}


@pytest.mark.slow
def test_ten_thousand_short_lived_threads_use_bounded_channels_and_fds(start_manager, workers) -> None:
    manager = start_manager(max_connections=4, min_idle=2, acquire_timeout=30)
    result = workers(_thread_storm, manager.socket_path, 10_000, 200).result(timeout=240)
    assert result["failures"] == []
    assert result["final"] == 10_000
    assert max(result["channels"]) <= 3, result["channels"]
    # Each thread's table description and wake socket close with it: the
    # process holds as many fds after 10,000 threads as after 200.
    assert max(result["fds"]) <= result["baseline"] + 10, (result["baseline"], result["fds"])
    assert manager.stats()["leases"] == {"held": 0, "waiting": 0}


# ----- 3. Redis closes idle connections, or restarts under them ---------------------------------


def _on_own_redis(
    start_manager: Any, own_redis: Any, connections: int, acquire_timeout: float, kind: str = "sync"
) -> tuple[Any, Any, Any]:
    """A manager keeping ``connections`` open on our own Redis, a plain client to watch that Redis, a pooled client."""
    manager = start_manager(redis_url=own_redis.url, max_connections=connections, min_idle=connections)
    admin = own_redis.client(decode_responses=True)
    r = shared_redis(kind, socket_path=manager.socket_path, decode_responses=True, acquire_timeout=acquire_timeout,
                     manager_timeout=1)
    return manager, admin, r


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_redis_closing_idle_connections_does_not_starve_the_next_request(start_manager, own_redis, kind: str) -> None:
    manager, admin, r = _on_own_redis(start_manager, own_redis, connections=10, acquire_timeout=2, kind=kind)
    try:
        old = wait_for(lambda: len(ids := {c["id"] for c in manager_clients(admin, manager.pool_name)}) == 10 and ids,
                       what="10 idle connections")
        admin.config_set("timeout", 1)
        wait_for(lambda: not old & {c["id"] for c in manager_clients(admin, manager.pool_name)},
                 timeout=15, what="Redis closing every idle connection of the pool")
        _round_trips(r, 1)  # no PoolTimeout: the manager replaced what Redis closed
        admin.config_set("timeout", 0)
        _round_trips(r, 5)
        assert "closed by Redis while idle" in _log(manager)
    finally:
        r.close()
        admin.close()



def _ten_idle_connections(start_manager: Any, own_redis: Any, acquire_timeout: float, kind: str) -> tuple[Any, Any]:
    """A manager on our own Redis with 10 idle connections, and a client (``kind``) that has used one."""
    manager = start_manager(redis_url=own_redis.url, max_connections=10, min_idle=10, reap_interval=0.2)
    r = shared_redis(kind, socket_path=manager.socket_path, decode_responses=True, acquire_timeout=acquire_timeout,
                     manager_timeout=1)
    wait_for(lambda: manager.stats()["connections"]["idle"] == 10, what="10 idle connections")
    _round_trips(r, 1)
    return manager, r

@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_redis_restarted_on_the_same_port_under_idle_connections(start_manager, own_redis, kind: str) -> None:
    manager, r = _ten_idle_connections(start_manager, own_redis, acquire_timeout=5, kind=kind)
    try:
        own_redis.stop()
        # A restart as long as real ones: the manager has seen Redis gone
        # and backs off between attempts to reconnect.
        wait_for(lambda: (manager.stats()["redis_down_for_s"] or 0) > 1.0, what="an outage of over a second")
        own_redis.start()
        started = time.monotonic()
        outcome = "ok"
        try:
            _round_trips(r, 1)  # Redis answers again: waiting up to acquire_timeout (5 s) is enough
        except redis.RedisError as exc:
            outcome = f"{type(exc).__name__} after {time.monotonic() - started:.2f} s: {exc}"
        assert outcome == "ok"
        assert time.monotonic() - started < 5 + 1 + 3
        _round_trips(r, 5)
    finally:
        r.close()


_ALONE = re.compile(r"\(\d+ of \d+ connections leased, \d+ waiting\)$")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_errors_with_redis_stopped_say_why(start_manager, own_redis, kind: str) -> None:
    manager, r = _ten_idle_connections(start_manager, own_redis, acquire_timeout=0.3, kind=kind)
    try:
        own_redis.stop()
        messages = []
        for _ in range(5):  # from the first moment (dead idle connections) to the outage the manager knows
            with pytest.raises((sharedpool.PoolTimeout, sharedpool.RedisUnavailable)) as caught:
                r.get("anything")
            messages.append(f"{type(caught.value).__name__}: {caught.value}")
        for message in messages:
            assert not _ALONE.search(message), messages
            if message.startswith("PoolTimeout"):
                assert re.search(r"is not answering|being opened or replaced", message), messages
            else:
                assert "unreachable" in message, messages
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_pool_timeout_while_connections_are_being_opened_says_so(start_manager, own_redis, kind: str) -> None:
    manager = start_manager(redis_url=own_redis.url, max_connections=2, min_idle=0, redis_timeout=1)
    r = shared_redis(kind, socket_path=manager.socket_path, decode_responses=True, acquire_timeout=0.3, manager_timeout=1)
    assert own_redis.process is not None
    try:
        r.connection_pool.manager_info()
        os.kill(own_redis.process.pid, signal.SIGSTOP)  # connects are accepted by the kernel, then hang
        try:
            with pytest.raises(sharedpool.PoolTimeout) as caught:
                r.get("anything")
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        message = str(caught.value)
        assert not _ALONE.search(message), message
        assert re.search(r"is not answering|being opened or replaced", message), message
    finally:
        r.close()


# ----- 4. a hung manager -----------------------------------------------------------------


def _first_request(socket_path: str, acquire_timeout: float, manager_timeout: float) -> dict[str, Any]:
    r = sharedpool.Redis(socket_path=socket_path, decode_responses=True,
                         acquire_timeout=acquire_timeout, manager_timeout=manager_timeout)
    started = time.monotonic()
    try:
        key = _unique("first")
        r.set(key, key)
        return {"ok": r.get(key) == key, "elapsed": time.monotonic() - started}
    except redis.RedisError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "elapsed": time.monotonic() - started}
    finally:
        r.close()


@pytest.mark.slow
def test_frozen_manager_bounds_new_processes_and_spares_old_ones(start_manager, workers) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    old = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=2, manager_timeout=5)
    try:
        _round_trips(old, 3)  # this process holds the slot's fd now
        os.kill(manager.pid, signal.SIGSTOP)
        try:
            new = workers(_first_request, manager.socket_path, 2, 5)
            # A free slot needs no manager: the old process keeps working.
            while new.process.is_alive():
                _round_trips(old, 5, "while-frozen")
                new.process.join(0.05)  # pacing: a few round trips per check
            outcome = new.result(timeout=30)
        finally:
            os.kill(manager.pid, signal.SIGCONT)
        assert "error" in outcome, outcome
        assert outcome["elapsed"] < 7 + 3, outcome
        assert outcome["error"].startswith("ManagerUnavailable"), outcome
        assert re.search(r"waited \d+\.\d+ s", outcome["error"]), outcome
        after = workers(_first_request, manager.socket_path, 2, 5).result(timeout=30)
        assert after.get("ok") is True, after
        _round_trips(old, 3, "after-thaw")
        _idle_leases(old)
    finally:
        old.close()


@pytest.mark.slow
def test_connection_lost_while_the_manager_is_frozen_fails_within_bounds(start_manager, own_redis) -> None:
    manager, admin, r = _on_own_redis(start_manager, own_redis, connections=1, acquire_timeout=0.3)
    try:
        _round_trips(r, 1)  # this process holds the slot's fd
        (pooled,) = manager_clients(admin, manager.pool_name)
        os.kill(manager.pid, signal.SIGSTOP)
        try:
            admin.client_kill_filter(_id=pooled["id"])  # Redis drops it; nobody can replace it yet
            started = time.monotonic()
            with pytest.raises(sharedpool.PoolTimeout) as caught:
                r.get("anything")
            elapsed = time.monotonic() - started
        finally:
            os.kill(manager.pid, signal.SIGCONT)
        problems = []
        if elapsed > 0.3 + 1 + 2:  # acquire_timeout + manager_timeout, plus a generous margin
            problems.append(f"one GET took {elapsed:.2f} s")
        if _ALONE.search(str(caught.value)):
            problems.append(f"the error does not say why: {caught.value}")
        assert problems == []
        _round_trips(r, 3, "after-thaw")
    finally:
        r.close()
        admin.close()


# ----- 5. sharedpool check ------------------------------------------------------------------


def _check(socket_path: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = run_cli("check", "--socket-path", socket_path, "--timeout", "2", timeout=30)
    return done, time.monotonic() - started


@pytest.mark.slow
def test_check_reports_redis_killed_frozen_or_full(start_manager, own_redis) -> None:
    manager = start_manager(redis_url=own_redis.url, max_connections=2, min_idle=2)
    wait_for(lambda: manager.stats()["connections"]["idle"] == 2, what="2 idle connections")
    done, _ = _check(manager.socket_path)
    assert done.returncode == 0 and done.stdout.startswith("ok"), (done.stdout, done.stderr)

    # Frozen: the kernel still accepts connections, PING never answers.
    assert own_redis.process is not None
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        done, elapsed = _check(manager.socket_path)
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    assert done.returncode != 0 and done.stdout.startswith("not ok"), (done.stdout, done.stderr)
    assert elapsed < 2 + 5, elapsed  # its own timeout, plus starting Python

    # Full: one more client is refused with "max number of clients reached".
    admin = own_redis.client(decode_responses=True, single_connection_client=True)
    try:
        admin.config_set("maxclients", len(admin.client_list()))
        try:
            done, elapsed = _check(manager.socket_path)
        finally:
            admin.config_set("maxclients", 10000)
    finally:
        admin.close()
    assert done.returncode != 0 and done.stdout.startswith("not ok"), (done.stdout, done.stderr)
    assert "max number of clients" in done.stdout, done.stdout
    assert elapsed < 2 + 5, elapsed
    assert re.search(r"WARNING .*max number of clients", _log(manager)), _log(manager)[-3000:]

    done, _ = _check(manager.socket_path)
    assert done.returncode == 0 and done.stdout.startswith("ok"), (done.stdout, done.stderr)

    own_redis.kill()
    done, elapsed = _check(manager.socket_path)
    assert done.returncode != 0 and done.stdout.startswith("not ok"), (done.stdout, done.stderr)
    assert elapsed < 2 + 5, elapsed


# ----- 6. the socket file deleted ---------------------------------------------------------------


def _newcomer(socket_path: str, kind: str) -> str:
    newcomer = shared_redis(kind, socket_path=socket_path, decode_responses=True, acquire_timeout=3, manager_timeout=1)
    try:
        _round_trips(newcomer, 3, "newcomer")
    finally:
        newcomer.close()
    return "ok"


@pytest.mark.parametrize("kind", KINDS)
def test_deleted_socket_file_is_created_again(start_manager, workers, kind: str) -> None:
    manager = start_manager(max_connections=2, min_idle=1, reap_interval=0.2)
    connected = shared_redis(kind, socket_path=manager.socket_path, decode_responses=True, acquire_timeout=3)
    try:
        _round_trips(connected, 2)
        os.unlink(manager.socket_path)
        _round_trips(connected, 5, "after-unlink")  # connected workers never notice
        wait_for(lambda: os.path.exists(manager.socket_path), timeout=0.2 + 2, what="the socket file back")
        # A newcomer is another process: this one's pools share the control
        # connection ``connected`` opened before the unlink.
        assert workers(_newcomer, manager.socket_path, kind).result() == "ok"
        assert re.search(r"control socket .* was deleted: creating it again", _log(manager))
    finally:
        connected.close()


# ----- 7. an exec'd child inherits none of our fds --------------------------------------------


def _exec_while_leased(socket_path: str) -> dict[str, Any]:
    pool = sharedpool.SharedConnectionPool(socket_path, acquire_timeout=5)
    first = pool.get_connection()
    second = pool.get_connection()
    try:
        ours = set()
        for conn in (first, second):
            conn.send_command("PING")
            assert conn.read_response() in (b"PONG", "PONG")
            ours.add(os.readlink(f"/proc/self/fd/{conn._sock.fileno()}"))
        ls = ["ls", "-l", "/proc/self/fd"]
        listing = subprocess.run(ls, close_fds=False, capture_output=True, text=True, timeout=30).stdout
        mine = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}
    finally:
        pool.release(first)
        pool.release(second)
    pool.close()
    return {"ours": sorted(ours), "listing": listing, "memfd_here": any("sharedpool-leases" in t for t in mine)}


def test_exec_child_inherits_no_redis_socket_and_no_table(start_manager, workers) -> None:
    manager = start_manager(max_connections=2, min_idle=2)
    result = workers(_exec_while_leased, manager.socket_path).result()
    assert len(result["ours"]) == 2 and all(t.startswith("socket:") for t in result["ours"])
    assert result["memfd_here"]  # the worker had the table open when it ran the child
    entries = [line.split(" -> ") for line in result["listing"].splitlines() if " -> " in line]
    inherited = {line[0].split()[-1]: line[1] for line in entries}
    assert {"0", "1", "2"} <= set(inherited), result["listing"]  # the listing is the child's fd table
    assert not set(result["ours"]) & set(inherited.values()), inherited
    assert not [fd for fd, target in inherited.items() if "sharedpool-leases" in target], inherited
    assert not [fd for fd, target in inherited.items() if target.startswith("socket:") and int(fd) > 2], inherited


# ----- 8. CLIENT REPLY SKIP / OFF left at the end of a lease -----------------------------------


@pytest.mark.parametrize("mode", ["OFF", "SKIP"])
def test_replies_switched_off_at_the_end_of_a_lease(start_manager, mode: str) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    pool = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=3, decode_responses=True)
    r = sharedpool.SharedRedis(connection_pool=pool)
    try:
        conn = pool.get_connection()
        conn.send_command("CLIENT", "REPLY", mode)  # no reply to wait for
        pool.release(conn)
        started = time.monotonic()
        key = _unique("after-reply-" + mode)
        assert r.set(key, key) is True
        assert r.get(key) == key
        assert time.monotonic() - started < 4.5  # served within acquire_timeout, never a 5 s read stall
        wait_for(lambda: manager.stats()["counters"]["reaped_broken"] >= 1, what="the lease counted as broken")
        _round_trips(r, 5)
    finally:
        r.close()
        pool.close()


# ----- 9. a pinned client across fork; permission denied; serve --help ---------------------------


def _use_parents_pinned(pinned: redis.Redis) -> str:
    try:
        pinned.get("anything")
        return "no error"
    except Exception as exc:
        return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"


def test_forked_child_using_a_parents_pinned_client_gets_lease_lost(start_manager, workers) -> None:
    manager = start_manager(max_connections=2, min_idle=1)
    r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
    try:
        with r.lease() as pinned:
            pinned.set("pinned", "parent")
            got = workers(_use_parents_pinned, pinned).result()
            assert got.startswith("sharedpool.errors.LeaseLost:"), got
            assert pinned.get("pinned") == "parent"  # the parent's lease is untouched
        _idle_leases(r)
    finally:
        r.close()


def _connect_as_nobody(socket_path: str, kind: str) -> str:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    r = shared_redis(kind, socket_path=socket_path, manager_timeout=0)
    try:
        r.ping()
        return "connected"
    except sharedpool.ManagerUnavailable as exc:
        return str(exc)
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_permission_denied_says_so_and_what_to_do(start_manager, workers, kind: str) -> None:
    manager = start_manager(max_connections=1, min_idle=1)
    if os.getuid() == 0:
        message = workers(_connect_as_nobody, manager.socket_path, kind).result()
    else:  # only root can become another uid: check the message it would get
        message = explain_connect_error(manager.socket_path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    assert "permission denied" in message, message
    assert "manager's uid" in message and "--socket-group" in message, message


def test_serve_help_shows_each_default_once() -> None:
    done = run_cli("serve", "--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "(default: None)" not in text
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for option in options:
        assert len(re.findall(r"default:", option)) <= 1, option
