"""sharedpool.asyncio: a lease handed straight to the next task of the process, the slot's lock kept."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from support.async_mix import many_tasks

import sharedpool.asyncio as spa
from sharedpool import table as tbl
from sharedpool.asyncio import async_pool


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture
def hand_overs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts hand-overs done (slots handed over, in order)."""
    done: list[int] = []
    original = async_pool.SharedConnectionPool._hand_over

    def counting(self: async_pool.SharedConnectionPool, lease: Any, used: bool) -> bool:
        handed = original(self, lease, used)
        if handed:
            done.append(lease.slot)
        return handed

    monkeypatch.setattr(async_pool.SharedConnectionPool, "_hand_over", counting)
    return done


async def _until_in_line(pool: spa.SharedConnectionPool, tasks: int) -> None:
    deadline = time.monotonic() + 10
    while pool._line.in_table + pool._seats.waiting < tasks:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"{tasks} tasks never queued: {pool!r}"
        await asyncio.sleep(0.005)


def _client(manager: Any) -> spa.SharedRedis:
    # The exclusive path: every command its own lease, handed over between tasks.
    return spa.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=30, autopipeline=False)


def _rows(pool: spa.SharedConnectionPool) -> list[tbl.Row]:
    att = pool._attachment
    assert att is not None
    return [att.table.row(slot) for slot in range(att.table.slots_in_use)]


def test_many_tasks_on_two_connections_are_handed_leases_and_read_only_their_replies(start_manager, hand_overs) -> None:
    manager = start_manager(max_connections=2, min_idle=2)

    async def main() -> None:
        r = _client(manager)
        try:
            assert await many_tasks(r, tasks=64, rounds=8, tag="handoff") == []
            assert all(row.state is tbl.RowState.READY for row in _rows(r.connection_pool))
            assert r.connection_pool._attachment.held == 0
        finally:
            await r.aclose()

    run(main())
    assert len(hand_overs) > 100  # most leases went task to task


def _on_one_slot(start_manager: Any, body: Callable[[spa.SharedRedis, spa.SharedConnectionPool, str], Awaitable[None]]) -> None:
    """Run ``body(client, pool, key)`` against a manager of one connection."""
    manager = start_manager(max_connections=1, min_idle=1)

    async def main() -> None:
        r = _client(manager)
        try:
            await body(r, r.connection_pool, f"k:{uuid.uuid4().hex}")
        finally:
            await r.aclose()

    run(main())


def test_a_task_cancelled_as_a_lease_is_handed_to_it_passes_it_on(start_manager, hand_overs) -> None:
    async def body(r: spa.SharedRedis, pool: spa.SharedConnectionPool, k: str) -> None:
        async with r.lease() as pinned:
            await pinned.set(k, "first")
            second = asyncio.create_task(r.get(k))
            third = asyncio.create_task(r.get(k))
            await _until_in_line(pool, 2)
        # The block's end handed the slot to `second`, which has not run
        # yet: cancelled now, it must pass the lease on, not keep it.
        assert len(hand_overs) == 1
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert await third == "first"
        assert len(hand_overs) == 2  # second to third, the lock never let go
        assert [row.state for row in _rows(pool)] == [tbl.RowState.READY]
        assert pool._attachment.held == 0 and await r.get(k) == "first"

    _on_one_slot(start_manager, body)


def test_a_cancellation_mid_command_is_never_handed_over(start_manager, hand_overs) -> None:
    async def body(r: spa.SharedRedis, pool: spa.SharedConnectionPool, k: str) -> None:
        await r.set(k, "v")
        blocked = asyncio.create_task(r.blpop([k + ":empty"], timeout=5))
        waiting = asyncio.create_task(r.get(k))
        await _until_in_line(pool, 1)
        generation = _rows(pool)[0].generation
        blocked.cancel()  # its BLPOP reply is still to come: the connection is broken
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert await waiting == "v"  # on the slot's next connection, not the broken one
        assert hand_overs == [] and _rows(pool)[0].generation != generation

    _on_one_slot(start_manager, body)


def test_a_handed_over_lease_is_timed_from_its_own_start(start_manager, hand_overs) -> None:
    # Two leases of 1.6 s in a row on one slot, one handed to the other:
    # 3.2 s in all, past max_lease_time, but each lease is well within it
    # (a margin of 1.4 s for a loaded machine's late wake-ups).
    manager = start_manager(max_connections=1, min_idle=1, leak_threshold=0.5, max_lease_time=3.0, reap_interval=0.1)

    async def main() -> None:
        r = _client(manager)
        pool, k = r.connection_pool, f"k:{uuid.uuid4().hex}"

        async def second_lease() -> tbl.Row:
            async with r.lease() as pinned:
                row = _rows(pool)[0]
                await asyncio.sleep(1.6)
                assert await pinned.get(k) == "first"  # not revoked
                return row

        try:
            async with r.lease() as pinned:
                await pinned.set(k, "first")
                first = _rows(pool)[0]
                second = asyncio.create_task(second_lease())
                await _until_in_line(pool, 1)
                await asyncio.sleep(1.6)
                handed_at = time.monotonic()
            row = await second
            assert hand_overs == [0]
            assert row.lease_seq == first.lease_seq + 1 and row.acquired_at >= handed_at > first.acquired_at
            assert row.holder_pid == first.holder_pid and _rows(pool)[0].state is tbl.RowState.READY
        finally:
            await r.aclose()

    run(main())
    with open(manager.log_path, errors="replace") as log:
        text = log.read()
    assert "revok" not in text.lower() and "possible leak" in text  # each lease warned of, none revoked


@pytest.fixture
def table_give_backs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts leases given back to the table (slots, in order): a lock that left this process."""
    done: list[int] = []
    original = async_pool.give_back

    def counting(lease: Any, outcome: Any, used: bool = True) -> Any:
        done.append(lease.slot)
        return original(lease, outcome, used)

    monkeypatch.setattr(async_pool, "give_back", counting)
    return done


def test_back_to_back_commands_keep_their_lease_and_it_goes_back_by_the_next_turn(start_manager, table_give_backs) -> None:
    """A task's commands one after another renew one lease in place (a new lease number each,
    the lock never given back); once the task awaits something else, the lease is back in the
    table by the loop's next turn, and it does the same when many tasks release in one turn."""

    async def body(r: spa.SharedRedis, pool: spa.SharedConnectionPool, k: str) -> None:
        await r.set(k, "v")
        await asyncio.sleep(0)
        first = _rows(pool)[0].lease_seq
        given_back = len(table_give_backs)
        for _ in range(20):
            assert await r.get(k) == "v"
        assert len(table_give_backs) == given_back  # still parked: not one give-back between the 20
        await asyncio.sleep(0)
        row = _rows(pool)[0]
        assert row.state is tbl.RowState.READY and row.lease_seq == first + 20 and pool._attachment.held == 0
        assert len(table_give_backs) == given_back + 1
        # Many tasks on one slot, released in one turn: handed task to task, none left by the next turn.
        assert await asyncio.gather(*(r.get(k) for _ in range(8))) == ["v"] * 8
        await asyncio.sleep(0)
        assert _rows(pool)[0].state is tbl.RowState.READY and pool._attachment.held == 0

    _on_one_slot(start_manager, body)


def test_every_lease_released_in_a_turn_is_there_for_that_turns_next_commands(start_manager, table_give_backs) -> None:
    """Leases given back clean in one step (no one waiting) are all kept for the turn: the
    next takes of that turn get them back without the table, and the next turn ends them all."""
    manager = start_manager(max_connections=4, min_idle=4)

    async def main() -> None:
        r = _client(manager)
        pool = r.connection_pool
        try:
            for _ in range(2):  # the first round binds the slots' fds (a request to the manager each)
                held = [await pool.get_connection() for _ in range(3)]
                before = len(table_give_backs)
                for conn in held:
                    await pool.release(conn)  # no suspension in a release: all three in this step
                again = [await pool.get_connection() for _ in range(3)]
                assert len(table_give_backs) == before and {id(c) for c in again} == {id(c) for c in held}
                for conn in again:
                    await pool.release(conn)
                await asyncio.sleep(0)
                assert len(table_give_backs) == before + 3 and pool._attachment.held == 0
                assert all(row.state is tbl.RowState.READY for row in _rows(pool))
        finally:
            await r.aclose()

    run(main())


def test_a_parked_lease_never_keeps_a_taker_of_another_pool_waiting(start_manager) -> None:
    """One connection, an asyncio task sending commands back to back (its lease parked
    between them), and a sync client in a thread of the same process: the thread's
    takes queue in the table, so the task's next command gives the lease back instead
    of keeping it, and both get every reply, within the sync client's acquire_timeout."""
    import threading

    import sharedpool

    manager = start_manager(max_connections=1, min_idle=1)
    k = f"k:{uuid.uuid4().hex}"
    stop = threading.Event()
    sync_replies: list[str] = []
    errors: list[BaseException] = []

    def sync_side() -> None:
        client = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=10)
        try:
            while not stop.is_set() and len(sync_replies) < 50:
                sync_replies.append(client.get(k))
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    async def main() -> int:
        r = _client(manager)
        try:
            await r.set(k, "v")
            thread = threading.Thread(target=sync_side)
            thread.start()
            commands = 0
            deadline = time.monotonic() + 60
            while thread.is_alive():
                assert time.monotonic() < deadline, f"the sync client got {len(sync_replies)} replies in 60 s"
                assert await r.get(k) == "v"
                commands += 1
            return commands
        finally:
            stop.set()
            await r.aclose()

    commands = run(main())
    assert errors == [] and sync_replies == ["v"] * 50 and commands > 0
