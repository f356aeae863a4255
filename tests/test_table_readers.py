"""Readers without the lock: what the manager's sweep and a taker's first look may see of a row being written.

A holder writes its row under the slot's lock, but the manager and other
takers read rows without it. Before this was held to, ``Struct.pack_into``
zeroed each row before writing it, and the manager read a shared slot as
CLOSED (or a lease as held since 1970) and replaced a connection under a
live holder: a broken pipe in the middle of its command.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import multiprocess
import pytest
import redis
from support.waiting import wait_for

import sharedpool
from sharedpool import table as tbl
from sharedpool.table import Outcome, Row, RowState

GENERATION = 7


@pytest.fixture
def busy_row() -> Iterator[tbl.Table]:
    """A table whose row 0 a forked child takes and gives back as fast as it can (as many holders would)."""
    table = tbl.Table.create(capacity=1, waiter_capacity=1, max_waiting=1, epoch=b"readers")
    table.write_row(0, Row(RowState.READY, GENERATION, lease_seq=1, expires_at=1e12, db=3))
    child = os.fork()
    if child == 0:
        try:
            while True:
                seq = table.take_in_place(0, GENERATION, 4242, 17.0, time.monotonic(), 9, 3)
                now = time.monotonic()
                # A hand-over in place (row rewritten HELD, the hold counted) between take and give-back.
                seq = table.core.renew(0, GENERATION, seq, 4242, 17.0, 9, now - 0.001, -1.0, now, False) or seq
                table.give_back_in_place(0, GENERATION, seq, Outcome.CLEAN, time.monotonic())
        finally:
            os._exit(0)
    try:
        wait_for(lambda: table.row(0).lease_seq > 100, what="the writer under way")
        yield table
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        table.close()


def test_a_row_being_taken_and_given_back_never_reads_as_a_state_nobody_wrote(busy_row: tbl.Table) -> None:
    seen: set[tuple[int, int, int]] = set()
    deadline = time.monotonic() + 1.0
    reads = 0
    while time.monotonic() < deadline:
        for _ in range(1000):
            seen.add((busy_row.state_of(0), busy_row.generation_of(0), busy_row.db_of(0)))
        reads += 1000
    assert reads > 10_000
    # Only the two states the holders write, and the generation and database they never change.
    assert seen <= {(RowState.READY, GENERATION, 3), (RowState.HELD, GENERATION, 3)}, seen
    header = busy_row.hot()
    assert header == (0, 0)


def test_a_settled_read_of_a_held_row_is_whole(busy_row: tbl.Table) -> None:
    settled = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        row = busy_row.row_settled(0)
        if row is None:
            continue  # in flux: the manager looks again at its next sweep
        settled += 1
        assert row.generation == GENERATION and row.db == 3 and row.expires_at == 1e12
        if row.state is RowState.HELD:
            assert (row.holder_pid, row.holder_start, row.call_site) == (4242, 17.0, 9), row
            assert row.acquired_at > 0
        else:
            # An idle row's holder fields are not judged: only that nobody holds it.
            assert row.state is RowState.READY and row.holder_pid == 0, row
    assert settled > 1000


def test_histogram_counts_read_by_the_manager_never_go_back(busy_row: tbl.Table) -> None:
    """Each lease counts its hold time into the row's histogram; exported as Prometheus
    counters, a count that dips for an instant would read as a counter reset."""
    last = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for _ in range(1000):
            _waits, holds = busy_row.histograms(1)
            total = sum(holds)
            assert total >= last, f"hold count went from {last} to {total}"
            last = total
    assert last > 1000


def _ping_hard(socket_path: str, seconds: float) -> str:
    pool = sharedpool.SharedConnectionPool(socket_path)
    done = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            conn = pool.get_connection()
            conn.send_command("PING")
            if conn.read_response() not in (b"PONG", "PONG"):
                return "a PING got another reply"
            pool.release(conn)
            done += 1
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc} after {done} leases"
    finally:
        pool.disconnect()
    return ""


def test_many_holders_on_few_connections_never_lose_one_to_the_manager(start_manager: Any) -> None:
    """Eight processes take, use and give back two connections as fast as they can: the
    manager must never judge a live lease abandoned, nor replace a connection."""
    manager = start_manager(max_connections=2, min_idle=2, reap_interval=0.05)
    wait_for(lambda: manager.stats()["counters"]["connections_opened"] >= 2, what="both connections open")
    with multiprocess.get_context("fork").Pool(8) as workers:
        errors = workers.starmap(_ping_hard, [(manager.socket_path, 3.0)] * 8)
    assert [e for e in errors if e] == []
    stats = manager.stats()
    assert stats["counters"]["connections_opened"] == 2, stats["counters"]
    with open(manager.log_path) as log:
        text = log.read()
    assert "replaced" not in text and "reaped" not in text, text[-2000:]
