"""The lease table with real processes: dead holders, orphaned locks, exclusion, fork, waiting, scribbling.

Everything here runs a real redis-server, a real manager and real worker
processes. Holders that must die mid-lease are SIGKILLed; a holder whose
lock must outlive it leaves an orphaned grandchild with a copy of its
table description (DESIGN fact 12).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import multiprocess
import psutil
import pytest
import redis
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool
from sharedpool import table as tbl

ctx = multiprocess.get_context("fork")

_REAPED = ("reaped_holder_closed", "reaped_holder_dead", "reaped_broken", "reaped_revoked")


def _kill(pid: int) -> None:
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _socket_leaks(*doomed: list[Any]) -> list[str]:
    """Empty the lists (the last references to pools), collect, and return the
    ResourceWarnings of what was finalized unclosed, so that a leak is reported
    here and not by whichever later test the garbage collector runs in."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for objects in doomed:
            objects.clear()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


# ----- a holder that dies mid-lease ------------------------------------------------


def _hold_and_block(socket_path: str, sender: Any, keep_channel: bool, orphan_lock: bool) -> None:
    """Take a lease, send a command whose reply nobody reads, then block until killed."""
    pool = sharedpool.SharedConnectionPool(socket_path)
    conn = pool.get_connection()
    conn.send_command("ECHO", "meant for the holder that dies")  # the reply stays in flight
    assert conn.lease is not None
    info = {"slot": conn.slot, "generation": conn.generation, "sleeper": 0, "orphan": 0}
    if keep_channel:
        # A child that keeps our control socket open (pass_fds, or C code
        # that forks): the manager sees no EOF when we die. The lock's own
        # description is O_CLOEXEC, so the lock dies with us.
        assert pool._attachment is not None
        inherited = os.dup(pool._attachment.channel.sock.fileno())
        info["sleeper"] = subprocess.Popen(["sleep", "120"], pass_fds=[inherited]).pid
    if orphan_lock:
        # The at-fork hook closes the pool's descriptions in the child; a
        # dup made before the fork is no descriptor the pool knows, so the
        # grandchild keeps the lock's open file description alive.
        keep = os.dup(conn.lease.lock_fd)
        pid = os.fork()
        if pid == 0:
            try:
                os.set_inheritable(keep, False)
                time.sleep(120)
            finally:
                os._exit(0)
        info["orphan"] = pid
    sender.send(info)  # a Pipe: synchronous, unlike a Queue's feeder thread
    while True:
        time.sleep(60)


@contextmanager
def _dead_holder(socket_path: str, keep_channel: bool = False, orphan_lock: bool = False) -> Iterator[dict[str, int]]:
    """A holder SIGKILLed while its lease is held and a reply is in flight; yields its slot, generation, pid."""
    receiver, sender = ctx.Pipe(duplex=False)
    holder = ctx.Process(target=_hold_and_block, args=(socket_path, sender, keep_channel, orphan_lock), daemon=True)
    holder.start()
    info: dict[str, int] = {}
    try:
        assert receiver.poll(30), "the holder never took its lease"
        info = receiver.recv()
        info["pid"] = holder.pid
        os.kill(holder.pid, signal.SIGKILL)
        # Not join(): an orphan keeps the sentinel pipe open; exitcode polls waitpid.
        wait_for(lambda: holder.exitcode is not None, timeout=10, what="the killed holder reaped")
        assert holder.exitcode == -signal.SIGKILL
        yield info
    finally:
        _kill(info.get("sleeper", 0))
        _kill(info.get("orphan", 0))
        _kill(holder.pid or 0)
        holder.join(10)


# Regression: the taker once sent its REPORT while it still held the slot's
# lock, the manager could not lock it and dropped the report, and the row
# stayed BROKEN until the next sweep (30 s here).
def test_dead_holder_is_found_by_the_next_taker(start_manager, caplog: pytest.LogCaptureFixture) -> None:
    # reap_interval 30: the periodic sweep cannot be the one. The holder's
    # control socket lives on in a child, so no EOF sweeps either, and no
    # stats() before the taker (a closed stats channel triggers a sweep).
    manager = start_manager(max_connections=1, min_idle=1, reap_interval=30)
    with _dead_holder(manager.socket_path, keep_channel=True) as dead:
        r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=10)
        with caplog.at_level(logging.WARNING, logger="sharedpool.client"):
            assert r.echo("the new worker's own") == "the new worker's own"
        assert f"slot {dead['slot']} was left held by pid {dead['pid']}" in caplog.text
        assert r.echo("and again") == "and again"
        stats = r.connection_pool.stats()
        assert stats["counters"]["reaped_holder_closed"] == 1
        assert stats["counters"]["connections_closed"] >= 1
        r.close()


@pytest.mark.parametrize("channel", ["kept-by-child", "closed"])
def test_dead_holder_is_found_by_the_sweep(start_manager, admin: redis.Redis, channel: str) -> None:
    manager = start_manager(max_connections=1, min_idle=1, reap_interval=0.2)
    (first,) = wait_for(lambda: manager_clients(admin, manager.pool_name), what="the min_idle connection")
    # An observer with a channel but no lease: it reads the table and asks
    # for stats on a channel that stays open (a closing one would sweep).
    observer = sharedpool.SharedConnectionPool(manager.socket_path)
    observer.manager_info()
    assert observer._attachment is not None
    table = observer._attachment.table
    with _dead_holder(manager.socket_path, keep_channel=channel == "kept-by-child") as dead:
        wait_for(lambda: table.generation_of(dead["slot"]) != dead["generation"], timeout=10, what="a new generation of the slot")
        wait_for(
            lambda: (ids := {c["id"] for c in manager_clients(admin, manager.pool_name)}) and first["id"] not in ids,
            timeout=10, what="the dead holder's connection replaced in Redis",
        )
        stats = observer.stats()
        assert stats["counters"]["reaped_holder_closed"] == 1
        assert stats["counters"]["connections_closed"] >= 1
        assert stats["leases"]["held"] == 0
    observer.disconnect()


def test_orphaned_lock_does_not_block_the_slots_next_connection(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1, reap_interval=0.2)
    with _dead_holder(manager.socket_path, orphan_lock=True) as dead:
        orphan = psutil.Process(dead["orphan"])
        r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=3)
        # Bounded by acquire_timeout: reap_interval + a margin, no timed assertion.
        assert r.echo("after the orphan") == "after the orphan"
        assert orphan.is_running() and orphan.status() != psutil.STATUS_ZOMBIE
        # The old generation's lock is still held (by the orphan): the scenario is real.
        pool = r.connection_pool
        assert pool._attachment is not None
        assert tbl.is_locked(pool._attachment.table.fd, tbl.slot_lock(dead["slot"], dead["generation"]))
        stats = pool.stats()
        assert stats["counters"]["reaped_holder_dead"] >= 1
        assert stats["counters"]["reaped_holder_closed"] == 0
        r.close()


# ----- exclusion ---------------------------------------------------------------------


def _exclusion_run(socket_path: str, threads: int, rounds: int, tag: str) -> list[str]:
    """``threads`` threads taking leases; returns every problem seen."""
    pool = sharedpool.SharedConnectionPool(socket_path, decode_responses=True, acquire_timeout=30)
    holders: dict[int, str] = {}  # slot -> who holds it in this process
    guard = threading.Lock()
    problems: list[str] = []
    finished = [0] * threads

    def run(n: int) -> None:
        try:
            for i in range(rounds):
                me = f"{tag}:{n}:{i}:{uuid.uuid4().hex}"
                conn = pool.get_connection()
                try:
                    slot = conn.slot
                    with guard:
                        other = holders.get(slot)
                        if other is not None:
                            problems.append(f"{me} got slot {slot} (generation {conn.generation}) held by {other}")
                        holders[slot] = me
                    # Across processes: the same connection leased twice at once
                    # would see the other's key (NX fails) or the other's replies.
                    marker = f"{tag}:holder:{slot}"
                    conn.send_command("SET", marker, me, "NX")
                    conn.send_command("ECHO", me)
                    conn.send_command("DEL", marker)
                    replies = [conn.read_response(), conn.read_response(), conn.read_response()]
                    if replies != ["OK", me, 1]:
                        problems.append(f"{me} on slot {slot}: replies {replies!r}")
                    with guard:
                        if holders.get(slot) == me:
                            del holders[slot]
                finally:
                    pool.release(conn)
            finished[n] = 1
        except Exception as exc:
            problems.append(f"thread {n}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    problems += [f"{tag} thread {n} did not finish" for n in range(threads) if not finished[n]]
    pool.disconnect()
    return problems


def _exclusion_process(socket_path: str, threads: int, rounds: int, tag: str, results: Any) -> None:
    try:
        results.put(_exclusion_run(socket_path, threads, rounds, tag))
    except BaseException as exc:
        results.put([f"{tag}: {type(exc).__name__}: {exc}"])


def test_threads_of_one_process_never_share_a_slot(start_manager) -> None:
    manager = start_manager(max_connections=2, min_idle=2, reap_interval=0.2)
    assert _exclusion_run(manager.socket_path, threads=16, rounds=40, tag=f"excl:{uuid.uuid4().hex}") == []
    _socket_leaks()  # test_a_pool_that_woke_a_waiter_leaves_no_socket_open reports those
    counters = manager.stats()["counters"]
    assert {key: counters[key] for key in _REAPED} == dict.fromkeys(_REAPED, 0)


def test_threads_of_several_processes_never_share_a_slot(start_manager) -> None:
    manager = start_manager(max_connections=2, min_idle=2, reap_interval=0.2)
    tag = f"excl:{uuid.uuid4().hex}"
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_exclusion_process, args=(manager.socket_path, 4, 40, f"{tag}:{n}", results), daemon=True)
        for n in range(4)
    ]
    try:
        for process in processes:
            process.start()
        problems = [problem for _ in processes for problem in results.get(timeout=120)]
        for process in processes:
            process.join(10)
            assert process.exitcode == 0
    finally:
        for process in processes:
            _kill(process.pid or 0)
            process.join(10)
    assert problems == []
    counters = manager.stats()["counters"]
    assert {key: counters[key] for key in _REAPED} == dict.fromkeys(_REAPED, 0)


# ----- fork while holding a lease --------------------------------------------------------


def _hold_in_a_thread_then_fork(socket_path: str, child_pid: Any) -> None:
    """A worker whose other thread holds a lease forks a long-lived child, then waits to be killed."""
    pool = sharedpool.SharedConnectionPool(socket_path)
    taken = threading.Event()

    def hold() -> None:
        pool.get_connection()
        taken.set()
        threading.Event().wait(120)

    threading.Thread(target=hold, daemon=True).start()
    taken.wait(10)
    child = os.fork()
    if child == 0:  # the child: it inherited the holding thread's table description
        threading.Event().wait(120)
        os._exit(0)
    child_pid.send(child)
    threading.Event().wait(120)


def test_a_forked_child_does_not_keep_another_threads_lock_alive(start_manager) -> None:
    """The child closes every parent thread's description, not only the forking
    thread's: when the parent dies its lock dies with it (found abandoned),
    rather than living on in the child (an orphan the sweep must retire)."""
    manager = start_manager(max_connections=1, min_idle=1, reap_interval=0.2)
    receiver, sender = ctx.Pipe(duplex=False)
    parent = ctx.Process(target=_hold_in_a_thread_then_fork, args=(manager.socket_path, sender))
    parent.start()
    child = 0
    try:
        assert receiver.poll(30)
        child = receiver.recv()
        wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="the parent's thread holding the lease")
        os.kill(parent.pid, signal.SIGKILL)  # joined last: the grandchild holds its sentinel open
        counters = wait_for(
            lambda: (c := manager.stats()["counters"])["reaped_holder_closed"] + c["reaped_holder_dead"] >= 1 and c,
            what="the dead parent's lease reaped",
        )
        assert counters["reaped_holder_closed"] == 1 and counters["reaped_holder_dead"] == 0, counters
        assert psutil.pid_exists(child)
    finally:
        if child:
            os.kill(child, signal.SIGKILL)  # not ours to reap: a grandchild
        parent.kill()
        parent.join(10)


def test_fork_while_holding_a_lease(start_manager) -> None:
    manager = start_manager(max_connections=2, min_idle=1, reap_interval=0.2)
    prefix = f"fork:{uuid.uuid4().hex}"
    r = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=10)
    with r.lease() as pinned:
        pinned.set(f"{prefix}:parent", "parent's")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            status = 1
            try:
                os.close(read_end)
                lines = []
                try:
                    pinned.get(f"{prefix}:parent")
                    lines.append("the parent's pinned client worked in the child")
                except sharedpool.LeaseLost:
                    pass
                except BaseException as exc:
                    lines.append(f"pinned client in the child raised {type(exc).__name__}: {exc}")
                r.set(f"{prefix}:child", "child's")  # the inherited client: its own lease
                if r.get(f"{prefix}:child") != "child's" or r.get(f"{prefix}:parent") != "parent's":
                    lines.append("inherited client read wrong values")
                own = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=10)
                if own.echo("child's own") != "child's own":
                    lines.append("a new client in the child read a wrong value")
                own.close()
                os.write(write_end, "\n".join(lines).encode() or b"ok")
                status = 0
            except BaseException:
                os.write(write_end, traceback.format_exc().encode())
            finally:
                os._exit(status)
        os.close(write_end)
        try:
            with os.fdopen(read_end, "rb") as report:
                said = report.read().decode()
            _, wait_status = os.waitpid(pid, 0)
        finally:
            _kill(pid)
        assert said == "ok"
        assert os.waitstatus_to_exitcode(wait_status) == 0
        # The child's exit closed its copies of our fds: our lease is intact.
        assert pinned.get(f"{prefix}:parent") == "parent's"
        assert pinned.echo("still ours") == "still ours"
        assert r.get(f"{prefix}:child") == "child's"  # a second lease, beside the pinned one
    stats = manager.stats()
    assert {key: stats["counters"][key] for key in _REAPED} == dict.fromkeys(_REAPED, 0)
    assert stats["counters"]["connections_closed"] == 0
    r.close()


# ----- waiting --------------------------------------------------------------------------


def test_waiting_times_out_and_max_waiting_refuses(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1, max_waiting=1, reap_interval=0.2)
    holder = sharedpool.SharedConnectionPool(manager.socket_path)
    held = holder.get_connection()
    late = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(sharedpool.PoolTimeout) as timed_out:
        late.get_connection()
    assert time.monotonic() - started < 0.3 + 2.0
    message = str(timed_out.value)
    assert f"pool '{manager.pool_name}'" in message and "within 0.30 s" in message
    assert "(1 of 1 connections leased" in message

    patient = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=30)
    got: list[Any] = []

    def wait_in_line() -> None:
        try:
            got.append(patient.get_connection())
        except Exception as exc:
            got.append(exc)

    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    try:
        wait_for(lambda: manager.stats()["leases"]["waiting"] == 1, what="one waiter queued")
        refused = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=30)
        started = time.monotonic()
        with pytest.raises(sharedpool.PoolFull) as full:
            refused.get_connection()
        assert time.monotonic() - started < 2.0  # at once, not after acquire_timeout
        assert f"pool '{manager.pool_name}'" in str(full.value) and "max_waiting=1;" in str(full.value)
        refused.disconnect()
    finally:
        holder.release(held)
        waiter.join(30)
    assert len(got) == 1 and isinstance(got[0], sharedpool.LeasedConnection), got
    patient.release(got[0])
    wait_for(lambda: manager.stats()["leases"]["waiting"] == 0, what="no waiter left")
    for pool in (holder, late, patient):
        pool.disconnect()
    pools = [holder, late, patient]
    del holder, late, pool, held, timed_out, full, refused
    patient = got = None  # also empties wait_in_line's cells: nothing keeps a pool alive
    _socket_leaks(pools)  # test_a_pool_that_woke_a_waiter_leaves_no_socket_open reports those


# A pool that sent a wake once kept an unclosed datagram socket after
# disconnect() (a ResourceWarning failing whichever test the GC ran in).
def test_a_pool_that_woke_a_waiter_leaves_no_socket_open(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1, reap_interval=0.2)
    _socket_leaks()  # earlier garbage is not this test's
    holder = sharedpool.SharedConnectionPool(manager.socket_path)
    patient = sharedpool.SharedConnectionPool(manager.socket_path, acquire_timeout=30)
    held = holder.get_connection()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(patient.get_connection()))
    waiter.start()
    wait_for(lambda: manager.stats()["leases"]["waiting"] == 1, what="one waiter queued")
    holder.release(held)  # the holder hands the slot on: it wakes the waiter
    waiter.join(30)
    assert len(got) == 1
    patient.release(got[0])
    holder.disconnect()
    patient.disconnect()
    pools = [holder, patient]
    del holder, held, waiter
    patient = got = None  # also empties the waiter lambda's cells: nothing keeps a pool alive
    assert _socket_leaks(pools) == []


# ----- stray writes the manager must repair ------------------------------------------------


def _lease_in_child(socket_path: str, acquire_timeout: float, results: Any) -> None:
    started = time.monotonic()
    try:
        pool = sharedpool.SharedConnectionPool(socket_path, acquire_timeout=acquire_timeout, decode_responses=True)
        conn = pool.get_connection()
        conn.send_command("ECHO", "mine")
        got = conn.read_response()
        pool.release(conn)
        results.put((f"lease, ECHO said {got!r}", time.monotonic() - started))
    except BaseException as exc:
        name = type(exc).__name__
        if not isinstance(exc, redis.RedisError):
            name = f"not a redis error: {type(exc).__module__}.{type(exc).__qualname__}"
        results.put((f"{name}: {exc}", time.monotonic() - started))


def _bounded_lease(socket_path: str, acquire_timeout: float) -> tuple[str, float]:
    """Take one lease in a child process; its outcome and how long it took, or a
    note that it never returned (a spinning client must fail the test, not hang it)."""
    results = ctx.Queue()
    child = ctx.Process(target=_lease_in_child, args=(socket_path, acquire_timeout, results), daemon=True)
    child.start()
    try:
        return results.get(timeout=acquire_timeout + 4)
    except Exception:
        return (f"no return within acquire_timeout + 4 s (acquire_timeout={acquire_timeout})", float("inf"))
    finally:
        _kill(child.pid or 0)
        child.join(10)


def _attached_table(socket_path: str) -> tuple[sharedpool.SharedConnectionPool, tbl.Table]:
    """A pool with a channel and no lease, and its mapping of the table."""
    pool = sharedpool.SharedConnectionPool(socket_path)
    pool.manager_info()
    assert pool._attachment is not None
    return pool, pool._attachment.table


# Regression: a stray READY over the row of a slot the manager has not opened
# was never repaired, and a taker spun on FETCH_FD (STALE) past acquire_timeout.
def test_a_stray_ready_on_an_unopened_row_is_bounded_by_acquire_timeout(start_manager) -> None:
    # min_idle=0: nothing but a waiter's demand opens the second slot.
    manager = start_manager(max_connections=2, min_idle=0, reap_interval=0.2)
    holder, table = _attached_table(manager.socket_path)
    held = holder.get_connection()
    unopened = 1 - held.slot
    assert table.row(unopened).state is tbl.RowState.CLOSED
    table.map[tbl.ROWS_AT + unopened * tbl.ROW_SIZE] = int(tbl.RowState.READY)  # the scribble: one byte
    try:
        outcome, took = _bounded_lease(manager.socket_path, acquire_timeout=1.0)
        stale = manager.stats()["counters"]["fetches_refused_stale"]
        assert took < 1.0 + 3.0, (outcome, f"fetches_refused_stale={stale}")
        assert outcome in ("lease, ECHO said 'mine'",) or outcome.startswith("PoolTimeout"), outcome
    finally:
        holder.release(held)
        holder.disconnect()



def _until_outcome(socket_path: str, acquire_timeout: float, accept: Callable[[str], bool], what: str) -> list[str]:
    """Take bounded leases until one's outcome is accepted (within 5 s); return every outcome."""
    outcomes: list[str] = []

    def accepted() -> bool:
        outcomes.append(_bounded_lease(socket_path, acquire_timeout=acquire_timeout)[0])
        return accept(outcomes[-1])

    try:
        wait_for(accepted, timeout=5, what=what, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; outcomes {outcomes[-2:]}") from None
    return outcomes

# Regression: the header's slots_in_use and max_waiting were never rewritten
# after start, so one stray 0 there left the pool unusable until a restart.
@pytest.mark.parametrize("field", ["slots_in_use", "max_waiting"])
def test_a_scribbled_header_is_repaired(start_manager, field: str) -> None:
    manager = start_manager(max_connections=1, min_idle=1, reap_interval=0.2)
    wait_for(lambda: manager.stats()["connections"]["idle"] == 1, what="the min_idle connection")
    observer, table = _attached_table(manager.socket_path)
    # The same bytes a stray write of zeros would leave.
    if field == "slots_in_use":
        table.set_slots_in_use(0)
        # Repaired when a lease can be had again (each try is bounded).
        _until_outcome(manager.socket_path, 0.5, lambda o: o == "lease, ECHO said 'mine'",
                       "a lease after slots_in_use was scribbled to 0")
    else:
        table.set_max_waiting(0)
        held = observer.get_connection()
        try:
            # Repaired when a taker that must wait is queued (and times out)
            # rather than refused at once.
            _until_outcome(manager.socket_path, 0.3, lambda o: o.startswith("PoolTimeout"),
                           "a waiter queued after max_waiting was scribbled to 0")
        finally:
            observer.release(held)
    assert manager.process is not None and manager.process.poll() is None
    observer.disconnect()


# Regression: a lease number scribbled to 2**64 - 1 made take_in_place raise
# struct.error out of get_connection.
def test_a_scribbled_lease_number_gives_no_foreign_exception(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1, reap_interval=0.2)
    wait_for(lambda: manager.stats()["connections"]["idle"] == 1, what="the min_idle connection")
    observer, table = _attached_table(manager.socket_path)
    table.map[tbl.ROWS_AT + 16 : tbl.ROWS_AT + 24] = b"\xff" * 8  # the stray write
    outcomes = _until_outcome(manager.socket_path, 0.5, lambda o: o == "lease, ECHO said 'mine'",
                              "a lease after the slot's lease number was scribbled")
    assert [outcome for outcome in outcomes if outcome.startswith("not a redis error")] == []
    observer.disconnect()


# ----- hand-off -----------------------------------------------------------------------------


def _counter_worker(socket_path: str, key: str, pairs: int, results: Any) -> None:
    problems: list[str] = []
    done = 0
    try:
        r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=30)
        for i in range(1, pairs + 1):
            incremented = r.incr(key)
            got = r.get(key)
            if incremented != i or got != str(i):
                problems.append(f"{key}: pair {i}: INCR said {incremented!r}, GET said {got!r}")
            done += 1
        r.close()
    except BaseException as exc:
        problems.append(f"{key}: {type(exc).__name__}: {exc}")
    results.put((done, problems))


def test_hand_off_serves_every_waiter(start_manager) -> None:
    manager = start_manager(max_connections=1, min_idle=1, reap_interval=0.2)
    samples_before = manager.stats()["wait_time"]["samples"]
    prefix = f"handoff:{uuid.uuid4().hex}"
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_counter_worker, args=(manager.socket_path, f"{prefix}:{n}", 200, results), daemon=True)
        for n in range(4)
    ]
    try:
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(10)
    finally:
        for process in processes:
            _kill(process.pid or 0)
            process.join(10)
    assert [problems for _done, problems in outcomes] == [[]] * 4
    assert [done for done, _problems in outcomes] == [200] * 4
    stats = wait_for(lambda: (s := manager.stats())["leases"]["waiting"] == 0 and s, what="no waiter left")
    assert stats["wait_time"]["samples"] - samples_before >= 4 * 200 * 2  # one lease per command
    assert stats["leases"]["held"] == 0
    assert {key: stats["counters"][key] for key in _REAPED} == dict.fromkeys(_REAPED, 0)


# ----- scribbling -----------------------------------------------------------------------------


def _fuzz_worker(socket_path: str, worker: int, stop: Any, strict: Any, progress: Any, results: Any) -> None:
    """SET/GET with every reply checked; a fresh client after any error. Counts separately
    what happened before and after ``strict`` (scribbling over and repaired)."""
    tally = {"ops": 0, "wrong": 0, "errors": 0, "strict_ops": 0, "strict_wrong": 0, "strict_errors": 0}
    notes: list[str] = []
    r = None
    in_strict = False
    prefix = f"fuzz:{worker}:{uuid.uuid4().hex}"
    i = 0
    while not stop.is_set():
        if strict.is_set() and not in_strict:
            in_strict = True
            r = _close_quietly(r)
        phase = "strict_" if in_strict else ""
        i += 1
        key, value = f"{prefix}:{i % 50}", f"{worker}-{i}-{uuid.uuid4().hex}"
        try:
            if r is None:
                r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=5)
            r.set(key, value)
            got = r.get(key)
            tally[phase + "ops"] += 1
            if in_strict:
                progress[worker] += 1
            if got != value:
                tally[phase + "wrong"] += 1
                if len(notes) < 20:
                    notes.append(f"{phase}wrong: {key} wrote {value!r} read {got!r}")
        except Exception as exc:
            tally[phase + "errors"] += 1
            if (in_strict or not isinstance(exc, redis.RedisError)) and len(notes) < 20:
                notes.append(f"{phase}error: {type(exc).__name__}: {exc}")
            r = _close_quietly(r)
    results.put((worker, tally, notes))


def _close_quietly(client: Any) -> None:
    """Drop a client that may be in any state a scribbled table left it in."""
    if client is not None:
        try:
            client.close()
        except Exception:
            pass
    return None


# Where scribbling hurts most (sharedpool/table.py's layout): a write lands on
# one of these fields half the time, anywhere in the region otherwise.
_HEADER_FIELDS = (6, 12, 20, 28, 32, 36)  # flags, slots_in_use, max_waiting, waiters, hwm, next ticket
_ROW_FIELDS = (0, 4, 8, 16, 24, 32, 40, 48, 56, 64)  # state, generation, pid, seq, start, acquired, revoked, expiry, histogram
_WAITER_FIELDS = (0, 4, 8, 16)  # state, pid, token, ticket
_VALUES = st.one_of(
    st.binary(min_size=1, max_size=8),
    st.sampled_from([0, 1, 2, 3, 4, 5, 255, 2**31 - 1]).map(lambda v: v.to_bytes(4, "little")),
    st.sampled_from([b"\xff" * 4, b"\xff" * 8, b"\x00" * 8]),
)


@st.composite
def _scribbles(draw: Any, table: tbl.Table) -> list[tuple[int, bytes]]:
    writes = []
    for _ in range(draw(st.integers(1, 4))):
        region = draw(st.sampled_from(("header", "rows", "waiters")))
        if region == "header":
            at = draw(st.one_of(st.sampled_from(_HEADER_FIELDS), st.integers(0, tbl.HEADER_SIZE - 1)))
        elif region == "rows":
            slot = draw(st.integers(0, 2))  # both slots in use and one beyond
            field = draw(st.one_of(st.sampled_from(_ROW_FIELDS), st.integers(0, tbl.ROW_SIZE - 1)))
            at = tbl.ROWS_AT + slot * tbl.ROW_SIZE + field
        else:
            entry = draw(st.integers(0, 3))  # the entries waiters use first
            field = draw(st.one_of(st.sampled_from(_WAITER_FIELDS), st.integers(0, tbl.WAITER_SIZE - 1)))
            at = table.waiters_at + entry * tbl.WAITER_SIZE + field
        data = draw(_VALUES)
        writes.append((at, data[: table.size - at]))
    return writes


def _checked_ops_in_child(socket_path: str, count: int, results: Any) -> None:
    try:
        r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=5)
        prefix = f"verify:{uuid.uuid4().hex}"
        wrong = []
        for i in range(count):
            value = f"{i}-{uuid.uuid4().hex}"
            r.set(f"{prefix}:{i}", value)
            got = r.get(f"{prefix}:{i}")
            if got != value:
                wrong.append(f"wrote {value!r}, read {got!r}")
        r.close()
        results.put(wrong)
    except BaseException as exc:
        results.put([f"{type(exc).__name__}: {exc}"])


def _checked_ops(socket_path: str, count: int) -> list[str]:
    """``count`` checked SET/GET pairs by a fresh client in a child process, bounded in time
    (a client that spins instead of timing out must fail the test, not hang it)."""
    results = ctx.Queue()
    child = ctx.Process(target=_checked_ops_in_child, args=(socket_path, count, results), daemon=True)
    child.start()
    try:
        try:
            return results.get(timeout=15)
        except Exception:
            return [f"{count} checked operations did not finish within 15 s (acquire_timeout=5)"]
    finally:
        _kill(child.pid or 0)
        child.join(10)


@pytest.mark.slow
def test_scribbled_table_never_kills_the_manager_and_is_repaired(start_manager, admin: redis.Redis) -> None:
    manager = start_manager(max_connections=2, min_idle=1, reap_interval=0.2)
    bystander = admin.client_id()  # a connection the manager must never touch
    scribbler = sharedpool.SharedConnectionPool(manager.socket_path)
    scribbler.manager_info()
    assert scribbler._attachment is not None
    table = scribbler._attachment.table
    lock_fd = tbl.own_description(table.fd)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone: a waiter entry of it is the sweep's to drop
    stop, strict = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    progress = ctx.Array("i", 2)  # checked operations after strict
    workers = [
        ctx.Process(target=_fuzz_worker, args=(manager.socket_path, n, stop, strict, progress, results), daemon=True)
        for n in range(2)
    ]

    def swept_twice() -> None:
        """Two sweeps ran after the last write: each drops a waiter entry of a dead pid."""
        for round_ in range(2):
            token = 0x5CB1B000 + round_

            def enqueued(token: int = token) -> int:
                tbl.lock_wait(lock_fd, tbl.HEADER_LOCK)
                try:
                    return table.enqueue(dead.pid, token, time.monotonic()) + 1
                finally:
                    tbl.unlock(lock_fd, tbl.HEADER_LOCK)

            room = f"room for a marker waiter (max_waiting in the header: {table.max_waiting})"
            index = wait_for(enqueued, timeout=5, what=room) - 1

            def dropped(index: int = index, token: int = token) -> bool:
                return table.waiter(index)[2:4] != (dead.pid, token) or table.waiter(index)[0] == tbl.WaiterState.FREE

            wait_for(dropped, timeout=5, what="a sweep dropping the dead marker waiter")

    def manager_is_well() -> None:
        assert manager.process is not None and manager.process.poll() is None, f"manager died; log {manager.log_path}"
        stats = manager.stats()
        assert stats["state"] == "running"
        assert len(manager_clients(admin, manager.pool_name)) <= 2
        assert admin.client_id() == bystander

    history: list[list[tuple[int, bytes]]] = []

    def header() -> str:
        flags, waiters = table.hot()
        return (
            f"flags={flags} slots_in_use={table.slots_in_use} max_waiting={table.max_waiting} waiters={waiters} hwm={table.hwm()}"
        )

    # The examples share one manager and table, so a failure may come from
    # damage an earlier example left: shrinking would mislead. The message
    # carries every write so far instead.
    @settings(max_examples=25, deadline=None, database=None, phases=[Phase.explicit, Phase.generate])
    @given(_scribbles(table))
    def scribble_then_verify(writes: list[tuple[int, bytes]]) -> None:
        history.append(writes)
        for at, data in writes:
            table.map[at : at + len(data)] = data
        try:
            swept_twice()
            manager_is_well()
            wrong = _checked_ops(manager.socket_path, 20)
            assert wrong == [], wrong
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nheader now: {header()}\nwrites so far, oldest first: {history!r}") from None

    try:
        for worker in workers:
            worker.start()
        scribble_then_verify()
        swept_twice()
        strict.set()
        assert _checked_ops(manager.socket_path, 50) == []
        wait_for(lambda: min(progress[:]) >= 50, timeout=20, what="50 checked operations by each worker after repair")
        stop.set()
        reports = [results.get(timeout=30) for _ in workers]
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
            _kill(worker.pid or 0)
            worker.join(10)
        os.close(lock_fd)
        scribbler.disconnect()
    manager_is_well()
    for worker, tally, notes in reports:
        assert tally["strict_ops"] > 0, (worker, tally, notes)
        assert tally["strict_wrong"] == 0 and tally["strict_errors"] == 0, (worker, tally, notes)
        # Wrong replies while scribbling are tolerated by design; exceptions
        # that are not redis errors are not.
        assert not [note for note in notes if note.startswith("error:")], (worker, notes)
    log = Path(manager.log_path).read_text()
    assert "Traceback" not in log, log[-4000:]
