"""The table core's two twins: the C accelerator and the pure-Python path are one behaviour.

The property drives both with the same moves, scribbled rows and stale
generations included, and demands identical results and byte-identical
tables. The process tests show that a worker on either path shares one
table with the other, and that each path says it is the one in use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cli import run_cli
from support.waiting import wait_for

from sharedpool import table as tbl
from sharedpool.table import core
from sharedpool.table.layout import ROW_SIZE, ROWS_AT, SLOTS_IN_USE_AT, WAITERS_AT

try:
    from sharedpool import _speedups  # type: ignore[attr-defined]
except ImportError:
    _speedups = None

CAPACITY = 4
GENERATIONS = (0, 1, 2, 2**32 - 1)


def _accelerator() -> Any:
    if _speedups is None:
        message = "sharedpool._speedups is not built (pip install with a C compiler builds it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # on CI a missing accelerator is a failure, never a skip
        pytest.skip(message)
    return _speedups


class Twin:
    """One table, one core on it, our own description and another process's (a foreign holder)."""

    def __init__(self, make_core: Any) -> None:
        self.table = tbl.Table.create(capacity=CAPACITY, waiter_capacity=4, max_waiting=4, epoch=b"twins")
        self.core = make_core(self.table.map, CAPACITY)
        self.ours = tbl.own_description(self.table.fd)
        self.foreign = tbl.own_description(self.table.fd)

    def close(self) -> None:
        self.core.close()
        os.close(self.ours)
        os.close(self.foreign)
        self.table.close()

    def reset(self) -> None:
        """Every byte zero, then READY rows of db 0 at generation 1, no lock held: where each example starts."""
        self.table.map[:] = bytes(len(self.table.map))
        self.table.set_slots_in_use(CAPACITY)
        for slot in range(CAPACITY):
            self.table.write_row(slot, tbl.Row(tbl.RowState.READY, 1))
            for generation in GENERATIONS:
                tbl.unlock(self.foreign, tbl.slot_lock(slot, generation))
                tbl.unlock(self.ours, tbl.slot_lock(slot, generation))

    def do(self, move: tuple[Any, ...]) -> Any:
        """Apply one move; its result, or the type of what it raised."""
        kind, *args = move
        try:
            if kind == "row":
                slot, state, generation, db, seq, expires = args
                self.table.write_row(slot, tbl.Row(tbl.RowState(state), generation, lease_seq=seq, expires_at=expires, db=db))
                return None
            if kind == "scribble":
                at, data = args
                self.table.map[at : at + len(data)] = data
                return None
            if kind == "header":
                at, value = args
                self.table.map[at : at + 4] = value.to_bytes(4, sys.byteorder, signed=True)
                return None
            if kind == "lock":
                slot, generation = args
                return tbl.try_lock(self.foreign, tbl.slot_lock(slot, generation))
            if kind == "unlock":
                slot, generation = args
                tbl.unlock(self.foreign, tbl.slot_lock(slot, generation))
                return None
            if kind == "revoke":
                slot, current, generation, seq = args
                if current:  # the lease the row names now, as the manager's sweep would ask
                    row = self.table.row(slot)
                    generation, seq = row.generation, row.lease_seq
                return self.table.request_revoke(slot, generation, seq)
            if kind == "take":
                last, cached, avoid, db, pid, start, site, started, now = args
                return self.core.take(self.ours, last, dict.fromkeys(cached), set(avoid), db, pid, start, site, started, now)
            if kind == "give":
                slot, generation, seq, outcome, taken_at, used, now = args
                return self.core.give_back(self.ours, slot, generation, seq, outcome, taken_at, used, now)
            if kind == "renew":
                slot, generation, seq, pid, start, site, taken_at, started, now, idle_only = args
                return self.core.renew(slot, generation, seq, pid, start, site, taken_at, started, now, idle_only)
            if kind == "quiet":
                slot, generation, seq = args
                return self.core.quiet(slot, generation, seq)
        except Exception as exc:  # the same refusal from both is part of the behaviour
            return type(exc).__name__
        raise AssertionError(f"no move {kind!r}")


slots = st.integers(0, CAPACITY - 1)
generations = st.sampled_from(GENERATIONS)
seqs = st.sampled_from((0, 1, 2, 3, 2**64 - 1))
# Times that land on the histogram's edges (10 us, 2**23 * 10 us) as well as anywhere.
times = st.one_of(st.sampled_from((0.0, 10e-6, 20e-6, 83.88608, 100.0)), st.floats(0, 1e9, allow_nan=False))
dbs = st.integers(0, 2)
takes = st.tuples(
    st.just("take"), st.integers(-1, CAPACITY), st.lists(st.integers(-1, CAPACITY + 1), max_size=4),
    st.lists(st.tuples(slots, generations), max_size=2), dbs, st.integers(-(2**31), 2**31 - 1), times,
    st.integers(0, 2**32 - 1), times, times,
)
# A give-back of the last lease taken, of it with a stale lease number or generation, or of anything.
gives = st.tuples(
    st.just("give"), st.sampled_from(("last", "stale seq", "stale generation", "any")), st.integers(-1, CAPACITY),
    generations, seqs, st.integers(-1, 3), times, st.booleans(), times,
)
# A renewal (hand-over in place) of the last lease taken, stale, or of anything; taken_at -1: no hold counted.
renewals = st.tuples(
    st.just("renew"), st.sampled_from(("last", "stale seq", "stale generation", "any")), st.integers(-1, CAPACITY),
    generations, seqs, st.integers(-(2**31), 2**31 - 1), times, st.integers(0, 2**32 - 1),
    st.one_of(st.just(-1.0), times), times, times, st.booleans(),
)
quiets = st.tuples(st.just("quiet"), st.sampled_from(("last", "any")), st.integers(-1, CAPACITY), generations, seqs)
moves = st.one_of(
    st.tuples(st.just("row"), slots, st.sampled_from([1, 1, 1, 0, 2, 3, 4, 5, 9]), generations, dbs, seqs,
              st.sampled_from((0.0, 5.0, 1e10))),
    # Any bytes anywhere in the header or the rows' first fields and histograms.
    st.tuples(st.just("scribble"), st.integers(0, ROWS_AT + CAPACITY * ROW_SIZE - 16), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("header"), st.sampled_from((SLOTS_IN_USE_AT, WAITERS_AT)), st.integers(-3, CAPACITY + 3)),
    st.tuples(st.just("lock"), slots, generations),
    st.tuples(st.just("unlock"), slots, generations),
    # The manager's revoke request (bytes 40..55), of the lease the row names or of any other.
    st.tuples(st.just("revoke"), slots, st.booleans(), generations, seqs),
    takes, takes, gives, gives, renewals, quiets,
)


@pytest.fixture
def twins() -> Iterator[tuple[Twin, Twin]]:
    c = Twin(_accelerator().Core)
    py = Twin(core.PyTableCore)
    c.reset()
    py.reset()
    yield c, py
    c.close()
    py.close()


@given(sequence=st.lists(moves, min_size=1, max_size=40))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_both_cores_give_the_same_results_and_write_the_same_bytes(
    twins: tuple[Twin, Twin], sequence: list[tuple[Any, ...]]
) -> None:
    c, py = twins
    c.reset()
    py.reset()
    last_taken: tuple[int, int, int, float] | None = None
    for move in sequence:
        if move[0] in ("give", "renew", "quiet"):
            which, slot, generation, seq, *rest = move[1:]
            if which != "any" and last_taken is not None:
                slot, generation, seq, _at = last_taken
                seq = seq + 1 if which == "stale seq" else seq
                generation = (generation + 1) & 0xFFFFFFFF if which == "stale generation" else generation
            move = (move[0], slot, generation, seq, *rest)
        got_c, got_py = c.do(move), py.do(move)
        assert got_c == got_py, move
        assert bytes(c.table.map) == bytes(py.table.map), move
        if move[0] == "take" and isinstance(got_c, tuple):
            last_taken = got_c
        elif move[0] == "renew" and got_c and last_taken is not None and move[1:4] == last_taken[:3]:
            last_taken = (move[1], move[2], got_c, move[9])  # the renewed lease is the one to give back


def test_a_take_and_give_back_round_trip_on_both_cores(twins: tuple[Twin, Twin]) -> None:
    """The common case, spelled out: the row as the manager reads it, and the histograms counted."""
    for twin in twins:
        taken = twin.core.take(twin.ours, -1, {}, set(), 0, 4242, 17.0, 9, 10.0, 10.002)
        assert taken == (0, 1, 1, 10.002)
        row = twin.table.row(0)
        held = (row.state, row.holder_pid, row.holder_start, row.call_site, row.acquired_at)
        assert held == (tbl.RowState.HELD, 4242, 17.0, 9, 10.002)
        assert tbl.is_locked(twin.foreign, tbl.slot_lock(0, 1))  # the lease is the lock
        assert twin.core.give_back(twin.ours, 0, 1, 1, tbl.Outcome.CLEAN, 10.002, True, 10.012) == (tbl.Outcome.CLEAN, False)
        assert twin.table.row(0) == tbl.Row(tbl.RowState.READY, 1, lease_seq=1)
        assert not tbl.is_locked(twin.foreign, tbl.slot_lock(0, 1))
        waits, holds = twin.table.histograms(1)
        assert waits[tbl.bucket(0.002)] == 1 and holds[tbl.bucket(0.010)] == 1 and sum(waits) == sum(holds) == 1


def test_a_renewal_keeps_the_lock_and_times_the_new_lease_from_its_own_start(twins: tuple[Twin, Twin]) -> None:
    """A hand-over in place: the next lease number, holder and acquired-at written, the
    row still HELD and locked, the old lease's hold and the new one's wait counted; refused
    (nothing written) for a stale lease, one asked back, an expired connection, or a busy table."""
    for twin in twins:
        slot, generation, seq, now = twin.core.take(twin.ours, -1, {}, set(), 0, 4242, 17.0, 9, 10.0, 10.0)
        assert twin.core.quiet(slot, generation, seq)
        assert twin.core.renew(slot, generation, seq, 4243, 18.0, 5, 10.0, 10.001, 10.004, True) == seq + 1
        row = twin.table.row(slot)
        assert (row.state, row.holder_pid, row.holder_start, row.call_site, row.lease_seq, row.acquired_at) == (
            tbl.RowState.HELD, 4243, 18.0, 5, seq + 1, 10.004)
        assert tbl.is_locked(twin.foreign, tbl.slot_lock(slot, generation))
        waits, holds = twin.table.histograms(1)
        assert waits[tbl.bucket(0.0)] == 1 and waits[tbl.bucket(0.003)] == 1 and holds[tbl.bucket(0.004)] == 1
        before = bytes(twin.table.map)
        assert twin.core.renew(slot, generation, seq, 1, 1.0, 0, 10.0, 10.0, 11.0, False) == 0  # the old number
        twin.table.map[WAITERS_AT : WAITERS_AT + 4] = (1).to_bytes(4, sys.byteorder)
        assert not twin.core.quiet(slot, generation, seq + 1)
        assert twin.core.renew(slot, generation, seq + 1, 1, 1.0, 0, 10.0, 10.0, 11.0, True) == 0  # someone waits
        twin.table.map[WAITERS_AT : WAITERS_AT + 4] = bytes(4)
        assert bytes(twin.table.map) == before
        twin.table.set_expiry(slot, 10.5)
        assert twin.core.renew(slot, generation, seq + 1, 1, 1.0, 0, 10.0, 10.0, 11.0, False) == 0  # expired
        twin.table.set_expiry(slot, 0.0)
        assert twin.table.request_revoke(slot, generation, seq + 1)
        assert not twin.core.quiet(slot, generation, seq + 1)
        assert twin.core.renew(slot, generation, seq + 1, 1, 1.0, 0, 10.0, 10.0, 11.0, False) == 0  # asked back
        with pytest.raises(ValueError):
            twin.core.renew(CAPACITY, generation, seq + 1, 1, 1.0, 0, 10.0, 10.0, 11.0, False)


def test_a_give_back_over_a_newer_lease_writes_nothing(twins: tuple[Twin, Twin]) -> None:
    """The manager replaced the connection (a new generation) or revoked the lease:
    the old holder's give-back reports it and leaves the row alone."""
    for twin in twins:
        slot, generation, seq, now = twin.core.take(twin.ours, -1, {}, set(), 0, 1, 1.0, 0, 1.0, 1.0)
        newer = tbl.Row(tbl.RowState.READY, generation + 1, lease_seq=seq)
        twin.table.write_row(slot, newer)
        assert twin.core.give_back(twin.ours, slot, generation, seq, tbl.Outcome.CLEAN, now, True, 2.0)[0] == -1
        assert twin.table.row(slot) == newer


def test_a_revoked_lease_goes_back_broken_and_its_row_is_not_taken_again(twins: tuple[Twin, Twin]) -> None:
    """Issue 25's contract, on both cores: the manager asks a live holder's lease back
    (writing only the request); the give-back writes BROKEN and answers REVOKED, and a
    READY row whose last lease was asked back (a holder that wrote READY just before
    the request landed) is left for the manager to replace."""
    for twin in twins:
        slot, generation, seq, now = twin.core.take(twin.ours, -1, {}, set(), 0, 1, 1.0, 0, 1.0, 1.0)
        assert twin.table.request_revoke(slot, generation, seq)
        assert twin.core.give_back(twin.ours, slot, generation, seq, tbl.Outcome.CLEAN, now, True, 2.0)[0] == tbl.Outcome.REVOKED
        assert twin.table.row(slot).state is tbl.RowState.BROKEN
        twin.reset()
        slot, generation, seq, now = twin.core.take(twin.ours, -1, {}, set(), 0, 1, 1.0, 0, 1.0, 1.0)
        assert twin.core.give_back(twin.ours, slot, generation, seq, tbl.Outcome.CLEAN, now, True, 2.0)[0] == tbl.Outcome.CLEAN
        twin.table.request_revoke(slot, generation, seq)  # too late to reach the holder: the row says READY
        taken = twin.core.take(twin.ours, slot, {slot: None}, set(), 0, 1, 1.0, 0, 1.0, 1.0)
        assert taken is None or taken[0] != slot
        assert twin.table.row(slot).state is tbl.RowState.READY and twin.table.row(slot).lease_seq == seq


def test_a_closed_core_refuses_every_move_and_the_table_still_closes(twins: tuple[Twin, Twin]) -> None:
    for twin in twins:
        twin.core.close()
        with pytest.raises(ValueError, match="closed"):
            twin.core.take(twin.ours, -1, {}, set(), 0, 1, 1.0, 0, 1.0)
        with pytest.raises(ValueError, match="closed"):
            twin.core.give_back(twin.ours, 0, 1, 1, 0, 0.0, False)
        with pytest.raises(ValueError, match="closed"):
            twin.core.renew(0, 1, 1, 1, 1.0, 0, 0.0, 0.0, 1.0, False)
        with pytest.raises(ValueError, match="closed"):
            twin.core.quiet(0, 1, 1)
        twin.core.close()  # twice is no error


def test_the_table_closes_under_a_live_core() -> None:
    """Table.close lets its core go first: the mapping is released, and a later take raises instead of reading freed memory."""
    table = tbl.Table.create(capacity=2, waiter_capacity=2, max_waiting=2, epoch=b"x")
    fd = tbl.own_description(table.fd)
    table.close()
    assert table.map.closed
    with pytest.raises(ValueError):
        table.core.take(fd, -1, {}, set(), 0, 1, 1.0, 0, 1.0)
    os.close(fd)


def test_the_accelerator_agrees_with_the_layout() -> None:
    """A C module built for another row layout would corrupt a table shared with pure-Python processes: core.py refuses it."""
    assert _accelerator().LAYOUT == core.EXPECTED_LAYOUT


def _run(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "SHAREDPOOL_PURE_PYTHON"} | env
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_fallback_can_be_forced_and_each_path_says_which_it_is() -> None:
    _accelerator()
    assert _run("from sharedpool.table import core; print(core.PATH)") == "c"
    assert _run("from sharedpool.table import core; print(core.describe())", SHAREDPOOL_PURE_PYTHON="1") == (
        "table core: python (forced by SHAREDPOOL_PURE_PYTHON)"
    )
    version = [sys.executable, "-m", "sharedpool", "--version"]
    pure = {**os.environ, "SHAREDPOOL_PURE_PYTHON": "1"}
    forced = subprocess.run(version, capture_output=True, text=True, timeout=60, env=pure)
    assert forced.stdout.strip().endswith("(table core: python)")


_WORKER = """
import os, sys, time
import redis
from sharedpool import SharedConnectionPool
from sharedpool.table import core
pool = SharedConnectionPool(sys.argv[1])
client = redis.Redis(connection_pool=pool)
key = "twins:" + sys.argv[2]
deadline = time.monotonic() + float(sys.argv[3])
done = 0
while time.monotonic() < deadline:
    value = f"{os.getpid()}:{done}"
    client.set(key, value)
    if client.get(key) != value.encode():
        raise SystemExit(f"{key}: read another lease's answer")
    client.incr("twins:total")
    done += 1
print(core.PATH, done)
"""


def test_workers_on_the_two_paths_share_one_table(start_manager: Any, admin: Any) -> None:
    """Four processes, two on the accelerator and two on pure Python, on 2 connections: no lost
    lease, no answer read by the wrong holder, no connection replaced, every lease back."""
    _accelerator()
    manager = start_manager(max_connections=2, min_idle=2)
    assert wait_for(lambda: manager.stats()["connections"]["idle"] == 2, what="both connections open")
    opened = manager.stats()["counters"].get("connections_opened", 0)
    admin.delete("twins:total")
    env = {k: v for k, v in os.environ.items() if k != "SHAREDPOOL_PURE_PYTHON"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, manager.socket_path, str(index), "2.0"],
            env=env | ({"SHAREDPOOL_PURE_PYTHON": "1"} if index % 2 else {}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(4)
    ]
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        reports.append(out.split())
    assert sorted(path for path, _count in reports) == ["c", "c", "python", "python"]
    assert int(admin.get("twins:total")) == sum(int(count) for _path, count in reports)
    assert all(int(count) > 10 for _path, count in reports)
    assert wait_for(lambda: manager.stats()["leases"]["held"] == 0, what="every lease back")
    assert manager.stats()["counters"].get("connections_opened", 0) == opened  # none replaced under a holder
    assert manager.stats()["table_core"] == core.PATH


@pytest.mark.parametrize("seconds", [-1.0, 0.0, 9.99e-6, 10e-6, 19.99e-6, 20e-6, 1e-3, 83.88607, 83.88608, 83.8861, 1e9])
def test_both_cores_count_a_duration_in_the_same_bucket_as_the_manager_reads_it(twins: tuple[Twin, Twin], seconds: float) -> None:
    """The histogram's edges (10 us, the last bucket at 2**23 * 10 us), wait and hold alike."""
    for twin in twins:
        started = 0.0 if seconds >= 0 else -seconds  # exact durations: now - started == seconds
        taken = twin.core.take(twin.ours, -1, {}, set(), 0, 1, 1.0, 0, started, started + seconds)
        assert taken is not None
        twin.core.give_back(twin.ours, *taken[:3], 0, started, True, started + seconds)
        waits, holds = twin.table.histograms(CAPACITY)
        expected = [0] * tbl.HISTOGRAM_BUCKETS
        expected[tbl.bucket(seconds)] = 1
        assert waits == holds == expected
    assert bytes(twins[0].table.map) == bytes(twins[1].table.map)


@pytest.mark.parametrize("make_core", ["c", "python"])
def test_no_move_reaches_past_the_rows_whatever_the_table_says(make_core: str) -> None:
    """A core over heap memory of exactly its rows (so that the sanitizer CI step sees any stray
    byte): slots in use scribbled past the capacity, cached slots and a last slot out of range,
    a give-back, renewal or quiet check of a slot that is none. Takes stay within the rows; the rest is refused."""
    capacity = 2
    memory = bytearray(ROWS_AT + capacity * ROW_SIZE)
    twin = _accelerator().Core(memory, capacity) if make_core == "c" else core.PyTableCore(memory, capacity)  # type: ignore[arg-type]
    holder = tbl.Table.create(capacity=1, waiter_capacity=1, max_waiting=1, epoch=b"locks")  # only its fd, for the locks
    fd = tbl.own_description(holder.fd)
    try:
        memory[SLOTS_IN_USE_AT : SLOTS_IN_USE_AT + 4] = (2**32 - 1).to_bytes(4, sys.byteorder)
        for slot in range(capacity):
            memory[ROWS_AT + slot * ROW_SIZE] = tbl.RowState.READY
        cached = dict.fromkeys([-1, capacity, 2**40, "1", 0.5])
        taken = [twin.take(fd, last, cached, set(), 0, 1, 1.0, 0, 0.0, 1.0) for last in (capacity, 2**40, -5)]
        assert [t[0] for t in taken if t] == [0, 1] and taken[2] is None  # both rows, and nothing beyond
        for slot in (capacity, -1, 2**40):
            with pytest.raises((ValueError, OverflowError)):
                twin.give_back(fd, slot, 0, 1, 0, 0.0, True, 1.0)
            with pytest.raises((ValueError, OverflowError)):
                twin.renew(slot, 0, 1, 1, 1.0, 0, 0.0, 0.0, 1.0, False)
            with pytest.raises((ValueError, OverflowError)):
                twin.quiet(slot, 0, 1)
        with pytest.raises(ValueError):
            twin.give_back(fd, 0, 0, 1, 7, 0.0, True, 1.0)  # an outcome that is none
        assert twin.give_back(fd, 1, 0, 1, 0, 0.0, True, 1.0) == (0, False)
    finally:
        twin.close()
        os.close(fd)
        holder.close()
    assert len(memory) == ROWS_AT + capacity * ROW_SIZE
    with pytest.raises(ValueError):
        (_accelerator().Core if make_core == "c" else core.PyTableCore)(bytearray(ROWS_AT + ROW_SIZE), 2)  # too short for 2 rows


def test_check_and_stats_say_which_table_core_runs(manager: Any) -> None:
    """An operator asks the command line which path runs: this process's, and the manager's."""
    _accelerator()
    env = {k: v for k, v in os.environ.items() if k != "SHAREDPOOL_PURE_PYTHON"}
    checked = run_cli("check", "--socket-path", manager.socket_path, env={**env, "SHAREDPOOL_PURE_PYTHON": "1"})
    assert checked.returncode == 0, checked.stderr
    assert "table core: python (forced by SHAREDPOOL_PURE_PYTHON); the manager's: " + core.PATH in checked.stdout
    stats = run_cli("stats", "--socket-path", manager.socket_path, env=env)
    assert stats.returncode == 0, stats.stderr
    assert f"table core   manager {core.PATH}  this process c" in stats.stdout
