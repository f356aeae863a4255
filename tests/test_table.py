"""The lease table's rows and locks: the pure moves, the in-place hot path, the waiter queue."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedpool import table as tbl
from sharedpool.table import Outcome, Row, RowError, RowState
from sharedpool.table.layout import TICKET_AT


@pytest.fixture
def table() -> tbl.Table:
    created = tbl.Table.create(capacity=4, waiter_capacity=8, max_waiting=3, epoch=b"test-epoch")
    yield created
    created.close()


def test_take_then_give_back_moves_the_row_and_counts_the_lease() -> None:
    ready = Row(RowState.READY, generation=7, lease_seq=41)
    held = tbl.take(ready, pid=123, start=5.0, now=9.5, call_site=3)
    assert (held.state, held.holder_pid, held.lease_seq, held.acquired_at, held.call_site) == (RowState.HELD, 123, 42, 9.5, 3)
    assert tbl.still_mine(held, 7, 42) and not tbl.still_mine(held, 8, 42) and not tbl.still_mine(held, 7, 41)
    afters = ((Outcome.CLEAN, RowState.READY), (Outcome.NEEDS_RESET, RowState.RESET), (Outcome.BROKEN, RowState.BROKEN))
    for outcome, after in afters:
        back = tbl.give_back(held, outcome)
        assert back.state is after and back.holder_pid == 0 and back.lease_seq == 42 and back.generation == 7


@pytest.mark.parametrize("state", [s for s in RowState if s is not RowState.READY])
def test_only_a_ready_row_can_be_taken(state: RowState) -> None:
    with pytest.raises(RowError, match=f"take from {state.name}"):
        tbl.take(Row(state, 1), 1, 0.0, 0.0, 0)


@pytest.mark.parametrize("state", [s for s in RowState if s is not RowState.HELD])
def test_only_a_held_row_can_be_given_back_or_found_abandoned(state: RowState) -> None:
    with pytest.raises(RowError):
        tbl.give_back(Row(state, 1), Outcome.CLEAN)
    with pytest.raises(RowError):
        tbl.found_abandoned(Row(state, 1))


def test_an_expired_connection_goes_back_broken_to_be_replaced() -> None:
    held = tbl.take(Row(RowState.READY, 1, expires_at=10.0), 1, 0.0, 0.0, 0)
    assert tbl.give_back(held, Outcome.CLEAN, now=9.0).state is RowState.READY
    assert tbl.give_back(held, Outcome.CLEAN, now=10.0).state is RowState.BROKEN
    assert tbl.give_back(held, Outcome.NEEDS_RESET, now=10.0).state is RowState.RESET  # reset decides then
    table = tbl.Table.create(capacity=1, waiter_capacity=1, max_waiting=1, epoch=b"x")
    try:
        table.write_row(0, held)
        table.set_expiry(0, tbl.RETIRE_NOW)
        assert table.give_back_in_place(0, 1, held.lease_seq, Outcome.CLEAN, 5.0) is Outcome.BROKEN
    finally:
        table.close()


def test_found_abandoned_marks_broken() -> None:
    assert tbl.found_abandoned(Row(RowState.HELD, 3, holder_pid=9)).state is RowState.BROKEN


def test_revocation_is_recognised_only_for_the_revoked_lease() -> None:
    row = Row(RowState.CLOSED, 5, revoked_generation=4, revoked_seq=10)
    assert tbl.was_revoked(row, 4, 10)
    assert not tbl.was_revoked(row, 4, 11) and not tbl.was_revoked(row, 5, 10)


@given(
    generation=st.integers(0, 2**32 - 1), seq=st.integers(0, 2**40), pid=st.integers(1, 2**31 - 1),
    now=st.floats(0, 1e9), site=st.integers(0, 2**32 - 1), outcome=st.sampled_from(list(Outcome)),
    db=st.integers(0, tbl.MAX_DB), subscribed=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_the_in_place_hot_path_agrees_with_the_pure_moves(
    generation: int, seq: int, pid: int, now: float, site: int, outcome: Outcome, db: int, subscribed: bool
) -> None:
    table = tbl.Table.create(capacity=1, waiter_capacity=1, max_waiting=1, epoch=b"x")
    try:
        ready = Row(RowState.READY, generation, lease_seq=seq, db=db)
        table.write_row(0, ready)
        assert table.db_of(0) == db
        assert table.take_in_place(0, generation, pid, 1.5, now, site, (db + 1) % (tbl.MAX_DB + 1)) == 0  # another db's
        assert table.row(0) == ready
        taken = table.take_in_place(0, generation, pid, 1.5, now, site, db)
        assert table.row(0) == tbl.take(ready, pid, 1.5, now, site, db) and taken == seq + 1
        assert table.take_in_place(0, generation, pid, 1.5, now, site, db) == 0  # not READY any more
        assert table.give_back_in_place(0, generation, taken + 1, outcome, now) is None  # not our lease
        assert not table.mark_subscriber(0, generation, taken + 1)
        if subscribed:
            assert table.mark_subscriber(0, generation, taken)
            assert table.row(0).flags == tbl.RowFlag.SUBSCRIBER and table.row(0).db == db
        held = table.row(0)
        assert table.give_back_in_place(0, generation, taken, outcome, now) is outcome
        assert table.row(0) == tbl.give_back(held, outcome, now)
        assert table.row(0).flags == 0 and table.row(0).db == db  # a lease that ended subscribes no more
    finally:
        table.close()


def test_take_refuses_a_row_of_another_database() -> None:
    with pytest.raises(RowError, match="db 1 from a row of db 2"):
        tbl.take(Row(RowState.READY, 0, db=2), 1, 0.0, 0.0, 0, db=1)


def test_a_scribbled_state_byte_is_a_row_error(table: tbl.Table) -> None:
    table.map[tbl.ROWS_AT] = 200
    with pytest.raises(RowError, match="state byte 200"):
        table.row(0)
    with pytest.raises(RowError, match="outside"):
        table.row(4)


def test_histogram_buckets_and_percentiles() -> None:
    assert tbl.bucket(0.0) == 0 and tbl.bucket(9e-6) == 0
    assert tbl.bucket(15e-6) == 1 and tbl.bucket(25e-6) == 2
    assert tbl.bucket(1e9) == tbl.HISTOGRAM_BUCKETS - 1
    for seconds in (5e-6, 1e-4, 3e-3, 0.5, 2.0):
        assert seconds < tbl.BUCKET_BOUNDS_S[tbl.bucket(seconds)]
    histogram = [0] * tbl.HISTOGRAM_BUCKETS
    histogram[tbl.bucket(1e-4)] = 99
    histogram[tbl.bucket(0.5)] = 1
    assert tbl.percentile(histogram, 0.5) == tbl.BUCKET_BOUNDS_S[tbl.bucket(1e-4)]
    assert tbl.percentile(histogram, 1.0) == tbl.BUCKET_BOUNDS_S[tbl.bucket(0.5)]
    assert tbl.percentile([0] * tbl.HISTOGRAM_BUCKETS, 0.99) == 0.0


def test_counts_land_in_the_row_that_was_leased(table: tbl.Table) -> None:
    # A renewal counts the lease's hold and the next one's wait, in the renewed row only.
    for slot in (1, 2):
        table.write_row(slot, Row(RowState.READY, 3, lease_seq=5))
        taken = table.take_in_place(slot, 3, 42, 1.0, 10.0, 0, 0)
        hold_since, wait_since = (10.0 - 2e-3, 10.0 - 2e-3) if slot == 1 else (9.0, -1.0)
        assert table.core.renew(slot, 3, taken, 42, 1.0, 0, hold_since, wait_since, 10.0, False) == taken + 1
    waits, holds = table.histograms(4)
    assert sum(waits) == 1 and sum(holds) == 2 and waits[tbl.bucket(2e-3)] == 1


def test_waiters_queue_in_ticket_order_and_respect_max_waiting(table: tbl.Table) -> None:
    first = table.enqueue(pid=10, token=1, now=0.0)
    second = table.enqueue(pid=11, token=2, now=0.1)
    third = table.enqueue(pid=12, token=3, now=0.2)
    assert table.waiters == 3
    assert table.enqueue(pid=13, token=4, now=0.3) == -1  # max_waiting=3
    assert table.pick_waiter() == (first, 10, 1)
    assert table.pick_waiter() == (second, 11, 2)
    # A woken waiter that found nothing keeps its place in line.
    table.requeue(first, 10, 1)
    assert table.pick_waiter() == (first, 10, 1)
    assert table.dequeue(first, 10, 1) is True  # it had been woken: the wake is its to pass on
    assert table.dequeue(third, 12, 3) is False
    assert not table.dequeue(second, 99, 2)  # not its entry
    assert table.waiters == 1
    assert table.drop_waiters_of({11}) == 1 and table.waiters == 0 and table.hwm() == 0
    assert table.pick_waiter() is None


def test_a_releaser_wakes_the_oldest_waiter_of_its_own_database(table: tbl.Table) -> None:
    db1_old = table.enqueue(pid=10, token=1, now=0.0, db=1)
    db2 = table.enqueue(pid=11, token=2, now=0.1, db=2)
    db1_new = table.enqueue(pid=12, token=3, now=0.2, db=1)
    assert table.waiters_by_db() == {1: 2, 2: 1}
    assert table.pick_waiter(0) is None  # nobody waits for db 0
    assert table.pick_waiter(2) == (db2, 11, 2)
    assert table.pick_waiter(1) == (db1_old, 10, 1)
    assert table.pick_waiter(1) == (db1_new, 12, 3)
    assert table.waiter(db1_new)[1] == 1


def test_a_ticket_counter_scribbled_to_its_top_wraps_instead_of_failing(table: tbl.Table) -> None:
    table.map[TICKET_AT : TICKET_AT + 8] = b"\xff" * 8
    first = table.enqueue(pid=10, token=1, now=0.0)
    second = table.enqueue(pid=11, token=2, now=0.1)
    assert first >= 0 and second >= 0 and table.waiters == 2
    assert table.waiter(first)[4] == 2**64 - 1 and table.waiter(second)[4] == 0


def test_repair_waiters_survives_garbage(table: tbl.Table) -> None:
    table.enqueue(pid=10, token=1, now=0.0)
    table.map[table.waiters_at + 3 * tbl.WAITER_SIZE] = 77  # no state at all
    table.map[28:32] = b"\xff\xff\xff\x7f"  # the waiter count
    table.repair_waiters()
    assert table.waiters == 1 and table.waiter_pids() == [10]


def test_locks_of_two_descriptions_exclude_even_in_one_process(table: tbl.Table) -> None:
    mine, other = tbl.own_description(table.fd), tbl.own_description(table.fd)
    try:
        offset = tbl.slot_lock(2, 5)
        assert tbl.try_lock(mine, offset)
        assert tbl.try_lock(mine, offset)  # the same description: no exclusion (DESIGN fact 11)
        assert not tbl.try_lock(other, offset)
        assert tbl.is_locked(other, offset) and not tbl.is_locked(mine, offset)
        # The next generation of the slot is another byte: an orphan's lock never blocks it.
        assert tbl.try_lock(other, tbl.slot_lock(2, 6))
        tbl.unlock(mine, offset)
        assert tbl.try_lock(other, offset)
    finally:
        os.close(mine)
        os.close(other)


def test_closing_the_last_fd_of_a_description_frees_its_locks(table: tbl.Table) -> None:
    holder, other = tbl.own_description(table.fd), tbl.own_description(table.fd)
    copy = os.dup(holder)  # like a forked child's inherited fd: the same description
    try:
        assert tbl.try_lock(holder, tbl.ALIVE_LOCK)
        os.close(holder)
        assert tbl.is_locked(other, tbl.ALIVE_LOCK, exclusive=False)  # the copy keeps it (DESIGN fact 12)
        os.close(copy)
        copy = -1
        assert not tbl.is_locked(other, tbl.ALIVE_LOCK, exclusive=False)
    finally:
        os.close(other)
        if copy >= 0:
            os.close(copy)


def test_slot_lock_offsets_never_collide_across_slots_and_generations() -> None:
    offsets = {tbl.slot_lock(slot, generation) for slot in range(64) for generation in range(64)}
    assert len(offsets) == 64 * 64
    assert tbl.ALIVE_LOCK not in offsets and tbl.HEADER_LOCK not in offsets


def test_wake_addresses_are_abstract_and_distinct() -> None:
    assert tbl.wake_address("e", 1, 2).startswith(b"\0")
    assert tbl.wake_address("e", 1, 2) != tbl.wake_address("e", 1, 3) != tbl.wake_address("f", 1, 2)


@given(
    generation=st.integers(0, 2**32 - 1), seq=st.integers(1, 2**40), pid=st.integers(1, 2**31 - 1),
    now=st.floats(1, 1e9), site=st.integers(0, 2**32 - 1), db=st.integers(0, tbl.MAX_DB), subscribed=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_handing_over_in_place_is_a_clean_give_back_then_a_take(
    generation: int, seq: int, pid: int, now: float, site: int, db: int, subscribed: bool
) -> None:
    table = tbl.Table.create(capacity=1, waiter_capacity=1, max_waiting=1, epoch=b"x")
    try:
        table.write_row(0, Row(RowState.READY, generation, lease_seq=seq - 1, db=db))
        taken = table.take_in_place(0, generation, pid, 1.5, now / 2, 7, db)
        if subscribed:
            table.mark_subscriber(0, generation, taken)
        held = table.row(0)
        # The table core's renew, nothing counted (negative hold and wait starts).
        assert table.core.renew(0, generation, taken + 1, pid, 1.5, site, -1.0, -1.0, now, False) == 0  # not our lease
        assert table.row(0) == held
        handed = table.core.renew(0, generation, taken, pid, 1.5, site, -1.0, -1.0, now, False)
        expected = tbl.take(tbl.give_back(held, Outcome.CLEAN, now), pid, 1.5, now, site, db)
        assert table.row(0) == expected and handed == expected.lease_seq != taken
        assert table.row(0).acquired_at == now  # leak warnings and max_lease_time time the new lease
    finally:
        table.close()


def test_an_expired_connection_is_never_handed_over(table: tbl.Table) -> None:
    table.write_row(0, Row(RowState.READY, 3, lease_seq=5))
    taken = table.take_in_place(0, 3, 42, 1.0, 10.0, 0, 0)
    table.set_expiry(0, 11.0)
    assert table.core.renew(0, 3, taken, 42, 1.0, 0, -1.0, -1.0, 11.5, False) == 0
    assert table.give_back_in_place(0, 3, taken, Outcome.CLEAN, 11.5) is Outcome.BROKEN


def test_oldest_waiter_since_skips_our_own_and_other_databases(table: tbl.Table) -> None:
    assert table.oldest_waiter_since(0, other_than=1) is None
    table.enqueue(1, 11, 5.0, db=0)  # ours
    table.enqueue(2, 21, 7.0, db=1)  # another database
    table.enqueue(3, 31, 9.0, db=0)
    assert table.oldest_waiter_since(0, other_than=1) == 9.0
    assert table.oldest_waiter_since(0, other_than=3) == 5.0
    assert table.oldest_waiter_since(1, other_than=1) == 7.0
