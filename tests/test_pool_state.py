"""The manager's pool as a pure state machine: no sockets, no clock."""

from __future__ import annotations

import pytest

from sharedpool.manager.pool import (
    CloseConnection,
    Limits,
    OpenConnection,
    Pool,
    ResetConnection,
    SendError,
    SendGrant,
    SlotState,
)
from sharedpool.protocol import ErrorCode, Outcome


def make_pool(**limits: object) -> Pool:
    values = dict(max_connections=2, min_idle=0, acquire_timeout=2.0, max_waiting=3)
    values.update(limits)
    return Pool(Limits(**values), rng=lambda: 0.5)  # type: ignore[arg-type]


def connect_all(pool: Pool, actions: list, now: float = 0.0) -> list:
    """Complete every OpenConnection among ``actions``; return the follow-up actions."""
    follow: list = []
    for action in actions:
        if isinstance(action, OpenConnection):
            follow += pool.connected(action.slot, action.generation, f"backend{action.slot}", now)
    return follow


def grants(actions: list) -> list[SendGrant]:
    return [a for a in actions if isinstance(a, SendGrant)]


def test_min_idle_opens_at_start_and_first_grant_carries_fd_once_per_generation() -> None:
    pool = make_pool(min_idle=1)
    opened = pool._dispatch(0.0)
    assert [type(a) for a in opened] == [OpenConnection]
    connect_all(pool, opened)
    holder = pool.add_holder(1, pid=100, now=0.0)
    (first,) = grants(pool.acquire(holder, None, 0.0))
    assert first.with_fd
    pool.release(holder, first.lease.id, Outcome.CLEAN, 0.1)
    (second,) = grants(pool.acquire(holder, None, 0.2))
    assert second.lease.slot is first.lease.slot and not second.with_fd
    # A second thread of the same process (another holder) needs no fd either.
    pool.release(holder, second.lease.id, Outcome.CLEAN, 0.3)
    other_thread = pool.add_holder(2, pid=100, now=0.3)
    (third,) = grants(pool.acquire(other_thread, None, 0.3))
    assert not third.with_fd


def test_waiters_are_served_first_come_first_served() -> None:
    pool = make_pool(max_connections=1)
    holders = [pool.add_holder(i, pid=100 + i, now=0.0) for i in range(3)]
    connect_all(pool, pool.acquire(holders[0], None, 0.0))
    lease0 = next(iter(holders[0].leases.values()))
    pool.acquire(holders[1], None, 0.1)
    pool.acquire(holders[2], None, 0.2)
    (granted,) = grants(pool.release(holders[0], lease0.id, Outcome.CLEAN, 0.3))
    assert granted.lease.holder is holders[1]
    (granted,) = grants(pool.release(holders[1], granted.lease.id, Outcome.CLEAN, 0.4))
    assert granted.lease.holder is holders[2]


def test_max_waiting_refuses_at_once_and_timeout_names_the_pressure() -> None:
    pool = make_pool(max_connections=1, max_waiting=1)
    a, b, c = (pool.add_holder(i, pid=10 + i, now=0.0) for i in range(3))
    connect_all(pool, pool.acquire(a, None, 0.0))
    assert pool.acquire(b, 0.5, 0.0) == []  # queued
    (refusal,) = pool.acquire(c, None, 0.0)
    assert isinstance(refusal, SendError) and refusal.code is ErrorCode.POOL_FULL
    assert "max_waiting=1" in refusal.message
    assert pool.expire(0.4) == []
    (timeout,) = pool.expire(0.5)
    assert isinstance(timeout, SendError) and timeout.code is ErrorCode.TIMEOUT
    assert timeout.message == "no lease from pool 'default' within 0.50 s (1 of 1 connections leased, 0 waiting)"


def test_gone_waiter_is_never_granted() -> None:
    pool = make_pool(max_connections=1)
    a, b, c = (pool.add_holder(i, pid=10 + i, now=0.0) for i in range(3))
    connect_all(pool, pool.acquire(a, None, 0.0))
    pool.acquire(b, None, 0.0)
    pool.acquire(c, None, 0.0)
    pool.holder_gone(b, 0.1)
    lease = next(iter(a.leases.values()))
    (granted,) = grants(pool.release(a, lease.id, Outcome.CLEAN, 0.2))
    assert granted.lease.holder is c


def test_broken_and_abandoned_connections_are_replaced_with_a_new_generation() -> None:
    pool = make_pool(max_connections=1)
    holder = pool.add_holder(1, pid=10, now=0.0)
    connect_all(pool, pool.acquire(holder, None, 0.0))
    lease = next(iter(holder.leases.values()))
    actions = pool.release(holder, lease.id, Outcome.BROKEN, 0.1)
    assert [type(a) for a in actions] == [CloseConnection]
    slot = pool.slots[0]
    assert (slot.state, slot.generation) == (SlotState.EMPTY, 1)
    # The holder dies holding the replacement: closed and replaced again.
    opened = pool.acquire(holder, None, 0.2)
    assert opened == [OpenConnection(0, 1)]
    (grant,) = grants(connect_all(pool, opened))
    assert grant.with_fd  # a new generation always travels with its fd
    actions = pool.holder_gone(holder, 0.3)
    assert any(isinstance(a, CloseConnection) for a in actions)
    assert slot.generation == 2 and pool.counters["reaped_holder_closed"] == 1


def test_needs_reset_goes_through_resetting_before_reuse() -> None:
    pool = make_pool(max_connections=1)
    a, b = pool.add_holder(1, pid=10, now=0.0), pool.add_holder(2, pid=11, now=0.0)
    connect_all(pool, pool.acquire(a, None, 0.0))
    lease = next(iter(a.leases.values()))
    pool.acquire(b, None, 0.1)
    actions = pool.release(a, lease.id, Outcome.NEEDS_RESET, 0.2)
    assert [type(x) for x in actions] == [ResetConnection]
    assert pool.slots[0].state is SlotState.RESETTING and not b.leases
    (granted,) = grants(pool.reset_done(0, pool.slots[0].generation, True, 0.3))
    assert granted.lease.holder is b


@pytest.mark.parametrize("twice", [False, True])
def test_release_of_unknown_or_foreign_lease_is_refused_not_applied(twice: bool) -> None:
    pool = make_pool()
    a, b = pool.add_holder(1, pid=10, now=0.0), pool.add_holder(2, pid=11, now=0.0)
    connect_all(pool, pool.acquire(a, None, 0.0))
    lease = next(iter(a.leases.values()))
    if twice:
        pool.release(a, lease.id, Outcome.CLEAN, 0.1)
        (refusal,) = pool.release(a, lease.id, Outcome.CLEAN, 0.2)
        assert "unknown or already released" in refusal.message
    else:
        (refusal,) = pool.release(b, lease.id, Outcome.BROKEN, 0.1)
        assert "held by pid 10" in refusal.message
        assert pool.slots[0].state is SlotState.LEASED  # not applied
    assert refusal.code is ErrorCode.RELEASE_REFUSED and refusal.lease_id == lease.id


def test_outage_fails_waiters_fast_and_probes_with_backoff() -> None:
    pool = make_pool(max_connections=2)
    holder = pool.add_holder(1, pid=10, now=0.0)
    (opening,) = pool.acquire(holder, None, 0.0)
    (failure,) = pool.connect_failed(opening.slot, opening.generation, "ConnectionError: refused", 0.01)
    assert failure.code is ErrorCode.REDIS_UNAVAILABLE and "refused" in failure.message
    (again,) = pool.acquire(holder, None, 0.02)
    assert again.code is ErrorCode.REDIS_UNAVAILABLE and "unreachable for 0.0 s" in again.message
    assert pool.next_connect_at > 0.02


def test_stale_connection_at_grant_keeps_the_waiters_place() -> None:
    pool = make_pool(max_connections=2)
    a = pool.add_holder(1, pid=10, now=0.0)
    (grant,) = grants(connect_all(pool, pool.acquire(a, None, 0.0)))
    actions = pool.stale_at_grant(grant.lease, 0.1)
    assert any(isinstance(x, CloseConnection) for x in actions)
    assert pool.waiting == 1 and a.waiter is not None
    # The replacement is opened after a short backoff, not in a tight loop.
    assert not any(isinstance(x, OpenConnection) for x in actions)
    assert any(isinstance(x, OpenConnection) for x in pool.expire(pool.next_connect_at))


def test_impossible_transition_is_refused() -> None:
    pool = make_pool()
    with pytest.raises(AssertionError, match="impossible move empty -> leased"):
        pool._move(pool.slots[0], SlotState.LEASED)


def test_repr_tells_the_state() -> None:
    pool = make_pool(max_connections=2)
    holder = pool.add_holder(1, pid=10, now=0.0)
    connect_all(pool, pool.acquire(holder, None, 0.0))
    assert repr(pool) == "<Pool 'default' [conns: 1 open, 0 idle, 0 connecting | leases: 1 held, 0 waiting]>"


def test_lowering_max_connections_still_opens_an_in_range_slot() -> None:
    pool = make_pool(max_connections=4, max_waiting=10)
    holders = [pool.add_holder(i, pid=10 + i, now=0.0) for i in range(4)]
    for holder in holders:
        connect_all(pool, pool.acquire(holder, None, 0.0))
    for holder in holders:
        lease = next(iter(holder.leases.values()))
        pool.release(holder, lease.id, Outcome.CLEAN, 0.1)
    from sharedpool.manager.pool import Limits as L
    pool.apply_limits(L(max_connections=2, min_idle=0, acquire_timeout=2.0, max_waiting=10), 0.2)
    a, b = holders[0], holders[1]
    pool.acquire(a, None, 0.3)
    pool.acquire(b, None, 0.3)
    lease = next(iter(a.leases.values()))
    pool.release(a, lease.id, Outcome.BROKEN, 0.4)  # an in-range slot is now EMPTY
    actions = pool.acquire(a, None, 0.5)
    assert [x for x in actions if isinstance(x, OpenConnection)] == [OpenConnection(lease.slot.index, lease.slot.generation)]


def test_stale_grant_keeps_the_original_deadline() -> None:
    pool = make_pool(max_connections=1)
    holder = pool.add_holder(1, pid=10, now=0.0)
    (grant,) = grants(connect_all(pool, pool.acquire(holder, 1.0, 0.0)))
    pool.stale_at_grant(grant.lease, 0.9)
    (timeout,) = [a for a in pool.expire(1.0) if isinstance(a, SendError)]
    assert timeout.code is ErrorCode.TIMEOUT  # not pushed out to 0.9 + acquire_timeout
