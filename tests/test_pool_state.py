"""The manager's pool core as a pure state machine: no sockets, no processes, no clock.

Every entry point is given ``now`` (seconds of test time: the numbers here
are small on purpose) and the random source is fixed (``rng=lambda: 0.5``),
so each time-driven duty (backoff, leak warning, revocation, lifetime, idle
trimming, shutdown) is tested by passing times, never by waiting. The tests
assert on the actions returned (the I/O the loop must do) and the counters.

Backends are plain strings: the core never touches them, it only hands them
back in actions.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator

import pytest

from sharedpool import stat_keys
from sharedpool.config import ManagerConfig
from sharedpool.manager.actions import (
    Action,
    CloseConnection,
    Expire,
    Limits,
    OpenConnection,
    Publish,
    Release,
    RequestRevoke,
    ResetConnection,
    RowView,
    ShutDown,
    Wake,
)
from sharedpool.manager.pool_state import _ALLOWED_MOVES, Pool, ReapCause, Slot, SlotState
from sharedpool.table import RETIRE_NOW, Outcome, RowState

EMPTY, CONNECTING, SHARED, MANAGED = SlotState.EMPTY, SlotState.CONNECTING, SlotState.SHARED, SlotState.MANAGED
READY, HELD, CLOSED, MANAGER = RowState.READY, RowState.HELD, RowState.CLOSED, RowState.MANAGER

MakePool = Callable[..., Pool]


def _consistent(pool: Pool) -> None:
    """Each slot sits in exactly the collection of its state: nothing moved a slot around ``_move``."""
    seen: list[int] = []
    for state in SlotState:
        for index, slot in pool._by_state[state].items():
            assert slot.state is state and slot.index == index and pool.slots[index] is slot, (state, slot)
            seen.append(index)
        assert pool.count(state) == len(pool.in_state(state))
    assert sorted(seen) == list(range(pool.capacity))
    assert pool.open_connections == pool.count(SHARED) + pool.count(MANAGED)
    for db in {slot.db for slot in pool.slots}:
        assert pool.in_db(db) == sum(1 for slot in pool.slots if slot.db == db and slot.state is not EMPTY), db


@pytest.fixture
def make_pool() -> Iterator[MakePool]:
    """Pools with a fixed random source; at teardown each must still be consistent."""
    made: list[Pool] = []

    def make(capacity: int = 4, **limits: object) -> Pool:
        values: dict[str, object] = dict(max_connections=2, min_idle=0)
        values.update(limits)
        pool = Pool(Limits(**values), capacity, rng=lambda: 0.5)  # type: ignore[arg-type]
        made.append(pool)
        return pool

    yield make
    for pool in made:
        _consistent(pool)


def backend(slot: int, generation: int) -> str:
    return f"redis-conn-{slot}.{generation}"


def connect(pool: Pool, actions: list[Action], now: float = 0.0) -> list[Action]:
    """Complete every OpenConnection among ``actions``; return the follow-up actions."""
    follow: list[Action] = []
    for action in actions:
        if isinstance(action, OpenConnection):
            follow += pool.connected(action.slot, action.generation, backend(action.slot, action.generation), now)
    return follow


def open_slots(pool: Pool, count: int, now: float = 0.0) -> list[Slot]:
    """Open exactly ``count`` slots (as waiters would ask) and share them: READY in the table."""
    connect(pool, pool.dispatch(now, idle={0: pool.limits.min_idle}, waiters={0: count}), now)
    shared = pool.in_state(SHARED)
    assert len(shared) == count
    return sorted(shared, key=lambda s: s.index)


def ready(slot: Slot, lock_free: bool = True, lease_seq: int = 0, revoke_asked: bool = False) -> RowView:
    return RowView(
        slot.index, READY, slot.generation, lease_seq=lease_seq, lock_free=lock_free, db=slot.db, revoke_asked=revoke_asked
    )


def held(slot: Slot, acquired_at: float = 0.0, lease_seq: int = 1, pid: int = 4242, site: int = 0,
         lock_free: bool = False, holder_alive: bool = True, subscriber: bool = False, revoke_asked: bool = False) -> RowView:
    return RowView(
        slot.index, HELD, slot.generation, lease_seq, pid, acquired_at, site, lock_free, holder_alive, slot.db, subscriber,
        revoke_asked,
    )


def of(kind: type, actions: list[Action]) -> list:
    return [a for a in actions if isinstance(a, kind)]


# ----- states and moves ------------------------------------------------------------


def test_allowed_moves_table_is_the_slot_life_cycle() -> None:
    assert _ALLOWED_MOVES == {
        EMPTY: frozenset({CONNECTING}),
        CONNECTING: frozenset({SHARED, EMPTY}),
        SHARED: frozenset({MANAGED, EMPTY}),
        MANAGED: frozenset({SHARED, EMPTY}),
    }
    assert set(_ALLOWED_MOVES) == set(SlotState)


_IMPOSSIBLE = [(old, new) for old, new in itertools.product(SlotState, SlotState) if new not in _ALLOWED_MOVES[old]]


@pytest.mark.parametrize("old, new", _IMPOSSIBLE, ids=[f"{o.value}->{n.value}" for o, n in _IMPOSSIBLE])
def test_every_impossible_move_is_refused_and_changes_nothing(make_pool: MakePool, old: SlotState, new: SlotState) -> None:
    pool = make_pool()
    slot = pool.slots[0]
    walk = {EMPTY: [], CONNECTING: [CONNECTING], SHARED: [CONNECTING, SHARED], MANAGED: [CONNECTING, SHARED, MANAGED]}
    for step in walk[old]:
        pool._move(slot, step)
    with pytest.raises(AssertionError, match=f"slot 0: impossible move {old.value} -> {new.value}"):
        pool._move(slot, new)
    assert slot.state is old and pool.count(old) == (4 if old is EMPTY else 1)


def test_every_allowed_move_updates_the_collections(make_pool: MakePool) -> None:
    pool = make_pool()
    slot = pool.slots[1]
    for old, new in [(EMPTY, CONNECTING), (CONNECTING, SHARED), (SHARED, MANAGED), (MANAGED, SHARED),
                     (SHARED, EMPTY), (EMPTY, CONNECTING), (CONNECTING, EMPTY), (EMPTY, CONNECTING),
                     (CONNECTING, SHARED), (SHARED, MANAGED), (MANAGED, EMPTY)]:
        assert slot.state is old
        pool._move(slot, new)
        assert slot in pool.in_state(new) and slot not in pool.in_state(old)
        _consistent(pool)


def test_a_scenario_moves_slots_only_through_move(make_pool: MakePool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every state change a public method makes is one recorded ``_move``."""
    pool = make_pool(max_connections=3, min_idle=1, max_lifetime=50.0)
    moves: list[tuple[int, SlotState, SlotState]] = []
    real_move = Pool._move

    def recording_move(self: Pool, slot: Slot, new: SlotState) -> None:
        moves.append((slot.index, slot.state, new))
        real_move(self, slot, new)

    monkeypatch.setattr(Pool, "_move", recording_move)
    states = [s.state for s in pool.slots]
    expected_changes = 0

    def step(actions: list[Action]) -> list[Action]:
        nonlocal states, expected_changes
        now_states = [s.state for s in pool.slots]
        expected_changes += sum(a is not b for a, b in zip(states, now_states, strict=True))
        states = now_states
        _consistent(pool)
        return actions

    a, b = open_slots(pool, 2)
    step([])
    step(pool.given_back(a.index, a.generation, Outcome.NEEDS_RESET, 1.0))
    step(pool.reset_done(a.index, a.generation, True, 2.0))
    step(pool.given_back(b.index, b.generation, Outcome.BROKEN, 3.0))
    step(pool.sweep([ready(a)], 60.0, waiters={}))  # a expired; min_idle reopens
    step(connect(pool, pool.dispatch(61.0, {}, {0: 1}), 61.0))
    step(pool.begin_shutdown())
    step(pool.close_all(62.0))
    # Two changes within one call (CONNECTING -> SHARED -> EMPTY) show as one above: at least as many moves.
    assert len(moves) >= expected_changes > 0
    for _index, old, new in moves:
        assert new in _ALLOWED_MOVES[old]


def test_repr_tells_the_state(make_pool: MakePool) -> None:
    pool = make_pool(capacity=5, max_connections=5, pool_name="web")
    assert repr(pool) == "<Pool 'web' [conns: 0 open, 0 connecting, 0 in repair]>"
    a, b, c = open_slots(pool, 3)
    pool.given_back(c.index, c.generation, Outcome.NEEDS_RESET, 1.0)
    pool.dispatch(1.0, idle={}, waiters={0: 1})
    assert repr(pool) == "<Pool 'web' [conns: 3 open, 1 connecting, 1 in repair]>"
    assert repr(pool.slots[2]) == "<Slot 2 db 0 gen 0 managed>"
    assert repr(pool.slots[4]) == "<Slot 4 db 0 gen 0 empty>"


def test_limits_from_config_takes_the_pool_fields() -> None:
    config = ManagerConfig(
        pool_name="jobs", max_connections=7, min_idle=2, max_lifetime=11.0, idle_timeout=12.0,
        leak_threshold=13.0, max_lease_time=14.0, socket_path="/nonexistent/sp.sock",
    )
    assert Limits.from_config(config, "127.0.0.1:6379/0") == Limits(
        max_connections=7, min_idle=2, redis_label="127.0.0.1:6379/0", pool_name="jobs",
        max_lifetime=11.0, idle_timeout=12.0, leak_threshold=13.0, max_lease_time=14.0,
    )


def test_slot_lookup_trusts_only_a_true_name(make_pool: MakePool) -> None:
    pool = make_pool()
    (a,) = open_slots(pool, 1)
    assert pool.slot(a.index, a.generation) is a
    for index, generation in [(a.index, a.generation + 1), (-1, 0), (4, 0), (2**32, 0)]:
        assert pool.slot(index, generation) is None


# ----- opening ----------------------------------------------------------------------


def test_min_idle_opens_at_start_then_nothing_more(make_pool: MakePool) -> None:
    pool = make_pool(max_connections=3, min_idle=2)
    actions = pool.dispatch(0.0, idle={}, waiters={})
    assert actions == [
        Publish(0, 0, MANAGER), OpenConnection(0, 0),
        Publish(1, 0, MANAGER), OpenConnection(1, 0),
    ]
    assert pool.count(CONNECTING) == 2
    assert pool.dispatch(0.001, idle={}, waiters={}) == []  # the two connecting count
    follow = connect(pool, actions, 0.002)
    assert follow == [Publish(0, 0, READY), Wake(1, 0), Publish(1, 0, READY), Wake(1, 0)]
    assert pool.counters[stat_keys.OPENED] == 2 and pool.open_connections == 2
    assert pool.dispatch(0.003, idle={0: 2}, waiters={}) == []
    # One of them is taken: min_idle asks for another, within max_connections.
    assert pool.dispatch(0.004, idle={0: 1}, waiters={}) == [Publish(2, 0, MANAGER), OpenConnection(2, 0)]


def test_demand_opens_within_max_connections(make_pool: MakePool) -> None:
    pool = make_pool(capacity=6, max_connections=3)
    for _ in range(5):
        assert pool.demanded(0.0, 0) == ""
    assert pool.demand == {0: 5}
    opened = of(OpenConnection, pool.dispatch(0.0, idle={}, waiters={}))
    assert opened == [OpenConnection(0, 0), OpenConnection(1, 0), OpenConnection(2, 0)]
    assert pool.demand == {}  # consumed
    connect(pool, opened)
    # Slots 3-5 exist in the table but lie beyond max_connections: never opened.
    assert pool.demanded(0.1, 0) == ""
    assert pool.dispatch(0.1, idle={}, waiters={0: 10}) == []
    assert pool.in_state(EMPTY) == pool.slots[3:]


def test_dispatch_takes_the_larger_of_waiters_and_demand(make_pool: MakePool) -> None:
    pool = make_pool(capacity=8, max_connections=8)
    pool.demanded(0.0, 0)
    pool.demanded(0.0, 0)
    assert len(of(OpenConnection, pool.dispatch(0.0, idle={}, waiters={0: 1}))) == 2
    assert len(of(OpenConnection, pool.dispatch(0.0, idle={}, waiters={0: 3}))) == 1  # 3 wanted, 2 connecting


def test_dispatch_opens_nothing_without_an_empty_slot_or_while_stopping(make_pool: MakePool) -> None:
    full = make_pool(capacity=2, max_connections=2)
    open_slots(full, 2)
    assert full.dispatch(1.0, idle={}, waiters={0: 5}) == []
    stopping = make_pool(min_idle=2)
    stopping.begin_shutdown()
    assert stopping.dispatch(1.0, idle={}, waiters={0: 5}) == []


def test_connected_publishes_ready_with_a_jittered_expiry(make_pool: MakePool) -> None:
    pool = make_pool(max_lifetime=100.0)
    (open_,) = of(OpenConnection, pool.dispatch(1.0, {}, {0: 1}))
    # rng 0.5: up to 10% earlier, here 5% of 100 s.
    assert pool.connected(0, 0, "conn", 2.0) == [Publish(0, 0, READY, expires_at=97.0), Wake(1, 0)]
    slot = pool.slots[0]
    assert (slot.state, slot.backend, slot.expires_at, slot.idle_since) == (SHARED, "conn", 97.0, 2.0)


@pytest.mark.parametrize("index, generation", [(0, 1), (1, 0), (-1, 0), (99, 0)])
def test_connected_for_a_slot_no_longer_wanted_closes_the_connection(make_pool: MakePool, index: int, generation: int) -> None:
    pool = make_pool()
    pool.dispatch(0.0, {}, {0: 1})  # slot 0 generation 0 is CONNECTING; slot 1 is EMPTY
    assert pool.connected(index, generation, "late", 1.0) == [CloseConnection("late", "no longer wanted")]
    assert pool.counters[stat_keys.OPENED] == 0 and pool.open_connections == 0


def test_connected_twice_closes_the_second(make_pool: MakePool) -> None:
    pool = make_pool()
    connect(pool, pool.dispatch(0.0, {}, {0: 1}))
    assert pool.connected(0, 0, "again", 1.0) == [CloseConnection("again", "no longer wanted")]


def test_connected_while_shutting_down_is_closed_at_once(make_pool: MakePool) -> None:
    pool = make_pool()
    pool.dispatch(0.0, {}, {0: 1})
    pool.begin_shutdown()
    assert pool.connected(0, 0, "conn", 1.0) == [CloseConnection("conn", "shutting down"), Publish(0, 1, CLOSED)]
    assert pool.slots[0].state is EMPTY and pool.slots[0].generation == 1
    assert pool.counters[stat_keys.OPENED] == 1 and pool.counters[stat_keys.CLOSED] == 1


def test_connected_beyond_a_lowered_max_connections_is_retired(make_pool: MakePool) -> None:
    pool = make_pool(max_connections=4)
    pool.dispatch(0.0, {}, {0: 4})
    assert pool.apply_limits(Limits(max_connections=2, min_idle=0)) == []  # nothing shared yet: no Expire
    assert pool.slots[3].retire
    assert pool.connected(3, 0, "c3", 1.0) == [CloseConnection("c3", "retired"), Publish(3, 1, CLOSED)]
    assert pool.connected(1, 0, "c1", 1.0) == [Publish(1, 0, READY), Wake(1, 0)]


# ----- Redis unreachable ------------------------------------------------------------


def test_connect_failures_back_off_exponentially_up_to_a_cap(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_idle=1, redis_label="10.0.0.9:6379/0")
    caplog.set_level(logging.INFO, "sharedpool.manager")
    assert pool.dispatch(0.0, {}, {}) == [Publish(0, 0, MANAGER), OpenConnection(0, 0)]
    assert pool.connect_failed(0, 0, "ConnectionError: refused", 1.0) == [Publish(0, 1, CLOSED), Wake(-1)]
    assert pool.slots[0].state is EMPTY and pool.slots[0].generation == 1
    assert pool.counters[stat_keys.REDIS_ERRORS] == 1
    assert pool.redis_down_since == 1.0 and pool.last_connect_error == "ConnectionError: refused"
    assert "Redis at 10.0.0.9:6379/0 unreachable: ConnectionError: refused" in caplog.text
    # 0.05 s * 2**1, times the jitter (0.5 + 0.5/2).
    assert pool.next_connect_at == pytest.approx(1.0 + 0.1 * 0.75)
    assert pool.dispatch(1.07, {}, {}) == []
    delays = []
    now = 1.075
    for generation in range(1, 12):
        assert pool.dispatch(now, {}, {}) == [Publish(0, generation, MANAGER), OpenConnection(0, generation)]
        pool.connect_failed(0, generation, "ConnectionError: refused", now)
        delays.append(round(pool.next_connect_at - now, 6))
        now = pool.next_connect_at
    assert delays[:3] == [0.15, 0.3, 0.6]  # doubling
    assert delays[-1] == 3.75 and max(delays) == 3.75  # capped at 5 s, times the jitter
    # Still one outage: the first failure's time, logged once.
    assert pool.redis_down_since == 1.0 and caplog.text.count("unreachable") == 1
    assert pool.dispatch(now, {}, {}) == [Publish(0, 12, MANAGER), OpenConnection(0, 12)]
    assert pool.connected(0, 12, "conn", now + 2.0) == [Publish(0, 12, READY), Wake(1, 0)]
    assert pool.redis_down_since is None and pool.next_connect_at == 0.0
    assert "reachable again after" in caplog.text
    # The count of failures was reset: the next failure backs off from the start.
    pool.dispatch(now + 3.0, {}, {0: 1})
    pool.connect_failed(1, 0, "ConnectionError: refused", now + 3.0)
    assert pool.next_connect_at == pytest.approx(now + 3.0 + 0.075)
    assert pool.redis_down_since is None  # a connection is open: Redis is not down


def test_outage_probes_with_one_connection_at_a_time(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=4, min_idle=3)
    assert len(of(OpenConnection, pool.dispatch(0.0, {}, {}))) == 3
    # While others still connect, one failure is not an outage yet.
    assert pool.connect_failed(0, 0, "timeout", 0.1) == [Publish(0, 1, CLOSED)]
    assert pool.redis_down_since is None
    pool.connect_failed(1, 0, "timeout", 0.2)
    assert pool.redis_down_since is None
    assert pool.connect_failed(2, 0, "timeout", 0.3) == [Publish(2, 1, CLOSED), Wake(-1)]
    assert pool.redis_down_since == 0.3
    probe = pool.dispatch(pool.next_connect_at, {}, waiters={0: 10})
    assert probe == [Publish(0, 1, MANAGER), OpenConnection(0, 1)]
    assert pool.dispatch(pool.next_connect_at + 1.0, {}, waiters={0: 10}) == []  # one probe in flight is enough


def test_connect_failed_for_a_stale_attempt_is_ignored(make_pool: MakePool) -> None:
    pool = make_pool()
    pool.dispatch(0.0, {}, {0: 1})
    assert pool.connect_failed(0, 1, "x", 1.0) == []
    assert pool.connect_failed(1, 0, "x", 1.0) == []
    assert pool.connect_failed(7, 0, "x", 1.0) == []
    assert pool.counters[stat_keys.REDIS_ERRORS] == 0 and pool.slots[0].state is CONNECTING


def test_demand_while_redis_is_down_probes_again_soon_instead_of_after_the_backoff(make_pool: MakePool) -> None:
    """A waiter that needs Redis makes the manager try again within 50 ms (not after
    the backoff), so a restarted Redis serves the very request that waits."""
    pool = make_pool(min_idle=1, redis_label="cache:6379/2", pool_name="api")
    for attempt in range(6):  # the backoff grows with each failure
        pool.dispatch(pool.next_connect_at, {}, {})
        assert pool.slots[0].state is CONNECTING
        pool.connect_failed(0, pool.slots[0].generation, "ConnectionError: Connection refused", 10.0 + attempt)
    failed_at = pool.last_failure_at
    assert pool.next_connect_at > failed_at + 0.05
    assert pool.demanded(failed_at + 0.01, 0) == ""
    assert pool.next_connect_at == pytest.approx(failed_at + 0.05)
    assert pool.counters[stat_keys.REFUSED_UNAVAILABLE] == 1 and pool.demand == {0: 1}
    # The probe it asked for succeeds: the demand is served as usual.
    opens = [a for a in pool.dispatch(pool.next_connect_at, {}, {0: 1}) if isinstance(a, OpenConnection)]
    assert len(opens) == 1
    connect(pool, opens, failed_at + 0.06)
    assert pool.redis_down_since is None and pool.demanded(failed_at + 0.07, 0) == ""


def test_demand_refused_while_shutting_down(make_pool: MakePool) -> None:
    pool = make_pool(pool_name="web")
    open_slots(pool, 1)
    pool.begin_shutdown()
    assert pool.demanded(1.0, 0) == "pool 'web' is shutting down"
    assert pool.demand == {} and pool.counters[stat_keys.REFUSED_UNAVAILABLE] == 0


# ----- what workers gave back -------------------------------------------------------


def test_given_back_needing_reset_is_reset_by_the_manager(make_pool: MakePool) -> None:
    pool = make_pool()
    (a,) = open_slots(pool, 1)
    assert pool.given_back(0, 0, Outcome.NEEDS_RESET, 1.0) == [
        Publish(0, 0, MANAGER), ResetConnection(0, 0, backend(0, 0), 0),
    ]
    assert a.state is MANAGED and pool.counters[stat_keys.RESETS] == 1
    assert pool.given_back(0, 0, Outcome.NEEDS_RESET, 1.1) == []  # already in repair
    assert repr(pool) == "<Pool 'default' [conns: 1 open, 0 connecting, 1 in repair]>"


def test_given_back_broken_is_discarded_with_a_new_generation(make_pool: MakePool) -> None:
    pool = make_pool()
    (a,) = open_slots(pool, 1)
    assert pool.given_back(0, 0, Outcome.BROKEN, 1.0) == [
        CloseConnection(backend(0, 0), "returned broken"), Publish(0, 1, CLOSED),
    ]
    assert (a.state, a.generation, a.backend) == (EMPTY, 1, None)
    assert pool.counters[stat_keys.reaped_key("broken")] == 1 and pool.counters[stat_keys.CLOSED] == 1
    assert pool.given_back(0, 0, Outcome.BROKEN, 1.1) == []  # the old generation is gone
    assert pool.counters[stat_keys.reaped_key("broken")] == 1


def test_given_back_by_a_finder_of_an_abandoned_lease_counts_its_cause(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool()
    open_slots(pool, 1)
    actions = pool.given_back(0, 0, Outcome.NEEDS_RESET, 1.0, cause=ReapCause.HOLDER_CLOSED)
    assert actions == [CloseConnection(backend(0, 0), "reaped: holder_closed"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.reaped_key("holder_closed")] == 1
    assert pool.counters[stat_keys.RESETS] == 0 and pool.counters[stat_keys.reaped_key("broken")] == 0
    assert "reaped slot 0 (holder_closed): connection replaced" in caplog.text


def test_an_expired_connection_given_back_is_recycled(make_pool: MakePool) -> None:
    pool = make_pool(max_lifetime=20.0)  # expires at 19.0 (rng 0.5)
    open_slots(pool, 2)
    # The holder saw the expiry and gave it back BROKEN: recycling, not breakage.
    assert pool.given_back(0, 0, Outcome.BROKEN, 19.0) == [CloseConnection(backend(0, 0), "retired"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.RECYCLED] == 1 and pool.counters[stat_keys.reaped_key("broken")] == 0
    assert pool.given_back(1, 0, Outcome.BROKEN, 18.9)[0] == CloseConnection(backend(1, 0), "returned broken")


def test_a_retired_connection_given_back_is_replaced_not_counted_as_recycled(make_pool: MakePool) -> None:
    pool = make_pool()
    open_slots(pool, 2)
    assert pool.retire_all() == [Expire(0, RETIRE_NOW), Expire(1, RETIRE_NOW)]
    assert pool.given_back(0, 0, Outcome.NEEDS_RESET, 2.0) == [CloseConnection(backend(0, 0), "retired"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.RECYCLED] == 0 and pool.counters[stat_keys.RESETS] == 0
    assert not pool.slots[0].retire  # the new generation starts fresh
    pool.begin_shutdown()
    assert pool.given_back(1, 0, Outcome.BROKEN, 3.0)[0] == CloseConnection(backend(1, 0), "retired")


def test_reset_done_shares_the_slot_again(make_pool: MakePool) -> None:
    pool = make_pool(max_lifetime=100.0)
    open_slots(pool, 1)
    pool.given_back(0, 0, Outcome.NEEDS_RESET, 1.0)
    assert pool.reset_done(0, 0, True, 2.0) == [Publish(0, 0, READY, expires_at=95.0), Wake(1, 0)]
    assert pool.slots[0].state is SHARED and pool.slots[0].idle_since == 2.0
    assert pool.reset_done(0, 0, True, 2.1) == []  # not in repair any more


def test_reset_done_failed_replaces_the_connection(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool()
    open_slots(pool, 1)
    pool.given_back(0, 0, Outcome.NEEDS_RESET, 1.0)
    assert pool.reset_done(0, 0, False, 2.0, "TimeoutError: timed out") == [
        CloseConnection(backend(0, 0), "reset failed"), Publish(0, 1, CLOSED),
    ]
    assert "reset of slot 0 failed (TimeoutError: timed out)" in caplog.text
    assert pool.reset_done(0, 0, False, 2.1) == [] and pool.reset_done(0, 1, True, 2.1) == []


@pytest.mark.parametrize("why", ["retire", "shutdown", "expired", "beyond max_connections"])
def test_reset_done_of_a_connection_that_is_not_wanted_any_more(make_pool: MakePool, why: str) -> None:
    pool = make_pool(max_connections=2, max_lifetime=100.0)
    open_slots(pool, 2)
    pool.given_back(1, 0, Outcome.NEEDS_RESET, 1.0)
    now = 2.0
    if why == "retire":
        assert pool.retire_all() == [Expire(0, RETIRE_NOW)]  # the one in repair is told later
    elif why == "shutdown":
        pool.begin_shutdown()
    elif why == "expired":
        now = 95.0
    else:
        pool.apply_limits(Limits(max_connections=1))
    assert pool.reset_done(1, 0, True, now) == [CloseConnection(backend(1, 0), "retired"), Publish(1, 1, CLOSED)]


def test_peer_closed_while_idle_replaces_now(make_pool: MakePool) -> None:
    pool = make_pool()
    open_slots(pool, 1)
    closed = pool.peer_closed(0, 0, locked=True, now=1.0)
    assert closed == [CloseConnection(backend(0, 0), "closed by Redis"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.HEALTH_CHECK_FAILED] == 1
    assert pool.redis_down_since is None  # one closed connection is not an outage


def test_peer_closed_while_held_marks_it_for_replacement_when_given_back(make_pool: MakePool) -> None:
    pool = make_pool()
    open_slots(pool, 1)
    assert pool.peer_closed(0, 0, locked=False, now=1.0) == []
    assert pool.slots[0].retire and pool.slots[0].state is SHARED
    assert pool.given_back(0, 0, Outcome.CLEAN, 2.0) == [CloseConnection(backend(0, 0), "retired"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.HEALTH_CHECK_FAILED] == 0


def test_peer_closed_for_a_stale_slot_releases_the_lock_the_loop_took(make_pool: MakePool) -> None:
    pool = make_pool()
    open_slots(pool, 1)
    assert pool.peer_closed(0, 7, locked=True, now=1.0) == [Release(0, 7)]
    assert pool.peer_closed(0, 7, locked=False, now=1.0) == []
    assert pool.peer_closed(3, 0, locked=True, now=1.0) == [Release(3, 0)]
    assert pool.open_connections == 1 and not pool.slots[0].retire


def test_failed_health_check_replaces_a_shared_connection_only(make_pool: MakePool) -> None:
    pool = make_pool()
    open_slots(pool, 1)
    assert pool.health_check_failed(0, 1, 1.0) == []
    assert pool.health_check_failed(0, 0, 1.0) == [
        CloseConnection(backend(0, 0), "health check failed"), Publish(0, 1, CLOSED),
    ]
    assert pool.counters[stat_keys.HEALTH_CHECK_FAILED] == 1 and pool.counters[stat_keys.CLOSED] == 1
    assert pool.health_check_failed(0, 1, 1.0) == []  # EMPTY now
    assert pool.counters[stat_keys.HEALTH_CHECK_FAILED] == 1


# ----- the sweep ----------------------------------------------------------------------


def test_sweep_releases_ready_rows_with_nothing_to_do(make_pool: MakePool) -> None:
    pool = make_pool(min_idle=2, idle_timeout=10.0, max_lifetime=100.0)
    a, b = open_slots(pool, 2)
    assert pool.sweep([ready(a), ready(b)], 5.0, waiters={}) == [Release(0, 0), Release(1, 0)]
    assert pool.counters[stat_keys.CLOSED] == 0


def test_sweep_leaves_a_ready_row_being_taken_alone(make_pool: MakePool) -> None:
    pool = make_pool(max_lifetime=10.0, idle_timeout=1.0)
    (a,) = open_slots(pool, 1)
    pool.retire_all()
    # Expired, retired and idle, but its lock is someone else's: no action at all.
    assert pool.sweep([ready(a, lock_free=False)], 50.0, waiters={}) == []
    assert a.state is SHARED and pool.counters[stat_keys.CLOSED] == 0


def test_sweep_reaps_a_held_row_whose_lock_is_free(make_pool: MakePool) -> None:
    pool = make_pool(min_idle=1)
    (a,) = open_slots(pool, 1)
    actions = pool.sweep([held(a, lock_free=True)], 1.0, waiters={})
    assert actions == [
        CloseConnection(backend(0, 0), "reaped: holder_closed"), Publish(0, 1, CLOSED),
        # min_idle: a replacement is opened in the same sweep.
        Publish(0, 1, MANAGER), OpenConnection(0, 1),
    ]
    assert pool.counters[stat_keys.reaped_key("holder_closed")] == 1


def test_sweep_reaps_a_dead_holder_whose_lock_a_child_kept(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool()
    (a,) = open_slots(pool, 1)
    actions = pool.sweep([held(a, pid=777, holder_alive=False)], 1.0, waiters={})
    # Without the lock: the new generation's lock byte is another one (table.slot_lock).
    assert actions == [CloseConnection(backend(0, 0), "holder dead"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.reaped_key("holder_dead")] == 1
    assert pool.counters[stat_keys.reaped_key("holder_closed")] == 0
    assert "holder pid 777 is dead but its lock lives on" in caplog.text


def test_sweep_leaves_a_live_holder_alone(make_pool: MakePool) -> None:
    pool = make_pool()
    (a,) = open_slots(pool, 1)
    assert pool.sweep([held(a)], 1000.0, waiters={}) == []  # no leak_threshold, no max_lease_time
    assert pool.counters[stat_keys.LEAK_WARNINGS] == 0


def test_leak_warning_once_per_lease_naming_where_it_was_taken(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(leak_threshold=5.0)
    (a,) = open_slots(pool, 1)
    pool.note_site(4242, 3, "app/views.py:88 in checkout")
    pool.note_site(9999, 4, "someone else's site")
    caplog.set_level(logging.WARNING, "sharedpool.manager")
    assert pool.sweep([held(a, acquired_at=10.0, lease_seq=7, site=3)], 14.999, {}) == []
    assert pool.counters[stat_keys.LEAK_WARNINGS] == 0 and not caplog.records
    for now in (15.0, 16.0, 60.0):
        assert pool.sweep([held(a, acquired_at=10.0, lease_seq=7, site=3)], now, {}) == []
    assert pool.counters[stat_keys.LEAK_WARNINGS] == 1
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "possible leak: pid 4242 has held lease 7 (slot 0) for 5.0 s (leak_threshold 5 s); "
        "taken at app/views.py:88 in checkout"
    )
    # The next lease on the slot is warned about on its own; a site of another pid is not ours.
    pool.sweep([held(a, acquired_at=70.0, lease_seq=8, site=4)], 80.0, {})
    assert pool.counters[stat_keys.LEAK_WARNINGS] == 2
    assert caplog.records[-1].getMessage().endswith("taken at an unknown place")
    assert a.state is SHARED and pool.counters[stat_keys.CLOSED] == 0  # a warning, nothing more


def test_max_lease_time_revokes_the_lease(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(leak_threshold=1.0, max_lease_time=30.0)
    (a,) = open_slots(pool, 1)
    assert pool.sweep([held(a, acquired_at=100.0, lease_seq=5)], 129.9, {}) == []  # warned only
    actions = pool.sweep([held(a, acquired_at=100.0, lease_seq=5)], 130.0, {})
    # Its holder has the lock: asked back, shut down, and no row written under it.
    assert actions == [RequestRevoke(0, 0, 5, backend(0, 0))]
    assert pool.counters[stat_keys.reaped_key("revoked")] == 1 and pool.counters[stat_keys.LEAK_WARNINGS] == 1
    assert "revoked lease 5 of pid 4242 (slot 0) after 30.0 s: max_lease_time=30 s" in caplog.text
    # Asked once: while its holder keeps the lock, later sweeps wait.
    assert pool.sweep([held(a, acquired_at=100.0, lease_seq=5, revoke_asked=True)], 140.0, {}) == []
    # The holder gives it back BROKEN (it honoured the request): replaced, counted once.
    assert pool.given_back(0, 0, Outcome.BROKEN, 141.0) == [CloseConnection(backend(0, 0), "given back after it was shut down"),
                                                             Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.reaped_key("revoked")] == 1 and pool.counters[stat_keys.reaped_key("broken")] == 0


def test_a_revoked_lease_given_back_ready_is_replaced_under_the_lock(make_pool: MakePool) -> None:
    # A holder that read its row before the request reached it writes READY:
    # takers leave the row alone, and the sweep replaces it once it has the lock.
    pool = make_pool(max_lease_time=2.0)
    (a,) = open_slots(pool, 1)
    pool.sweep([held(a, acquired_at=0.0, lease_seq=5)], 5.0, {})
    assert pool.sweep([ready(a, lease_seq=5, lock_free=False, revoke_asked=True)], 6.0, {}) == []
    actions = pool.sweep([ready(a, lease_seq=5, revoke_asked=True)], 6.0, {})
    assert actions[:2] == [CloseConnection(backend(0, 0), "revoked lease given back"), Publish(0, 1, CLOSED)]


def test_a_revocation_that_missed_its_lease_leaves_the_next_one_alone(make_pool: MakePool) -> None:
    # The request reached the row after lease 5 ended (the loop's re-read said so):
    # nothing was shut down, and lease 6 is judged on its own, from its own start.
    pool = make_pool(max_lease_time=2.0)
    (a,) = open_slots(pool, 1)
    assert pool.sweep([held(a, acquired_at=0.0, lease_seq=5)], 5.0, {}) == [RequestRevoke(0, 0, 5, backend(0, 0))]
    pool.revoke_missed(0, 0)
    assert pool.sweep([held(a, acquired_at=4.5, lease_seq=6)], 5.0, {}) == []
    assert pool.sweep([held(a, acquired_at=4.5, lease_seq=6)], 7.0, {}) == [RequestRevoke(0, 0, 6, backend(0, 0))]


def test_a_revoked_holder_whose_lock_is_freed_is_reaped(make_pool: MakePool) -> None:
    pool = make_pool(max_lease_time=2.0)
    (a,) = open_slots(pool, 1)
    pool.sweep([held(a, acquired_at=0.0, lease_seq=5)], 5.0, {})
    # Killed while revoked (its lock went with it): the row is ours now.
    actions = pool.sweep([held(a, acquired_at=0.0, lease_seq=5, revoke_asked=True, lock_free=True)], 6.0, {})
    assert actions[:2] == [CloseConnection(backend(0, 0), "given back after it was shut down"), Publish(0, 1, CLOSED)]


def test_revocation_wins_over_a_first_leak_warning(make_pool: MakePool) -> None:
    pool = make_pool(leak_threshold=1.0, max_lease_time=2.0)
    (a,) = open_slots(pool, 1)
    assert of(RequestRevoke, pool.sweep([held(a)], 5.0, {})) == [RequestRevoke(0, 0, 1, backend(0, 0))]
    assert pool.counters[stat_keys.LEAK_WARNINGS] == 0


def test_idle_trimming_keeps_min_idle(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=4, min_idle=1, idle_timeout=10.0)
    a, b, c = open_slots(pool, 3, now=0.0)
    # c was used at 5.0 (its lease number moved): its idle time starts then.
    assert pool.sweep([ready(a), ready(b), ready(c, lease_seq=3)], 5.0, {}) == [Release(0, 0), Release(1, 0), Release(2, 0)]
    actions = pool.sweep([ready(a), ready(b), ready(c, lease_seq=3)], 10.0, {})
    # a is the one kept for min_idle; b goes; c is idle for only 5 s.
    # Idle slots are released after the decisions (dispatch may rebind them).
    assert actions == [CloseConnection(backend(1, 0), "idle_timeout"), Publish(1, 1, CLOSED), Release(0, 0), Release(2, 0)]
    assert pool.counters[stat_keys.IDLE_CLOSED] == 1 and pool.counters[stat_keys.RECYCLED] == 0
    actions = pool.sweep([ready(a), ready(c, lease_seq=3)], 15.0, {})
    assert actions == [CloseConnection(backend(2, 0), "idle_timeout"), Publish(2, 1, CLOSED), Release(0, 0)]
    assert pool.open_connections == 1


def test_idle_timeout_zero_never_trims(make_pool: MakePool) -> None:
    pool = make_pool(min_idle=0, idle_timeout=0.0)
    a, b = open_slots(pool, 2)
    assert pool.sweep([ready(a), ready(b)], 1e6, {}) == [Release(0, 0), Release(1, 0)]


def test_max_lifetime_recycles_an_idle_connection(make_pool: MakePool) -> None:
    pool = make_pool(min_idle=1, max_lifetime=100.0)
    (a,) = open_slots(pool, 1, now=10.0)  # expires at 105.0
    assert pool.sweep([ready(a)], 104.999, {}) == [Release(0, 0)]
    actions = pool.sweep([ready(a)], 105.0, {})
    assert actions[:2] == [CloseConnection(backend(0, 0), "max_lifetime reached"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.RECYCLED] == 1 and a.state is CONNECTING  # reopened for min_idle at once


@pytest.mark.parametrize("why", ["max_lifetime", "retired"])
def test_a_connection_replaced_by_the_sweep_is_reopened_for_min_idle_in_that_sweep(make_pool: MakePool, why: str) -> None:
    """min_idle counts connections that stay: one the sweep just closed is not
    idle, so its replacement is opened in the same sweep (as it is for a
    reaped one, test_sweep_reaps_a_held_row_whose_lock_is_free), not one
    reap_interval later."""
    pool = make_pool(capacity=4, max_connections=2, min_idle=1, max_lifetime=100.0)
    (a,) = open_slots(pool, 1, now=10.0)  # expires at 105.0
    now = 50.0
    if why == "max_lifetime":
        now = 105.0
    else:
        pool.retire_all()
    actions = pool.sweep([ready(a)], now, waiters={})
    assert of(CloseConnection, actions), actions
    assert of(OpenConnection, actions), f"min_idle=1 and nothing idle left, yet nothing opened: {actions}"


def test_sweep_retires_ready_connections_after_retire_all_or_a_lower_max(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=4)
    a, b, c = open_slots(pool, 3)
    assert pool.apply_limits(Limits(max_connections=2)) == [Expire(2, RETIRE_NOW)]
    assert pool.sweep([ready(a), ready(b), ready(c)], 1.0, {}) == [
        CloseConnection(backend(2, 0), "retired"), Publish(2, 1, CLOSED), Release(0, 0), Release(1, 0),
    ]
    assert pool.retire_all() == [Expire(0, RETIRE_NOW), Expire(1, RETIRE_NOW)]
    assert of(CloseConnection, pool.sweep([ready(a), ready(b)], 3.0, {})) == [
        CloseConnection(backend(0, 0), "retired"), CloseConnection(backend(1, 0), "retired"),
    ]
    assert pool.counters[stat_keys.RECYCLED] == 0


@pytest.mark.parametrize("state, generation", [(None, 0), (READY, 1), (HELD, 5), (READY, 2**32 - 1)])
def test_a_scribbled_row_is_repaired_by_replacing_the_connection(make_pool: MakePool, caplog: pytest.LogCaptureFixture,
                                                                 state: RowState | None, generation: int) -> None:
    pool = make_pool()
    open_slots(pool, 1)
    view = RowView(0, state, generation, lease_seq=3, holder_pid=1, lock_free=True)
    assert pool.sweep([view], 1.0, {}) == [CloseConnection(backend(0, 0), "row scribbled"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.TABLE_REPAIRS] == 1
    assert "slot 0: row unreadable or of another generation" in caplog.text


@pytest.mark.parametrize("state", [CLOSED, MANAGER])
def test_a_shared_row_in_a_managers_state_is_repaired(make_pool: MakePool, state: RowState) -> None:
    pool = make_pool()
    (a,) = open_slots(pool, 1)
    # Its lock is held (a live holder's, maybe): shut down now, the row left alone.
    actions = pool.sweep([RowView(0, state, 0, lock_free=False)], 1.0, {})
    assert actions == [ShutDown(backend(0, 0), f"row says {state.name} in a shared slot")]
    assert pool.sweep([RowView(0, state, 0, lock_free=False)], 1.5, {}) == []  # once
    # The lock is free: the row is ours to write.
    actions = pool.sweep([RowView(0, state, 0, lock_free=True)], 2.0, {})
    assert actions[:2] == [CloseConnection(backend(0, 0), f"row says {state.name} in a shared slot"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.TABLE_REPAIRS] == 1


def test_sweep_repairs_rows_given_back_without_a_report(make_pool: MakePool) -> None:
    pool = make_pool()
    a, b = open_slots(pool, 2)
    # Still locked by whoever is writing them: not yet.
    assert pool.sweep([RowView(0, RowState.RESET, 0), RowView(1, RowState.BROKEN, 0)], 1.0, {}) == []
    actions = pool.sweep([RowView(0, RowState.RESET, 0, lock_free=True), RowView(1, RowState.BROKEN, 0, lock_free=True)], 2.0, {})
    assert actions == [
        Publish(0, 0, MANAGER), ResetConnection(0, 0, backend(0, 0), 0),
        CloseConnection(backend(1, 0), "returned broken"), Publish(1, 1, CLOSED),
    ]
    assert pool.counters[stat_keys.RESETS] == 1 and pool.counters[stat_keys.reaped_key("broken")] == 1


def test_sweep_releases_locks_of_rows_it_does_not_share(make_pool: MakePool) -> None:
    pool = make_pool()
    (a,) = open_slots(pool, 1)
    pool.given_back(0, 0, Outcome.NEEDS_RESET, 0.5)  # MANAGED now
    pool.dispatch(0.5, {}, {0: 1})  # slot 1 CONNECTING
    rows = [
        RowView(0, READY, 0, lock_free=True), RowView(1, READY, 0, lock_free=True), RowView(2, READY, 0, lock_free=True),
        RowView(3, HELD, 0, lock_free=False), RowView(-1, READY, 0, lock_free=True), RowView(99, None, 0, lock_free=True),
    ]
    assert pool.sweep(rows, 1.0, {}) == [Release(0, 0), Release(1, 0), Release(2, 0), Release(-1, 0), Release(99, 0)]
    assert pool.counters[stat_keys.CLOSED] == 0 and pool.counters[stat_keys.TABLE_REPAIRS] == 0


def test_sweep_opens_for_waiters(make_pool: MakePool) -> None:
    pool = make_pool(max_connections=3)
    (a,) = open_slots(pool, 1)
    assert pool.sweep([held(a)], 1.0, waiters={0: 2}) == [
        Publish(1, 0, MANAGER), OpenConnection(1, 0), Publish(2, 0, MANAGER), OpenConnection(2, 0),
    ]


# ----- admin, reload, shutdown ---------------------------------------------------------


def test_pause_and_resume(make_pool: MakePool) -> None:
    pool = make_pool()
    assert pool.pause() is None and pool.paused
    assert pool.resume() == [Wake(-1)] and not pool.paused


def test_retire_all_expires_shared_slots_and_marks_the_rest(make_pool: MakePool) -> None:
    pool = make_pool(capacity=5, max_connections=5)
    a, b, c = open_slots(pool, 3)
    pool.given_back(1, 0, Outcome.NEEDS_RESET, 1.0)  # MANAGED
    pool.dispatch(1.0, idle={}, waiters={0: 1})  # slot 3 CONNECTING
    assert pool.retire_all() == [Expire(0, RETIRE_NOW), Expire(2, RETIRE_NOW)]
    assert [s.retire for s in pool.slots] == [True, True, True, True, False]
    # The one in repair is replaced when its reset is done.
    assert of(CloseConnection, pool.reset_done(1, 0, True, 3.0)) == [CloseConnection(backend(1, 0), "retired")]


def test_a_connection_opened_before_retire_all_is_never_shared_as_is(make_pool: MakePool) -> None:
    """``reconnect`` / a new Redis URL: a connection that was being opened when
    every connection was retired (to the old target, perhaps) must not be
    lent to workers as an ordinary READY connection. Either it is closed
    on arrival, or it is published already expired (RETIRE_NOW), so its
    first holder gives it back for replacement."""
    pool = make_pool(capacity=4, max_connections=4)
    open_slots(pool, 1)
    pool.dispatch(1.0, idle={0: 1}, waiters={0: 1})  # slot 1 CONNECTING
    assert pool.retire_all() == [Expire(0, RETIRE_NOW)]
    actions = pool.connected(1, 0, "c1", 3.0)
    closed = CloseConnection("c1", "retired") in actions
    published = [a for a in actions if isinstance(a, Publish) and a.state is READY]
    assert closed or all(p.expires_at == RETIRE_NOW for p in published), (
        f"a connection opened before retire_all was shared as an ordinary READY one: {actions}"
    )


def test_apply_limits_drains_slots_beyond_the_new_max(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=4, min_idle=0)
    open_slots(pool, 4)
    new = Limits(max_connections=1, min_idle=1, idle_timeout=5.0)
    assert pool.apply_limits(new) == [Expire(1, RETIRE_NOW), Expire(2, RETIRE_NOW), Expire(3, RETIRE_NOW)]
    assert pool.limits is new and not pool.slots[0].retire


def test_apply_limits_above_the_table_is_capped_with_a_warning(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(capacity=4, max_connections=2)
    new = Limits(max_connections=10)
    assert pool.apply_limits(new) == []
    assert pool.limits.max_connections == 4
    assert "max_connections 10 is above the lease table's 4 rows: using 4 until a restart" in caplog.text
    assert len(of(OpenConnection, pool.dispatch(1.0, {}, waiters={0: 10}))) == 4


def test_begin_shutdown_expires_everything_and_wakes_every_waiter(make_pool: MakePool) -> None:
    pool = make_pool(min_idle=2)
    open_slots(pool, 2)
    assert pool.begin_shutdown() == [Expire(0, RETIRE_NOW), Expire(1, RETIRE_NOW), Wake(-1)]
    assert pool.shutting_down
    # Idle connections go at the next sweep; nothing is opened again, whatever min_idle says.
    assert pool.sweep([ready(pool.slots[0]), held(pool.slots[1])], 1.0, waiters={0: 3}) == [
        CloseConnection(backend(0, 0), "retired"), Publish(0, 1, CLOSED),
    ]


def test_close_all_closes_held_and_repairing_connections(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=4)
    open_slots(pool, 3)
    pool.given_back(2, 0, Outcome.NEEDS_RESET, 1.0)  # MANAGED
    pool.dispatch(1.0, idle={}, waiters={0: 1})  # slot 3 CONNECTING: its connection is closed when it arrives
    pool.begin_shutdown()
    assert pool.close_all(10.0) == [
        CloseConnection(backend(0, 0), "shutting down"), Publish(0, 1, CLOSED),
        CloseConnection(backend(1, 0), "shutting down"), Publish(1, 1, CLOSED),
        CloseConnection(backend(2, 0), "shutting down"), Publish(2, 1, CLOSED),
    ]
    assert pool.open_connections == 0 and pool.count(CONNECTING) == 1
    assert pool.connected(3, 0, "late", 11.0) == [CloseConnection("late", "shutting down"), Publish(3, 1, CLOSED)]
    assert pool.close_all(12.0) == []


# ----- rows of slots the workers do not own; call sites --------------------------------


def test_rewrite_row_puts_back_what_the_manager_last_wrote(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(max_connections=3)
    connect(pool, pool.dispatch(0.0, {}, waiters={0: 1}), 0.0)  # slot 0 SHARED
    pool.dispatch(0.0, {}, waiters={0: 1})  # slot 1 CONNECTING
    empty, connecting = pool.slots[2], pool.slots[1]
    assert pool.expected_row(empty) is CLOSED and pool.expected_row(connecting) is MANAGER
    caplog.set_level(logging.WARNING, "sharedpool.manager")
    assert pool.rewrite_row(empty) == [Publish(2, 0, CLOSED)]
    assert pool.rewrite_row(connecting) == [Publish(1, 0, MANAGER)]
    assert pool.counters[stat_keys.TABLE_REPAIRS] == 2 and pool.counters[stat_keys.CLOSED] == 0
    assert "slot 1: row scribbled while the slot is connecting: rewritten" in caplog.text
    assert connecting.state is CONNECTING and empty.state is EMPTY  # a row repair moves no slot


def test_call_sites_are_bounded_and_forgotten_per_process(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(leak_threshold=1.0)
    (a,) = open_slots(pool, 1)
    pool.note_site(4242, 1, "app/a.py:1")
    pool.note_site(4242, 2, "app/a.py:2")
    pool.note_site(7, 1, "other/b.py:9")
    pool.forget_sites(4242)
    assert pool.sites == {(7, 1): "other/b.py:9"}
    caplog.set_level(logging.WARNING, "sharedpool.manager")
    pool.sweep([held(a, acquired_at=0.0, lease_seq=3, site=1)], 2.0, {})
    assert "taken at an unknown place" in caplog.text
    for site in range(100_010):  # a worker inventing sites cannot grow the table without end
        pool.note_site(9, site, "x")
    assert len(pool.sites) == 100_000
    pool.note_site(4242, 1, "app/a.py:1")
    assert (4242, 1) not in pool.sites


def test_every_end_of_a_connection_counts_closed_once_and_its_cause_once(make_pool: MakePool) -> None:
    pool = make_pool(max_connections=4, max_lease_time=10.0, max_lifetime=100.0, idle_timeout=5.0)
    a, b, c, d = open_slots(pool, 4)
    pool.sweep([held(a, acquired_at=0.0, lease_seq=1)], 10.0, {})  # revoked
    pool.given_back(a.index, a.generation, Outcome.BROKEN, 10.5)  # by its holder, honouring the request
    pool.given_back(b.index, b.generation, Outcome.BROKEN, 10.0)  # returned broken
    pool.health_check_failed(c.index, c.generation, 10.0)
    pool.sweep([ready(d, lease_seq=0)], 10.0, {})  # idle since 0: trimmed
    assert pool.counters[stat_keys.CLOSED] == 4
    for cause in ("revoked", "broken"):
        assert pool.counters[stat_keys.reaped_key(cause)] == 1
    assert pool.counters[stat_keys.HEALTH_CHECK_FAILED] == 1 and pool.counters[stat_keys.IDLE_CLOSED] == 1
    assert pool.counters[stat_keys.RECYCLED] == 0 and pool.counters[stat_keys.TABLE_REPAIRS] == 0


# ----- several databases -------------------------------------------------------------


def open_in(pool: Pool, wanted: dict[int, int], now: float = 0.0) -> dict[int, list[Slot]]:
    """Open ``wanted[db]`` connections per database (as its waiters would ask); share them."""
    connect(pool, pool.dispatch(now, idle={}, waiters=wanted), now)
    return {db: sorted((s for s in pool.in_state(SHARED) if s.db == db), key=lambda s: s.index) for db in wanted}


def test_dispatch_opens_for_each_database_round_robin_within_the_global_cap(make_pool: MakePool) -> None:
    pool = make_pool(capacity=8, max_connections=5, databases=(0, 1, 2))
    actions = pool.dispatch(0.0, idle={}, waiters={2: 4, 1: 4})
    # Two databases want 8 together; 5 may be open: neither takes them all.
    assert of(Publish, actions) == [
        Publish(0, 0, MANAGER, db=1), Publish(1, 0, MANAGER, db=2), Publish(2, 0, MANAGER, db=1),
        Publish(3, 0, MANAGER, db=2), Publish(4, 0, MANAGER, db=1),
    ]
    follow = connect(pool, actions, 1.0)
    assert Publish(1, 0, READY, db=2) in follow and Wake(1, 2) in follow
    assert pool.in_db(1) == 3 and pool.in_db(2) == 2 and pool.in_db(0) == 0


def test_the_default_database_is_served_first(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=1, databases=(0, 1), default_db=1)
    assert of(OpenConnection, pool.dispatch(0.0, idle={}, waiters={0: 1, 1: 1})) == [OpenConnection(0, 0)]
    assert pool.slots[0].db == 1


def test_max_per_database_caps_one_database(make_pool: MakePool) -> None:
    pool = make_pool(capacity=8, max_connections=6, max_per_database=2, databases=(0, 1))
    opened = open_in(pool, {1: 5, 0: 1})
    assert len(opened[1]) == 2 and len(opened[0]) == 1
    assert pool.dispatch(1.0, idle={}, waiters={1: 5}) == []  # db 1 is at its cap, room or not


def test_min_idle_applies_to_each_warm_database_only(make_pool: MakePool) -> None:
    pool = make_pool(capacity=8, max_connections=8, min_idle=2, databases=(0, 1, 2, 3), warm_databases=(0, 2))
    actions = pool.dispatch(0.0, idle={0: 1}, waiters={})
    assert [p.db for p in of(Publish, actions)] == [0, 2, 2]  # db 0 has one idle; db 1 and 3 are cold
    assert pool.limits.min_idle_of(1) == 0 and pool.limits.min_idle_of(2) == 2


def test_waiters_and_demand_of_databases_not_served_are_ignored(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=4, databases=(0, 1))
    pool.demand[7] = 3  # the handler refuses such a DEMAND; the core does not trust it either
    assert pool.dispatch(0.0, idle={}, waiters={9: 5}) == []


def test_demand_of_a_database_waits_out_the_backoff(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=4, databases=(0, 1))
    (open_,) = of(OpenConnection, pool.dispatch(0.0, idle={}, waiters={1: 1}))
    pool.connect_failed(open_.slot, open_.generation, "refused", 0.0)
    assert pool.demanded(0.01, 1) == ""
    assert pool.dispatch(0.01, idle={}, waiters={}) == []  # backing off
    assert pool.demand == {1: 1}
    assert [p.db for p in of(Publish, pool.dispatch(pool.next_connect_at, idle={}, waiters={}))] == [1]


def test_an_idle_slot_of_another_database_is_rebound_when_the_cap_is_reached(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=3, min_idle=1, databases=(0, 1, 2))
    zero = open_in(pool, {0: 3})[0]
    zero[0].idle_since, zero[1].idle_since, zero[2].idle_since = 5.0, 2.0, 3.0
    # db 2 waits, nothing can be opened: the sweep offers the idle slots.
    actions = pool.sweep([ready(s) for s in zero], 6.0, waiters={2: 1})
    assert actions == [
        # A new generation for the new database: no fd cached for db 0 serves db 2.
        Publish(1, 1, MANAGER, db=2), ResetConnection(1, 1, backend(1, 0), 2),  # idle the longest
        Release(0, 0), Release(2, 0),
    ]
    assert pool.slots[1].state is MANAGED and pool.slots[1].db == 2
    assert pool.in_db(0) == 2 and pool.in_db(2) == 1 and pool.counters[stat_keys.REBOUND] == 1
    assert not pool.rebind_wanted
    # The RESET redid the handshake with SELECT 2: it is db 2's now.
    assert pool.reset_done(1, 1, True, 6.1) == [Publish(1, 1, READY, db=2), Wake(1, 2)]
    assert "db 2" in repr(pool.slots[1])


def test_a_cluster_node_takes_an_idle_slot_of_another_by_reconnecting(make_pool: MakePool) -> None:
    # Cluster mode: a database is a node, another host: the slot is closed and opened towards it.
    pool = make_pool(capacity=4, max_connections=2, min_idle=0, databases=(0, 1), rebind_reconnects=True)
    zero = open_in(pool, {0: 2})[0]
    zero[0].idle_since, zero[1].idle_since = 5.0, 2.0
    actions = pool.sweep([ready(s) for s in zero], 6.0, waiters={1: 1})
    assert actions == [
        CloseConnection(backend(1, 0), "moved to node 1"), Publish(1, 1, CLOSED, db=0),
        Publish(1, 1, MANAGER, db=1), OpenConnection(1, 1), Release(0, 0),
    ]
    assert pool.slots[1].state is CONNECTING and pool.slots[1].db == 1
    assert pool.in_db(0) == 1 and pool.in_db(1) == 1 and pool.counters[stat_keys.REBOUND] == 1
    assert connect(pool, actions, 6.1) == [Publish(1, 1, READY, db=1), Wake(1, 1)]


def test_waiters_beat_idle_floors_but_spare_databases_with_waiters(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=3, min_idle=1, databases=(0, 1, 2), warm_databases=(0, 1))
    connect(pool, pool.dispatch(0.0, idle={0: 1, 1: 1}, waiters={0: 1, 1: 2}))  # min_idle counted as met
    slots = {db: [s for s in pool.in_state(SHARED) if s.db == db] for db in (0, 1)}
    assert len(slots[0]) == 1 and len(slots[1]) == 2
    rows = [ready(s) for s in slots[0] + slots[1]]
    # db 1's are taken by its own waiters; db 0's only idle one is its min_idle, and
    # db 2's waiter beats that floor: a floor is for later, a waiter's time runs out.
    actions = pool.sweep(rows, 1.0, waiters={2: 1, 1: 1})
    assert [(a.slot, a.db) for a in of(ResetConnection, actions)] == [(slots[0][0].index, 2)]
    assert not pool.rebind_wanted
    assert pool.in_db(0) == 0 and pool.in_db(2) == 1


def test_a_donor_above_its_floor_is_taken_before_one_at_it(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=3, min_idle=1, databases=(0, 1, 2), warm_databases=(0, 1))
    connect(pool, pool.dispatch(0.0, idle={0: 1, 1: 1}, waiters={0: 1, 1: 2}))
    zero, one = ([s for s in pool.in_state(SHARED) if s.db == db] for db in (0, 1))
    zero[0].idle_since, one[0].idle_since, one[1].idle_since = 1.0, 5.0, 6.0  # db 0's idle the longest
    actions = pool.sweep([ready(s) for s in zero + one], 7.0, waiters={2: 1})
    # db 1 keeps one beyond its floor: that one goes, and db 0 keeps its only one.
    assert [(a.slot, a.db) for a in of(ResetConnection, actions)] == [(one[0].index, 2)]


def test_min_idle_refills_from_a_spare_once_nobody_waits(make_pool: MakePool) -> None:
    pool = make_pool(capacity=3, max_connections=2, min_idle=1, databases=(0, 1), warm_databases=(0,))
    zero = open_in(pool, {0: 2})[0]
    # db 1 waits with the cap reached: it takes both, db 0's floor included.
    actions = pool.sweep([ready(s) for s in zero], 1.0, waiters={1: 2})
    assert [a.db for a in of(ResetConnection, actions)] == [1, 1]
    for slot in zero:
        pool.reset_done(slot.index, slot.generation, True, 1.1)
    assert pool.in_db(0) == 0 and pool.in_db(1) == 2
    # Still waited for: db 0's floor stays lent.
    assert of(ResetConnection, pool.sweep([ready(s) for s in zero], 2.0, waiters={1: 1})) == []
    # The pressure is gone: db 0 (warm) takes back one of db 1's (min_idle 0 there), not both.
    actions = pool.sweep([ready(s) for s in zero], 3.0, waiters={})
    assert [a.db for a in of(ResetConnection, actions)] == [0]
    assert pool.in_db(0) == 1 and pool.in_db(1) == 1
    (slot,) = [s for s in zero if s.db == 0]
    pool.reset_done(slot.index, slot.generation, True, 3.1)
    assert of(ResetConnection, pool.sweep([ready(s) for s in zero], 4.0, waiters={})) == []  # settled: no flapping


def test_no_rebinding_past_the_per_database_cap_nor_while_room_is_left(make_pool: MakePool) -> None:
    pool = make_pool(capacity=6, max_connections=4, max_per_database=1, databases=(0, 1))
    zero = open_in(pool, {0: 1})[0]
    one = open_in(pool, {1: 1})[1]
    # Room is left (2 of 4 open), but db 1 is at its own cap: no rebinding either.
    actions = pool.sweep([ready(zero[0]), ready(one[0], lock_free=False)], 1.0, waiters={1: 3})
    assert actions == [Release(0, 0)] and not pool.rebind_wanted
    capped = make_pool(capacity=4, max_connections=2, max_per_database=1, databases=(0, 1))
    zero = open_in(capped, {0: 1})[0]
    open_in(capped, {1: 1})
    assert capped.sweep([ready(zero[0])], 1.0, waiters={1: 2}) == [Release(0, 0)]
    # Rebinding stops at the cap too: db 1 may take one more, not the three it waits for.
    full = make_pool(capacity=5, max_connections=5, max_per_database=3, databases=(0, 1))
    zero = open_in(full, {0: 3})[0]
    open_in(full, {1: 2})
    actions = full.sweep([ready(s) for s in zero], 1.0, waiters={1: 4})
    assert [a.db for a in of(ResetConnection, actions)] == [1] and full.in_db(1) == 3


def test_a_slot_that_is_being_rebound_counts_for_its_new_database(make_pool: MakePool) -> None:
    pool = make_pool(capacity=4, max_connections=2, databases=(0, 1))
    zero = open_in(pool, {0: 2})[0]
    assert len(of(ResetConnection, pool.sweep([ready(zero[0])], 1.0, waiters={1: 1}))) == 1
    # One waiter, one slot on its way: the next sweep leaves the other alone.
    assert pool.sweep([ready(zero[1])], 1.1, waiters={1: 1}) == [Release(1, 0)]


def test_a_row_naming_another_database_is_scribbled(make_pool: MakePool) -> None:
    pool = make_pool(databases=(0, 1))
    (a,) = open_slots(pool, 1)
    scribbled = RowView(a.index, READY, a.generation, lock_free=True, db=1)
    actions = pool.sweep([scribbled], 1.0, waiters={})
    assert actions[:2] == [CloseConnection(backend(0, 0), "row scribbled"), Publish(0, 1, CLOSED)]
    assert pool.counters[stat_keys.TABLE_REPAIRS] == 1


def test_connections_of_databases_no_longer_served_are_closed(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(capacity=6, max_connections=6, databases=tuple(range(16)))
    slots = open_in(pool, {3: 1, 12: 1})
    pending = of(OpenConnection, pool.dispatch(0.0, idle={}, waiters={14: 1}))
    pool.given_back(slots[3][0].index, 0, Outcome.NEEDS_RESET, 1.0)
    with caplog.at_level(logging.WARNING, "sharedpool.manager"):
        pool.limit_databases(12)  # CONFIG GET databases said 12
    assert "has 12 databases" in caplog.text and "not serving db 12-15" in caplog.text
    assert pool.limits.databases == tuple(range(12))
    # Idle: closed at the sweep; connecting: closed when it connects; in repair: after it.
    assert of(CloseConnection, pool.sweep([ready(slots[12][0])], 2.0, waiters={})) == [
        CloseConnection(backend(slots[12][0].index, 0), "retired")
    ]
    assert of(CloseConnection, connect(pool, pending, 2.0)) == [CloseConnection(backend(pending[0].slot, 0), "retired")]
    # A reload keeps the limit Redis set.
    pool.apply_limits(Limits(max_connections=6, databases=tuple(range(16))))
    assert pool.limits.databases == tuple(range(12))


def test_limit_databases_keeps_the_default_database(make_pool: MakePool) -> None:
    pool = make_pool(databases=(0, 5, 20), default_db=20, warm_databases=(5, 20))
    pool.limit_databases(16)
    assert pool.limits.databases == (0, 5, 20) and pool.limits.warm_databases == (5, 20)
    pool.limit_databases(4)
    assert pool.limits.databases == (0, 20) and pool.limits.warm_databases == (20,)


def test_a_subscriber_is_neither_warned_about_nor_revoked(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(leak_threshold=1.0, max_lease_time=2.0)
    (a,) = open_slots(pool, 1)
    with caplog.at_level(logging.WARNING, "sharedpool.manager"):
        assert pool.sweep([held(a, acquired_at=0.0, subscriber=True)], 1000.0, waiters={}) == []
    assert pool.counters[stat_keys.LEAK_WARNINGS] == 0 and "leak" not in caplog.text and a.state is SHARED
    # The same lease, once it is no longer subscribed, is an ordinary lease again.
    assert of(RequestRevoke, pool.sweep([held(a, acquired_at=0.0)], 1000.0, waiters={}))


def test_limits_from_config_name_the_databases() -> None:
    config = ManagerConfig(redis_url="redis://h:1/2", databases=(1, 2, 3), max_connections_per_database=2)
    limits = Limits.from_config(config, "h:1")
    assert (limits.databases, limits.default_db, limits.warm_databases, limits.max_per_database) == ((1, 2, 3), 2, (1, 2, 3), 2)
    implicit = Limits.from_config(ManagerConfig(redis_url="redis://h:1/2"), "h:1")
    assert implicit.databases == tuple(range(16)) and implicit.warm_databases == (2,)
