"""The manager's pool: a pure state machine, no sockets, no clocks of its own.

Every entry point takes ``now`` and returns the I/O still to do as a list
of actions; the loop in ``server.py`` performs them. Slots move between
states only through ``_move``, which refuses impossible transitions, and
each state has one collection, so counts are ``len()`` of a collection.

A *slot* is a numbered place for one Redis connection. Replacing a slot's
connection bumps its *generation*, so a worker's cached fd of an older
generation is never mistaken for the current one.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sharedpool import stats as keys
from sharedpool.protocol import ErrorCode, Outcome

log = logging.getLogger("sharedpool.manager")


class SlotState(enum.Enum):
    EMPTY = "empty"
    CONNECTING = "connecting"
    IDLE = "idle"
    LEASED = "leased"
    RESETTING = "resetting"

    # Members are singletons: identity hashing is exact, and much cheaper
    # than Enum's hash of the name on every state move.
    __hash__ = object.__hash__


_ALLOWED_MOVES: dict[SlotState, frozenset[SlotState]] = {
    SlotState.EMPTY: frozenset({SlotState.CONNECTING}),
    SlotState.CONNECTING: frozenset({SlotState.IDLE, SlotState.EMPTY}),
    SlotState.IDLE: frozenset({SlotState.LEASED, SlotState.EMPTY, SlotState.RESETTING}),
    SlotState.LEASED: frozenset({SlotState.IDLE, SlotState.RESETTING, SlotState.EMPTY}),
    SlotState.RESETTING: frozenset({SlotState.IDLE, SlotState.EMPTY}),
}


class ReapCause(enum.Enum):
    """Why a leased connection was taken back and replaced."""

    HOLDER_CLOSED = "holder_closed"  # control connection EOF while holding
    HOLDER_DEAD = "holder_dead"  # psutil sweep or server integration
    BROKEN = "broken"  # the holder said so
    REVOKED = "revoked"  # max_lease_time
    UNDELIVERED = "undelivered"  # the grant could not be sent


@dataclass(eq=False)
class Process:
    """A worker process, known by pid, with the fds it holds copies of."""

    pid: int
    create_time: float = 0.0
    fds: dict[int, int] = field(default_factory=dict)  # slot -> generation
    holders: int = 0
    leases_total: int = 0
    leases_held: int = 0
    # The process's notification channel: where RECALLs of its sticky leases go.
    notify: Holder | None = None
    last_seen: float = 0.0


@dataclass(eq=False)
class Holder:
    """One control connection: it may wait for one lease and hold several."""

    id: int
    process: Process
    leases: dict[int, Lease] = field(default_factory=dict)
    waiter: Waiter | None = None
    name: str = ""

    def __repr__(self) -> str:
        return f"<Holder #{self.id} pid={self.process.pid} leases={len(self.leases)}>"


@dataclass(eq=False)
class Lease:
    id: int
    slot: Slot
    holder: Holder
    granted_at: float
    where: str = ""
    leak_warned: bool = False
    # The wait this lease ended, kept so a grant found dead can resume it.
    enqueued_at: float = 0.0
    deadline: float = float("inf")
    timeout: float = 0.0
    # Sticky: the worker may keep it parked between uses until recalled.
    sticky: bool = False
    recalled_at: float = 0.0

    def accountable_since(self) -> float:
        """Leak and revoke clocks: a sticky lease is only late once recalled."""
        if self.sticky:
            return self.recalled_at or float("inf")
        return self.granted_at


@dataclass(eq=False)
class Waiter:
    holder: Holder
    enqueued_at: float
    deadline: float
    timeout: float
    where: str = ""
    active: bool = True


@dataclass(eq=False)
class Slot:
    index: int
    state: SlotState = SlotState.EMPTY
    generation: int = 0
    backend: Any = None
    lease: Lease | None = None
    opened_at: float = 0.0
    idle_since: float = 0.0
    expires_at: float = float("inf")
    # Replace instead of reusing when the current lease ends (reconnect, reload).
    retire: bool = False

    def __repr__(self) -> str:
        return f"<Slot {self.index} gen {self.generation} {self.state.value}>"


# Actions: what the loop must do after a decision.
@dataclass(frozen=True, slots=True)
class SendGrant:
    lease: Lease
    with_fd: bool
    # A re-send (FETCH_FD) of a lease the worker already has: if it cannot
    # be delivered, the lease is live and must be reaped, not undone.
    redelivery: bool = False


@dataclass(frozen=True, slots=True)
class SendError:
    holder: Holder
    code: ErrorCode
    message: str
    lease_id: int = 0


@dataclass(frozen=True, slots=True)
class SendRecall:
    """Ask a process to give back a sticky lease (now if parked, else after its use)."""

    notify: Holder
    lease_id: int


@dataclass(frozen=True, slots=True)
class OpenConnection:
    slot: int
    generation: int


@dataclass(frozen=True, slots=True)
class ResetConnection:
    slot: int
    generation: int
    backend: Any


@dataclass(frozen=True, slots=True)
class CloseConnection:
    backend: Any
    reason: str


@dataclass(frozen=True, slots=True)
class NotifyRevoked:
    """Tell a holder, unprompted, that its lease was taken back and why."""

    holder: Holder
    lease_id: int
    message: str


Action = SendGrant | SendError | OpenConnection | ResetConnection | CloseConnection | NotifyRevoked | SendRecall

_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 5.0


@dataclass
class Limits:
    """The subset of the config the state machine needs; replaced live on reload."""

    max_connections: int = 10
    min_idle: int = 1
    acquire_timeout: float = 5.0
    max_waiting: int = 256
    redis_label: str = "redis"
    pool_name: str = "default"
    max_leases_per_worker: int = 0
    max_lifetime: float = 0.0
    idle_timeout: float = 0.0
    leak_threshold: float = 0.0
    max_lease_time: float = 0.0
    sticky: bool = True
    sticky_max_age: float = 5.0


class Pool:
    def __init__(self, limits: Limits, rng: Callable[[], float] = random.random) -> None:
        self.limits = limits
        self._rng = rng
        self.slots = [Slot(i) for i in range(limits.max_connections)]
        self._by_state: dict[SlotState, dict[int, Slot]] = {s: {} for s in SlotState}
        for slot in self.slots:
            self._by_state[SlotState.EMPTY][slot.index] = slot
        # IDLE order matters (most recently used last), so it also lives in a list.
        self._idle: list[Slot] = []
        self._waiters: deque[Waiter] = deque()
        self._deadlines: list[tuple[float, int, Waiter]] = []
        self._seq = itertools.count()
        self._lease_ids = itertools.count(1)
        self.leases: dict[int, Lease] = {}
        self.processes: dict[int, Process] = {}
        self.shutting_down = False
        self.paused = False
        self.redis_down_since: float | None = None
        self.last_connect_error = ""
        self._connect_failures = 0
        self.next_connect_at = 0.0
        self.counters: dict[str, int] = {name: 0 for name in keys.COUNTERS}
        # Recent samples for p50/p95/p99; bounded so a busy pool costs constant memory.
        self.wait_times: deque[float] = deque(maxlen=4096)
        self._recalls_outstanding = 0
        self.hold_times: deque[float] = deque(maxlen=4096)

    # ----- bookkeeping -------------------------------------------------

    def _move(self, slot: Slot, new: SlotState) -> None:
        old = slot.state
        if new not in _ALLOWED_MOVES[old]:
            raise AssertionError(f"slot {slot.index}: impossible move {old.value} -> {new.value}")
        del self._by_state[old][slot.index]
        self._by_state[new][slot.index] = slot
        if old is SlotState.IDLE:
            self._idle.remove(slot)
        if new is SlotState.IDLE:
            self._idle.append(slot)
        slot.state = new

    def count(self, state: SlotState) -> int:
        return len(self._by_state[state])

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def open_connections(self) -> int:
        return (
            self.count(SlotState.IDLE) + self.count(SlotState.LEASED) + self.count(SlotState.RESETTING)
        )

    def __repr__(self) -> str:
        return (
            f"<Pool {self.limits.pool_name!r} [conns: {self.open_connections} open, "
            f"{self.count(SlotState.IDLE)} idle, {self.count(SlotState.CONNECTING)} connecting | "
            f"leases: {len(self.leases)} held, {self.waiting} waiting]>"
        )

    def describe_pressure(self) -> str:
        return (
            f"{len(self.leases)} of {self.limits.max_connections} connections leased, "
            f"{self.waiting} waiting"
        )

    # ----- holders -------------------------------------------------------

    def add_holder(self, holder_id: int, pid: int, now: float, create_time: float = 0.0) -> Holder:
        process = self.processes.get(pid)
        if process is None or (create_time and process.create_time and process.create_time != create_time):
            process = Process(pid, create_time)
            self.processes[pid] = process
        process.holders += 1
        process.last_seen = now
        return Holder(holder_id, process)

    def set_notify(self, holder: Holder) -> None:
        """This holder is its process's notification channel (it never takes leases)."""
        holder.process.notify = holder

    def holder_gone(self, holder: Holder, now: float, cause: ReapCause = ReapCause.HOLDER_CLOSED) -> list[Action]:
        """The holder's control connection closed: cancel its wait, reap its leases."""
        actions: list[Action] = []
        self._cancel_wait(holder)
        for lease in list(holder.leases.values()):
            actions += self._reap(lease, cause, now)
        process = holder.process
        if process.notify is holder:
            process.notify = None
            # Nothing can recall them now: their clocks run from the grant.
            for lease in self.leases.values():
                if lease.holder.process is process:
                    lease.sticky = False
        process.holders -= 1
        if process.holders <= 0 and self.processes.get(process.pid) is process:
            del self.processes[process.pid]
        actions += self._dispatch(now)
        return actions

    def _reap(self, lease: Lease, cause: ReapCause, now: float) -> list[Action]:
        self._end_lease(lease)
        self.counters[keys.reaped_key(cause.value)] += 1
        log.warning(
            "reaped lease %d of pid %d on slot %d after %.2f s (%s): connection replaced",
            lease.id, lease.holder.process.pid, lease.slot.index, now - lease.granted_at, cause.value,
        )
        return self._discard(lease.slot, f"reaped: {cause.value}", now)

    def _cancel_wait(self, holder: Holder) -> None:
        waiter = holder.waiter
        if waiter is not None:
            waiter.active = False
            holder.waiter = None
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    # ----- acquire / release ----------------------------------------------

    def acquire(self, holder: Holder, timeout: float | None, now: float, where: str = "") -> list[Action]:
        holder.process.last_seen = now
        if self.shutting_down:
            self.counters[keys.REFUSED_SHUTDOWN] += 1
            return [SendError(holder, ErrorCode.SHUTTING_DOWN, f"pool {self.limits.pool_name!r} is shutting down")]
        if holder.waiter is not None:
            return [SendError(holder, ErrorCode.BUSY, "an ACQUIRE is already outstanding on this connection")]
        if self.redis_down_since is not None and self.open_connections == 0:
            self.counters[keys.REFUSED_UNAVAILABLE] += 1
            # Fail fast, and let the demand trigger the next probe (after backoff).
            return [SendError(holder, ErrorCode.REDIS_UNAVAILABLE, self._outage_message(now))] + self._dispatch(now)
        limit = self.limits.max_leases_per_worker
        if limit and holder.process.leases_held >= limit:
            self.counters[keys.REFUSED_WORKER_LIMIT] += 1
            return [
                SendError(
                    holder, ErrorCode.WORKER_LIMIT,
                    f"pid {holder.process.pid} already holds {limit} leases of pool "
                    f"{self.limits.pool_name!r} (max_leases_per_worker={limit})",
                )
            ]
        wait = self.limits.acquire_timeout if timeout is None else timeout
        if self._idle and not self._waiters and not self.paused:
            grant = self._grant(holder, self._pick_idle(holder.process), now, where, now)
            grant.lease.deadline, grant.lease.timeout = now + wait, wait
            return [grant]
        if len(self._waiters) >= self.limits.max_waiting:
            self.counters[keys.REFUSED_FULL] += 1
            return [
                SendError(
                    holder, ErrorCode.POOL_FULL,
                    f"pool {self.limits.pool_name!r} refused to queue another waiter "
                    f"(max_waiting={self.limits.max_waiting}; {self.describe_pressure()})",
                )
            ]
        waiter = Waiter(holder, now, now + wait, wait, where)
        holder.waiter = waiter
        self._waiters.append(waiter)
        heapq.heappush(self._deadlines, (waiter.deadline, next(self._seq), waiter))
        return self._dispatch(now)

    def _outage_message(self, now: float) -> str:
        since = self.redis_down_since or now
        return (
            f"Redis at {self.limits.redis_label} unreachable for {now - since:.1f} s "
            f"(last error: {self.last_connect_error}); pool {self.limits.pool_name!r} has no open connection"
        )

    def _pick_idle(self, process: Process) -> Slot:
        # Prefer a connection this process already holds an fd for: no fd
        # passing, and the worker reuses the connection object it built.
        known = process.fds
        for position in range(len(self._idle) - 1, -1, -1):
            slot = self._idle[position]
            if known.get(slot.index) == slot.generation:
                return slot
        return self._idle[-1]

    def _grant(self, holder: Holder, slot: Slot, now: float, where: str, enqueued_at: float) -> SendGrant:
        self._move(slot, SlotState.LEASED)
        lease = Lease(next(self._lease_ids), slot, holder, now, where, enqueued_at=enqueued_at)
        # Sticky only while the pool has room to spare: under contention a
        # parked lease would just be recalled, at a higher cost than a release.
        lease.sticky = (
            self.limits.sticky and holder.process.notify is not None and not self._waiters
            and (
                bool(self._idle) or bool(self._by_state[SlotState.CONNECTING])
                or any(s.index < self.limits.max_connections for s in self._by_state[SlotState.EMPTY].values())
            )
        )
        slot.lease = lease
        holder.leases[lease.id] = lease
        self.leases[lease.id] = lease
        process = holder.process
        process.leases_total += 1
        process.leases_held += 1
        with_fd = process.fds.get(slot.index) != slot.generation
        if with_fd:
            process.fds[slot.index] = slot.generation
        self.counters[keys.GRANTED] += 1
        self.wait_times.append(now - enqueued_at)
        return SendGrant(lease, with_fd)

    def release(self, holder: Holder, lease_id: int, outcome: Outcome, now: float) -> list[Action]:
        holder.process.last_seen = now
        lease = holder.leases.get(lease_id)
        if lease is None:
            self.counters[keys.RELEASE_REFUSED] += 1
            other = self.leases.get(lease_id)
            if other is not None:
                why = f"lease {lease_id} is held by pid {other.holder.process.pid}, not by this connection"
            else:
                why = f"lease {lease_id} is unknown or already released"
            log.warning("refused RELEASE from pid %d: %s", holder.process.pid, why)
            return [SendError(holder, ErrorCode.RELEASE_REFUSED, why, lease_id)]
        self._end_lease(lease)
        self.counters[keys.RELEASED] += 1
        self.hold_times.append(now - lease.granted_at)
        slot = lease.slot
        if outcome is Outcome.BROKEN:
            self.counters[keys.reaped_key(ReapCause.BROKEN.value)] += 1
            return self._discard(slot, "returned broken", now) + self._dispatch(now)
        if self.shutting_down:
            return self._discard(slot, "shutting down", now)
        if slot.retire or now >= slot.expires_at:
            # Recycled only now that nobody holds it (max_lifetime, reconnect).
            self.counters[keys.RECYCLED] += 1
            return self._discard(slot, "retired", now) + self._dispatch(now)
        if outcome is Outcome.NEEDS_RESET:
            self.counters[keys.RESETS] += 1
            self._move(slot, SlotState.RESETTING)
            return [ResetConnection(slot.index, slot.generation, slot.backend)] + self._dispatch(now)
        return self._make_idle(slot, now)

    def lease_for_fetch(self, holder: Holder, lease_id: int) -> Lease | None:
        lease = holder.leases.get(lease_id)
        if lease is not None:
            holder.process.fds[lease.slot.index] = lease.slot.generation
        return lease

    def _end_lease(self, lease: Lease) -> None:
        if lease.recalled_at:
            self._recalls_outstanding -= 1
        lease.holder.process.leases_held -= 1
        del lease.holder.leases[lease.id]
        del self.leases[lease.id]
        lease.slot.lease = None

    def _make_idle(self, slot: Slot, now: float) -> list[Action]:
        if slot.index >= self.limits.max_connections or slot.retire:
            return self._discard(slot, "retired", now) + self._dispatch(now)
        if slot.state is not SlotState.IDLE:
            self._move(slot, SlotState.IDLE)
        slot.idle_since = now
        return self._dispatch(now)

    def undeliverable(self, lease: Lease, now: float) -> list[Action]:
        """The GRANT could not be sent: nothing reached the worker, the connection is clean."""
        if lease.id not in self.leases:
            return []
        self._end_lease(lease)
        lease.holder.process.fds.pop(lease.slot.index, None)
        self.counters[keys.GRANTED] -= 1
        return self._make_idle(lease.slot, now)

    def stale_at_grant(self, lease: Lease, now: float) -> list[Action]:
        """The loop found the granted connection dead (EOF or stray data) before sending.

        The worker is put back at the head of the queue, so it loses no place.
        """
        holder = lease.holder
        self._end_lease(lease)
        self.counters[keys.GRANTED] -= 1
        self.counters[keys.STALE_AT_GRANT] += 1
        actions = self._discard(lease.slot, "dead when granted", now)
        # Its original deadline: a Redis that keeps dropping connections must
        # not hold a worker for ever. And a pause before the next open.
        self._connect_failures += 1
        self.next_connect_at = now + min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(self._connect_failures, 20))
        deadline = lease.deadline if lease.deadline != float("inf") else now + self.limits.acquire_timeout
        waiter = Waiter(holder, lease.enqueued_at or now, deadline, lease.timeout or self.limits.acquire_timeout, lease.where)
        holder.waiter = waiter
        self._waiters.appendleft(waiter)
        heapq.heappush(self._deadlines, (waiter.deadline, next(self._seq), waiter))
        return actions + self._dispatch(now)

    # ----- connections -----------------------------------------------------

    def _discard(self, slot: Slot, reason: str, now: float) -> list[Action]:
        backend = slot.backend
        slot.backend = None
        slot.generation += 1
        slot.retire = False
        slot.expires_at = float("inf")
        self._move(slot, SlotState.EMPTY)
        self.counters[keys.CLOSED] += 1
        return [CloseConnection(backend, reason)] if backend is not None else []

    def connected(self, index: int, generation: int, backend: Any, now: float) -> list[Action]:
        slot = self.slots[index] if index < len(self.slots) else None
        if slot is None or slot.state is not SlotState.CONNECTING or slot.generation != generation:
            return [CloseConnection(backend, "no longer wanted")]
        slot.backend = backend
        slot.opened_at = now
        if self.limits.max_lifetime:
            # Up to 10% earlier, so connections opened together do not all expire together.
            slot.expires_at = now + self.limits.max_lifetime * (1 - 0.1 * self._rng())
        self.counters[keys.OPENED] += 1
        if self.redis_down_since is not None:
            log.info("Redis at %s reachable again after %.1f s", self.limits.redis_label, now - self.redis_down_since)
        self.redis_down_since = None
        self._connect_failures = 0
        self.next_connect_at = 0.0
        if self.shutting_down:
            self._move(slot, SlotState.IDLE)
            return self._discard(slot, "shutting down", now)
        return self._make_idle(slot, now)

    def connect_failed(self, index: int, generation: int, error: str, now: float) -> list[Action]:
        slot = self.slots[index] if index < len(self.slots) else None
        if slot is None or slot.state is not SlotState.CONNECTING or slot.generation != generation:
            return []
        slot.generation += 1
        self._move(slot, SlotState.EMPTY)
        self.counters[keys.REDIS_ERRORS] += 1
        self.last_connect_error = error
        self._connect_failures += 1
        delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(self._connect_failures, 20))
        self.next_connect_at = now + delay * (0.5 + self._rng() / 2)
        actions: list[Action] = []
        if self.open_connections == 0 and self.count(SlotState.CONNECTING) == 0:
            if self.redis_down_since is None:
                self.redis_down_since = now
                log.warning("Redis at %s unreachable: %s", self.limits.redis_label, error)
            # Fail fast: nobody holds a connection that could come back.
            message = self._outage_message(now)
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.active = False
                waiter.holder.waiter = None
                self.counters[keys.REFUSED_UNAVAILABLE] += 1
                actions.append(SendError(waiter.holder, ErrorCode.REDIS_UNAVAILABLE, message))
        return actions

    def reset_done(self, index: int, generation: int, ok: bool, now: float, error: str = "") -> list[Action]:
        slot = self.slots[index]
        if slot.state is not SlotState.RESETTING or slot.generation != generation:
            return []
        if not ok:
            log.warning("reset of slot %d failed (%s): connection replaced", index, error)
            return self._discard(slot, "reset failed", now) + self._dispatch(now)
        if self.shutting_down:
            return self._discard(slot, "shutting down", now)
        if slot.retire or now >= slot.expires_at or index >= self.limits.max_connections:
            return self._discard(slot, "retired", now) + self._dispatch(now)
        return self._make_idle(slot, now)

    def discard_idle(self, index: int, reason: str, now: float) -> list[Action]:
        slot = self.slots[index]
        if slot.state is not SlotState.IDLE:
            return []
        return self._discard(slot, reason, now) + self._dispatch(now)

    # ----- the scheduler ---------------------------------------------------

    def _dispatch(self, now: float) -> list[Action]:
        """Hand idle connections to waiters in order, and open what demand needs."""
        actions: list[Action] = []
        while self._idle and self._waiters and not self.paused:
            waiter = self._waiters.popleft()
            if not waiter.active:
                continue
            waiter.active = False
            waiter.holder.waiter = None
            grant = self._grant(waiter.holder, self._pick_idle(waiter.holder.process), now, waiter.where, waiter.enqueued_at)
            grant.lease.deadline, grant.lease.timeout = waiter.deadline, waiter.timeout
            actions.append(grant)
        empty = self._by_state[SlotState.EMPTY]
        if self._waiters and not self.paused and not any(s.index < self.limits.max_connections for s in empty.values()):
            actions += self._recall(len(self._waiters) - self._recalls_outstanding - self.count(SlotState.CONNECTING), now)
        if not empty or self.shutting_down or now < self.next_connect_at:
            return actions  # the steady state: every slot has a connection
        connecting = self.count(SlotState.CONNECTING)
        wanted = len(self._waiters) + max(0, self.limits.min_idle - len(self._idle)) - connecting
        if self.redis_down_since is not None:
            wanted = 1 - connecting  # while Redis is down, probe with one connection at a time
        openable = [slot for slot in empty.values() if slot.index < self.limits.max_connections]
        for slot in openable[: max(0, wanted)]:
            self._move(slot, SlotState.CONNECTING)
            actions.append(OpenConnection(slot.index, slot.generation))
        return actions

    def _recall(self, wanted: int, now: float) -> list[Action]:
        """Recall up to ``wanted`` sticky leases, the longest held first."""
        if wanted <= 0:
            return []
        candidates = [
            lease for lease in self.leases.values()
            if lease.sticky and not lease.recalled_at and lease.holder.process.notify is not None
        ]
        candidates.sort(key=lambda lease: lease.granted_at)
        actions: list[Action] = []
        for lease in candidates[:wanted]:
            actions += self._recall_one(lease, now)
        return actions

    def _recall_one(self, lease: Lease, now: float) -> list[Action]:
        notify = lease.holder.process.notify
        if notify is None or lease.recalled_at:
            return []
        lease.recalled_at = now
        self._recalls_outstanding += 1
        self.counters[keys.RECALLS] += 1
        return [SendRecall(notify, lease.id)]

    def expire(self, now: float) -> list[Action]:
        """Time out waiters whose deadline passed; retry connects after backoff."""
        actions: list[Action] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, waiter = heapq.heappop(self._deadlines)
            if not waiter.active:
                continue
            waiter.active = False
            waiter.holder.waiter = None
            self._waiters.remove(waiter)
            self.counters[keys.TIMEOUTS] += 1
            actions.append(
                SendError(
                    waiter.holder, ErrorCode.TIMEOUT,
                    f"no lease from pool {self.limits.pool_name!r} within {waiter.timeout:.2f} s "
                    f"({self.describe_pressure()})",
                )
            )
        if self.next_connect_at and now >= self.next_connect_at:
            actions += self._dispatch(now)
        return actions

    def next_deadline(self) -> float:
        candidates = [float("inf")]
        while self._deadlines and not self._deadlines[0][2].active:
            heapq.heappop(self._deadlines)
        if self._deadlines:
            candidates.append(self._deadlines[0][0])
        if self.next_connect_at and (
            self._waiters or len(self._idle) < self.limits.min_idle or self.redis_down_since is not None
        ):
            candidates.append(self.next_connect_at)
        return min(candidates)

    # ----- maintenance, admin, reload --------------------------------------

    def maintain(self, now: float) -> list[Action]:
        """Periodic duties: leak warnings, revocations, lifetime and idle trimming."""
        actions: list[Action] = []
        limits = self.limits
        stale_sticky = [
            lease for lease in self.leases.values()
            if lease.sticky and not lease.recalled_at
            and (now - lease.granted_at >= limits.sticky_max_age or now >= lease.slot.expires_at)
        ]
        for lease in stale_sticky:
            # Parked leases come home now and then, so that leak warnings,
            # max_lease_time and max_lifetime keep their meaning.
            actions += self._recall_one(lease, now)
        for lease in list(self.leases.values()):
            age = now - lease.accountable_since()
            if limits.max_lease_time and age >= limits.max_lease_time:
                actions += self.revoke(lease, f"max_lease_time={limits.max_lease_time:g} s", now)
            elif limits.leak_threshold and age >= limits.leak_threshold and not lease.leak_warned:
                lease.leak_warned = True
                self.counters[keys.LEAK_WARNINGS] += 1
                log.warning(
                    "possible leak: pid %d has held lease %d (slot %d) for %.1f s (leak_threshold %g s); taken at %s",
                    lease.holder.process.pid, lease.id, lease.slot.index, age, limits.leak_threshold,
                    lease.where or "an unknown place",
                )
        for slot in list(self._idle):
            if now >= slot.expires_at:
                self.counters[keys.RECYCLED] += 1
                actions += self._discard(slot, "max_lifetime reached", now)
            elif slot.index >= limits.max_connections:
                actions += self._discard(slot, "max_connections lowered", now)
        if limits.idle_timeout:
            for slot in list(self._idle):
                if len(self._idle) <= limits.min_idle:
                    break
                if now - slot.idle_since >= limits.idle_timeout:
                    self.counters[keys.IDLE_CLOSED] += 1
                    actions += self._discard(slot, "idle_timeout", now)
        return actions + self._dispatch(now)

    def revoke(self, lease: Lease, why: str, now: float) -> list[Action]:
        """Take a lease back by force; its connection is shut down (the holder's next command fails)."""
        self._end_lease(lease)
        self.counters[keys.reaped_key(ReapCause.REVOKED.value)] += 1
        message = (
            f"lease {lease.id} of pool {self.limits.pool_name!r} was revoked after "
            f"{now - lease.granted_at:.1f} s ({why}); its connection was closed"
        )
        log.warning("revoked lease %d of pid %d (slot %d): %s", lease.id, lease.holder.process.pid, lease.slot.index, why)
        return [NotifyRevoked(lease.holder, lease.id, message)] + self._discard(lease.slot, f"revoked: {why}", now)

    def pause(self) -> None:
        self.paused = True

    def resume(self, now: float) -> list[Action]:
        self.paused = False
        return self._dispatch(now)

    def retire_all(self, now: float) -> list[Action]:
        """Replace every connection: idle ones now, leased ones when they come back."""
        actions: list[Action] = self._recall(len(self.leases), now)
        for slot in self.slots:
            if slot.state in (SlotState.LEASED, SlotState.RESETTING, SlotState.CONNECTING):
                slot.retire = True
        for slot in list(self._idle):
            actions += self._discard(slot, "reconnect", now)
        return actions + self._dispatch(now)

    def apply_limits(self, limits: Limits, now: float) -> list[Action]:
        """Reload: new limits take effect at once; extra slots drain as they come back."""
        self.limits = limits
        while len(self.slots) < limits.max_connections:
            slot = Slot(len(self.slots))
            self.slots.append(slot)
            self._by_state[SlotState.EMPTY][slot.index] = slot
        actions: list[Action] = []
        for slot in self.slots[limits.max_connections:]:
            if slot.state is SlotState.IDLE:
                actions += self._discard(slot, "max_connections lowered", now)
            elif slot.state is not SlotState.EMPTY:
                slot.retire = True
        return actions + self._dispatch(now)

    # ----- shutdown --------------------------------------------------------

    def begin_shutdown(self, now: float) -> list[Action]:
        self.shutting_down = True
        actions: list[Action] = self._recall(len(self.leases), now)  # parked leases come home now
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.active = False
            waiter.holder.waiter = None
            actions.append(SendError(waiter.holder, ErrorCode.SHUTTING_DOWN, f"pool {self.limits.pool_name!r} is shutting down"))
        for slot in list(self._idle) + list(self._by_state[SlotState.RESETTING].values()):
            actions += self._discard(slot, "shutting down", now)
        return actions

    def close_all(self, now: float) -> list[Action]:
        """End of grace: take back every lease and close every connection."""
        actions: list[Action] = []
        for lease in list(self.leases.values()):
            self._end_lease(lease)
            actions += self._discard(lease.slot, "shutdown grace over", now)
        for slot in list(self._idle) + list(self._by_state[SlotState.RESETTING].values()):
            actions += self._discard(slot, "shutting down", now)
        return actions
