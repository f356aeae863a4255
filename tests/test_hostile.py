"""Issue 7: no input can crash or stall the manager (protocol version 2).

Every test starts its own real manager and throws at it, over raw
``AF_UNIX``/``SOCK_SEQPACKET`` connections, what a broken or hostile peer
could send. After each act the manager must still run, still serve a
well-behaved ``sharedpool.Redis`` client with right answers, and end up
with no lease held and no fd more than before (``/proc/<pid>/fd``, waited
for with a deadline: the manager closes connections asynchronously).

Every test runs its manager with ``min_idle == max_connections``, so each
slot is always open (a reaped connection is replaced) and the number of
Redis fds at rest is fixed: the fd baseline is then exact.

With the lease table a lease belongs to the slot lock its holder took,
not to the control connection: a peer closed for a malformed frame keeps
a lease it holds (and can give it back without a frame), and a lease is
reaped only when its holder lets go of the lock without giving it back.

The tests at the end are regressions for manager bugs they found: deeply
nested JSON, a STATS reply larger than a frame, fd exhaustion (crash and
accept busy-loop), and a holder dropped for not reading its fds.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import hostile_peers as hp
import multiprocess
import psutil
import pytest
import redis
from hostile_peers import Closed, RawPeer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.mix import checked_round_trip
from support.redis_view import manager_clients
from support.waiting import wait_for

import sharedpool
from sharedpool import admin as one_shot
from sharedpool import errors, protocol
from sharedpool.client.channel import ControlChannel
from sharedpool.dev.launch import ManagerProcess
from sharedpool.protocol import ErrorCode, FrameType, Outcome, ProtocolError, ReportCause

ctx = multiprocess.get_context("fork")

PONG = b"+PONG\r\n"
SOME_UNKNOWN_TYPE = hp.UNKNOWN_TYPES[-1]
REDIS_SLOTS = 2
TESTS = os.path.dirname(os.path.abspath(__file__))

Start = Callable[..., "tuple[ManagerProcess, redis.Redis, int]"]


# ----- helpers ----------------------------------------------------------------------


def _log_tail(manager: ManagerProcess, lines: int = 40) -> str:
    try:
        with open(manager.log_path or "", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(manager: ManagerProcess) -> None:
    assert manager.process is not None
    code = manager.process.poll()
    assert code is None, f"manager exited with {code}; its log ends with:\n{_log_tail(manager)}"


def _roundtrip(manager: ManagerProcess, good: redis.Redis) -> None:
    """The manager is alive and a well-behaved client still gets right answers."""
    _alive(manager)
    key, value = f"hostile:{uuid.uuid4().hex}", uuid.uuid4().hex
    try:
        assert good.set(key, value) is True
        assert good.get(key) == value
        assert good.delete(key) == 1
    except Exception:
        # A manager that is dying closes its sockets first: say so, with its log.
        assert manager.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            manager.process.wait(timeout=5)
        _alive(manager)
        raise


@pytest.fixture
def hostile(start_manager: Any) -> Iterator[Start]:
    """Start a manager; return it, a good client that has used it once, and the
    manager's fd count at rest. The good clients are closed at teardown."""
    goods: list[redis.Redis] = []

    def start(**settings: Any) -> tuple[ManagerProcess, redis.Redis, int]:
        settings.setdefault("max_connections", REDIS_SLOTS)
        settings["min_idle"] = settings["max_connections"]
        manager = start_manager(**settings)
        good = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=15)
        goods.append(good)
        _roundtrip(manager, good)
        return manager, good, _baseline(manager)

    yield start
    for good in goods:
        good.close()


def _settled(manager: ManagerProcess) -> dict[str, Any]:
    """Wait until no lease is held and every slot is open and idle; return the stats."""
    slots = manager.settings["max_connections"]
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = manager.stats()
        conns = last["connections"]
        return last["leases"]["held"] == 0 and conns["open"] == slots and conns["idle"] == slots and conns["connecting"] == 0

    try:
        wait_for(check, timeout=15, what="no leases and every slot idle")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; stats: leases {last.get('leases')}, connections {last.get('connections')}") from None
    return last


def _baseline(manager: ManagerProcess) -> int:
    """The manager's fd count at rest, with the connections open now (except ours)."""
    _settled(manager)
    with one_shot.channel(manager.socket_path) as channel:
        # The STATS reply proves the manager accepted (and holds an fd for) this channel.
        one_shot.stats_of(channel)
        with_ours = hp.fd_count(manager.pid)
    baseline = with_ours - 1
    _wait_fds(manager, baseline)
    return baseline


def _wait_fds(manager: ManagerProcess, expected: int, timeout: float = 15.0) -> None:
    try:
        wait_for(lambda: hp.fd_count(manager.pid) == expected, timeout=timeout, what=f"manager fd count == {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {hp.fd_count(manager.pid)} fds open: {sorted(hp.fd_targets(manager.pid))}") from None


def _at_rest(manager: ManagerProcess, baseline: int) -> dict[str, Any]:
    """No lease held, every slot back, not one fd more than before."""
    _alive(manager)
    stats = _settled(manager)
    _wait_fds(manager, baseline)
    _alive(manager)
    return stats


def _stats_via(peer: RawPeer) -> dict[str, Any]:
    peer.send(protocol.encode_empty(FrameType.STATS))
    frame_type, body = peer.recv_no_fd()
    assert frame_type == FrameType.STATS_REPLY, hp.describe(frame_type, body)
    return protocol.decode_json(body)


def _closed_after_error(peer: RawPeer, code: ErrorCode) -> protocol.ErrorFrame:
    error = peer.expect_error(code)
    extra = peer.expect_closed()
    assert extra == [], f"frames after ERROR {code.name}: {[hp.describe(*f) for f in extra]}"
    return error


def _log_count(manager: ManagerProcess, text: str) -> int:
    with open(manager.log_path or "", errors="replace") as handle:
        return sum(text in line for line in handle)


def _redis_ids(admin: redis.Redis, manager: ManagerProcess) -> set[str]:
    """The manager's connections as Redis sees them: a replaced one has a new id."""
    return {c["id"] for c in manager_clients(admin, manager.pool_name)}  # type: ignore[attr-defined]


def _counters(manager: ManagerProcess, *names: str) -> dict[str, int]:
    counters = manager.stats()["counters"]
    return {name: counters[name] for name in names}


_REPAIRS = (
    "connections_reset", "connections_closed", "reaped_holder_closed", "reaped_holder_dead", "reaped_broken", "reaped_revoked",
)


# ----- size, type, truncation, version, order ------------------------------------------------



def _flood_without_reading(manager: Any, frame_type: FrameType) -> None:
    """Send requests and never read a reply: the manager must drop us once they fill our buffer."""
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        sent = 0
        with pytest.raises((BrokenPipeError, ConnectionResetError, ConnectionRefusedError)):
            while sent < 1_000_000:
                peer.send(protocol.encode_empty(frame_type))
                sent += 1
        assert sent > 10

def test_frames_over_the_size_cap_are_refused_and_closed(hostile: Start) -> None:
    manager, good, baseline = hostile()
    for size in (protocol.MAX_FRAME + 1, protocol.MAX_FRAME + 4096, 150_000):
        for greet in (False, True):
            with RawPeer(manager.socket_path) as peer:
                if greet:
                    peer.hello()
                peer.send(hp.frame(FrameType.HELLO if not greet else FrameType.SITE, bytes(size - protocol.HEADER.size)))
                error = _closed_after_error(peer, ErrorCode.MALFORMED)
                assert str(protocol.MAX_FRAME) in error.message
            _roundtrip(manager, good)
    assert _log_count(manager, "frame truncated") >= 6

    # Exactly at the cap is a legal frame, of every kind a worker sends with a body.
    with RawPeer(manager.socket_path) as peer:
        padding = "p" * (protocol.MAX_FRAME - len(hp.hello()) - len(',"pad":""'))
        big_hello = protocol.encode_json(FrameType.HELLO, {"pid": os.getpid(), "client": "hostile", "pad": padding})
        assert len(big_hello) == protocol.MAX_FRAME
        peer.send(big_hello)
        frame_type, body, fds = peer.recv()
        hp.close_fds(fds)
        assert frame_type == FrameType.WELCOME and len(fds) == 1, hp.describe(frame_type, body)
        peer.send(hp.frame(SOME_UNKNOWN_TYPE, bytes(protocol.MAX_FRAME - protocol.HEADER.size)))
        peer.expect_error(ErrorCode.UNSUPPORTED)
        big_site = hp.site(1, b"s" * (protocol.MAX_FRAME - protocol.HEADER.size - 4))
        assert len(big_site) == protocol.MAX_FRAME
        peer.send(big_site)  # no reply: the PING after it is answered first
        # A body the handler ignores, as large as a frame may be.
        peer.send(hp.frame(FrameType.PING, bytes(protocol.MAX_FRAME - protocol.HEADER.size), request_id=9))
        frame_type, request_id, body, fds = peer.recv_frame()
        assert (frame_type, request_id, fds) == (FrameType.PONG, 9, []), hp.describe(frame_type, body)
        peer.ping()
    _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["protocol_errors"] == 6
    assert stats["connections"]["open"] == REDIS_SLOTS  # DEMAND opens nothing beyond max_connections


def test_unknown_frame_types_get_unsupported_and_the_connection_is_kept(hostile: Start) -> None:
    manager, good, baseline = hostile()
    with RawPeer(manager.socket_path) as peer:
        # Before HELLO too: an unknown type is not a reason to close.
        for frame_type in hp.UNKNOWN_TYPES[:3]:
            peer.send(hp.frame(frame_type, request_id=1000 + frame_type))
            got_type, request_id, body, fds = peer.recv_frame()
            assert (got_type, request_id, fds) == (FrameType.ERROR, 1000 + frame_type, []), hp.describe(got_type, body)
            error = protocol.decode_error(body)
            assert error.code == ErrorCode.UNSUPPORTED and error.lease_seq == 0 and str(frame_type) in error.message
        peer.hello()
        for frame_type in hp.UNKNOWN_TYPES + hp.SERVER_TYPES:
            peer.send(hp.frame(frame_type, b"body?" * (frame_type % 4)))
            error = peer.expect_error(ErrorCode.UNSUPPORTED)
            assert str(int(frame_type)) in error.message
        peer.ping()
        # Still a full worker: it takes a lease, speaks Redis on its fd and gives it back.
        lease = wait_for(peer.try_take, what="a lease for the peer")
        assert hp.redis_ping(lease.fd) == PONG
        assert peer.give_back(lease) is Outcome.CLEAN
        peer.ping()
        _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["protocol_errors"] == 0


_HEADER_PIECES = [protocol.header(FrameType.PING)[:n] for n in range(1, protocol.HEADER.size)]
_MALFORMED_BEFORE_HELLO = _HEADER_PIECES + [
    hp.frame(FrameType.HELLO, body)
    for body in (b"", b"{", b'{"pid": 1', b"\xff\xfe\x00", b"[]", b"null", b'"hello"', b"42", b"{}" + b"\x00")
]
_MALFORMED_AFTER_HELLO = _HEADER_PIECES + [
    hp.hello(),  # HELLO twice
    *(hp.frame(FrameType.FETCH_FD, bytes(n)) for n in (0, 7, 9, 64)),
    *(hp.frame(FrameType.REPORT, bytes(n)) for n in (0, 1, 17, 19, 64)),
    hp.report(0, 0, 1, max(Outcome) + 1, 0),
    hp.report(0, 0, 1, 255, 0),
    hp.report(0, 0, 1, 0, max(ReportCause) + 1),
    hp.report(0, 0, 1, 2, 255),
    *(hp.frame(FrameType.SITE, bytes(n)) for n in (0, 3)),
    hp.frame(FrameType.ADMIN, b"not json"),
    hp.frame(FrameType.ADMIN, b"[1, 2]"),
    protocol.encode_json(FrameType.ADMIN, {"command": "reap", "pid": "everyone"}),
]
_REASONS = ["shorter than its header", "not UTF-8 JSON", "HELLO sent twice", "slot body of 7 bytes",
            "REPORT body of 19 bytes", "out of range", "SITE body of 3 bytes", "expected an object", "integer 'pid'"]


def test_truncated_and_garbled_frames_close_only_their_connection(hostile: Start) -> None:
    manager, good, baseline = hostile()
    with RawPeer(manager.socket_path) as bystander:
        bystander.hello()
        cases = [(False, data) for data in _MALFORMED_BEFORE_HELLO] + [(True, data) for data in _MALFORMED_AFTER_HELLO]
        for index, (greet, data) in enumerate(cases):
            with RawPeer(manager.socket_path) as peer:
                lease = None
                if greet:
                    peer.hello()
                    if index % 2:  # half of them while holding a lease
                        lease = wait_for(peer.try_take, what="a lease for the peer")
                peer.send(data)
                try:
                    _closed_after_error(peer, ErrorCode.MALFORMED)
                except AssertionError as exc:
                    raise AssertionError(f"case {index} ({'after' if greet else 'before'} HELLO) {data[:40]!r}: {exc}") from None
                if lease is not None:
                    # Its channel is closed, its lease is not: the lock is still ours, and so is the connection.
                    assert hp.redis_ping(lease.fd) == PONG
                    assert peer.give_back(lease) is Outcome.CLEAN  # by the table: no frame needed
            bystander.ping()
            _roundtrip(manager, good)

        # A zero-length SEQPACKET message reads like EOF: the manager may only close.
        with RawPeer(manager.socket_path) as peer:
            peer.hello()
            peer.send(b"")
            peer.expect_closed()
        bystander.ping()
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["protocol_errors"] == len(cases)
    assert all(stats["counters"][name] == 0 for name in _REPAIRS if name.startswith("reaped")), stats["counters"]
    # Each close has its reason in the manager's log.
    assert _log_count(manager, "malformed frame from pid") == len(cases)
    for reason in _REASONS:
        assert _log_count(manager, reason) >= 1, f"no logged reason {reason!r}"


def test_wrong_protocol_version_gets_version_error_and_is_closed(hostile: Start) -> None:
    manager, good, baseline = hostile()
    assert hp.BAD_VERSIONS
    for version in hp.BAD_VERSIONS:
        with RawPeer(manager.socket_path) as peer:
            peer.send(hp.frame(FrameType.HELLO, hp.hello()[protocol.HEADER.size:], version=version))
            error = _closed_after_error(peer, ErrorCode.VERSION)
            assert f"protocol {protocol.VERSION}" in error.message and f"client speaks {version}" in error.message
        with RawPeer(manager.socket_path) as peer:
            peer.hello()
            lease = wait_for(peer.try_take, what="a lease for the peer")
            peer.send(hp.frame(FrameType.PING, version=version))
            _closed_after_error(peer, ErrorCode.VERSION)
            assert hp.redis_ping(lease.fd) == PONG  # the lease outlives the channel
            assert peer.give_back(lease) is Outcome.CLEAN
        _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert _log_count(manager, "unsupported protocol version") == 2 * len(hp.BAD_VERSIONS)
    assert stats["counters"]["reaped_holder_closed"] == 0


@pytest.mark.parametrize("when", ["first frame", "after HELLO"])
def test_a_version_1_client_is_refused_in_its_own_framing_naming_both_versions(hostile: Start, when: str) -> None:
    manager, good, baseline = hostile()
    for frame_type in (1, 2, 3, 10):  # v1's HELLO, ACQUIRE, RELEASE, PING
        with RawPeer(manager.socket_path) as peer:
            if when == "after HELLO":
                peer.hello()
            peer.send(hp.v1_frame(frame_type, b'{"pid": 1, "client": "sharedpool/0.0.1"}' if frame_type == 1 else bytes(10)))
            data = peer.sock.recv(protocol.MAX_FRAME)
            version, got_type, code, message = hp.decode_v1_error(data)
            assert (version, got_type, code) == (1, 7, ErrorCode.VERSION), data
            assert f"protocol {protocol.VERSION}" in message and "speaks 1" in message, message
            assert peer.expect_closed() == []
        _roundtrip(manager, good)
    _at_rest(manager, baseline)


def test_frames_out_of_order(hostile: Start) -> None:
    manager, good, baseline = hostile()
    before_hello = [
        protocol.encode_slot(FrameType.FETCH_FD, 0, 0),
        protocol.encode_report(0, 0, 1, Outcome.BROKEN, ReportCause.GIVEN_BACK),
        protocol.encode_empty(FrameType.DEMAND),
        protocol.encode_site(1, "app.py:1"),
        protocol.encode_empty(FrameType.PING),
        protocol.encode_empty(FrameType.STATS),
        protocol.encode_json(FrameType.ADMIN, {"command": "pause"}),
    ]
    for data in before_hello:
        with RawPeer(manager.socket_path) as peer:
            peer.send(data)
            error = _closed_after_error(peer, ErrorCode.NOT_READY)
            assert "HELLO" in error.message
        _roundtrip(manager, good)
    assert manager.stats()["paused"] is False  # the ADMIN before HELLO was not obeyed

    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        peer.send(hp.hello())
        error = _closed_after_error(peer, ErrorCode.MALFORMED)
        assert "HELLO" in error.message
    _roundtrip(manager, good)

    # Pipelined requests are answered in order, each with its own request id.
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        asked = [
            (peer.request(FrameType.PING), FrameType.PONG),
            (peer.request(FrameType.FETCH_FD, struct.pack("!II", 2**32 - 1, 0)), FrameType.ERROR),
            (peer.request(FrameType.DEMAND), FrameType.ACK),
            (peer.request(SOME_UNKNOWN_TYPE), FrameType.ERROR),  # type: ignore[arg-type]
            (peer.request(FrameType.STATS), FrameType.STATS_REPLY),
            (peer.request(FrameType.PING), FrameType.PONG),
        ]
        for request_id, reply_type in asked:
            frame_type, got_id, body, fds = peer.recv_frame()
            hp.close_fds(fds)
            assert (frame_type, got_id, fds) == (reply_type, request_id, []), hp.describe(frame_type, body)
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


# ----- requests about slots that are not yours, or not there ------------------------------------


def test_fetch_fd_for_bogus_slots_and_generations_is_answered_stale(hostile: Start) -> None:
    manager, good, baseline = hostile()
    with RawPeer(manager.socket_path) as peer:
        welcome = peer.hello()
        assert peer.table is not None
        capacity = welcome["table"]["capacity"]
        generation = peer.table.generation_of(0)
        bogus = [
            (capacity, 0), (capacity + 1, 0), (2**31, 0), (2**32 - 1, 2**32 - 1),
            (0, generation + 1), (0, 2**32 - 1), (REDIS_SLOTS, 0),  # a row of the table that is not open
        ]
        for slot, gen in bogus:
            request_id = peer.request(FrameType.FETCH_FD, struct.pack("!II", slot, gen))
            frame_type, got_id, body, fds = peer.recv_frame()
            hp.close_fds(fds)
            assert (frame_type, got_id, fds) == (FrameType.ERROR, request_id, []), hp.describe(frame_type, body)
            error = protocol.decode_error(body)
            assert error.code == ErrorCode.STALE and f"slot {slot} generation {gen}" in error.message
        peer.ping()  # refused, not closed
        # A generation that was real once: after its connection is replaced it is stale too.
        lease = wait_for(peer.try_take, what="a lease for the peer")
        assert peer.give_back(lease, Outcome.BROKEN) is Outcome.BROKEN  # REPORTed: replaced
        wait_for(lambda: peer.table is not None and peer.table.generation_of(lease.slot) != lease.generation,
                 what="the broken slot replaced")
        request_id = peer.request(FrameType.FETCH_FD, struct.pack("!II", lease.slot, lease.generation))
        error = peer.expect_error(ErrorCode.STALE)
        assert f"slot {lease.slot} generation {lease.generation}" in error.message
        peer.ping()
    # The real client's channel says so with its own error, and stays usable.
    channel = ControlChannel(manager.socket_path, connect_timeout=5, reply_timeout=5)
    try:
        with pytest.raises(errors.StaleSlot, match=f"slot {capacity} generation 7"):
            channel.call(FrameType.FETCH_FD, struct.pack("!II", capacity, 7), FrameType.FD, timeout=5, want_fd=True)
        assert channel.ping() >= 0
    finally:
        channel.close()
    _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["fetches_refused_stale"] == len(bogus) + 2
    assert stats["counters"]["reaped_broken"] == 1 and stats["counters"]["protocol_errors"] == 0


def test_garbage_reports_close_the_peer_and_stale_ones_are_ignored(hostile: Start, admin: redis.Redis) -> None:
    manager, good, baseline = hostile()
    ids = _redis_ids(admin, manager)
    assert len(ids) == REDIS_SLOTS
    before = _counters(manager, *_REPAIRS)
    with RawPeer(manager.socket_path) as peer:
        welcome = peer.hello()
        assert peer.table is not None
        capacity = welcome["table"]["capacity"]
        generations = [peer.table.generation_of(slot) for slot in range(REDIS_SLOTS)]
        # Well-formed but about nothing the manager will act on: ignored, no reply, connection kept.
        stale = [
            (2**32 - 1, 0), (capacity, 0), (REDIS_SLOTS, 0),  # no such open slot
            (0, generations[0] + 1), (1, 2**32 - 1),  # another generation
            (0, generations[0]), (1, generations[1]),  # real, but its row is READY: nothing was given back
        ]
        sent = 0
        for slot, generation in stale:
            for outcome in Outcome:
                for cause in ReportCause:
                    for seq in (0, 1, 2**64 - 1):
                        peer.send(hp.report(slot, generation, seq, outcome, cause))
                        sent += 1
            peer.ping()
        assert sent >= 100
        _roundtrip(manager, good)
    # Malformed: closed, each on its own connection.
    for data in [hp.frame(FrameType.REPORT, bytes(n)) for n in (0, 17, 19, 1000)] + [
        hp.report(0, 0, 1, max(Outcome) + 1, 0), hp.report(0, 0, 1, 0, max(ReportCause) + 1), hp.report(0, 0, 1, 255, 255),
    ]:
        with RawPeer(manager.socket_path) as peer:
            peer.hello()
            peer.send(data)
            error = _closed_after_error(peer, ErrorCode.MALFORMED)
            assert "REPORT" in error.message
        _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert _counters(manager, *_REPAIRS) == before, "a stale or garbage REPORT made the manager repair something"
    assert stats["counters"]["protocol_errors"] == 7
    assert _redis_ids(admin, manager) == ids, "a stale REPORT replaced a Redis connection"


_THIEF = """
import sys
sys.path[:0] = [{tests!r}]
import hostile_peers as hp
from sharedpool.protocol import Outcome, ReportCause
path, slot, generation, seq = sys.argv[1], *map(int, sys.argv[2:5])
with hp.RawPeer(path) as thief:
    thief.hello()
    for outcome in Outcome:
        for cause in ReportCause:
            thief.send(hp.report(slot, generation, seq, outcome, cause))
    thief.ping()  # every REPORT before it was read: none got an answer
print("done", flush=True)
"""


def test_reports_about_someone_elses_lease_are_not_applied(hostile: Start, admin: redis.Redis) -> None:
    manager, good, baseline = hostile()
    ids = _redis_ids(admin, manager)
    before = _counters(manager, *_REPAIRS)
    with RawPeer(manager.socket_path) as holder, RawPeer(manager.socket_path) as neighbour:
        holder.hello()
        neighbour.hello()
        lease = wait_for(holder.try_take, what="a lease for the holder")
        assert hp.redis_ping(lease.fd) == PONG
        # Another process says the lease came back broken, needs a reset, was abandoned or aborted.
        thief = subprocess.run(
            [sys.executable, "-c", _THIEF.format(tests=TESTS), manager.socket_path,
             str(lease.slot), str(lease.generation), str(lease.seq)],
            capture_output=True, text=True, timeout=60,
        )
        assert thief.returncode == 0 and thief.stdout.strip() == "done", thief.stderr
        # A thread of our own process says the same, except ABORTED (that one is its holder's to say).
        for outcome in Outcome:
            for cause in (ReportCause.GIVEN_BACK, ReportCause.HOLDER_GONE):
                neighbour.send(hp.report(lease.slot, lease.generation, lease.seq, outcome, cause))
        neighbour.ping()

        # Not applied: the holder still has its lease, and its connection works.
        stats = manager.stats()
        assert stats["leases"]["held"] == 1
        assert hp.redis_ping(lease.fd) == PONG
        assert _redis_ids(admin, manager) == ids
        _roundtrip(manager, good)  # the other slot serves the good client meanwhile
        assert holder.give_back(lease) is Outcome.CLEAN
        holder.ping()
        # Now given back: the same reports, once more, about a READY row.
        for outcome in Outcome:
            neighbour.send(hp.report(lease.slot, lease.generation, lease.seq, outcome, ReportCause.HOLDER_GONE))
        neighbour.ping()
    _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert _counters(manager, *_REPAIRS) == before, "a report about someone else's lease was applied"
    assert _redis_ids(admin, manager) == ids and stats["counters"]["protocol_errors"] == 0


# ----- floods ---------------------------------------------------------------------------------


def test_demand_floods(hostile: Start, admin: redis.Redis) -> None:
    manager, good, baseline = hostile()
    # A thousand DEMANDs read in batches: each its ACK, and not one connection beyond max_connections.
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        for _batch in range(50):
            asked = [peer.request(FrameType.DEMAND) for _ in range(20)]
            for request_id in asked:
                frame_type, got_id, body, fds = peer.recv_frame()
                assert (frame_type, got_id, fds) == (FrameType.ACK, request_id, []), hp.describe(frame_type, body)
        stats = _stats_via(peer)
        assert stats["connections"]["open"] == REDIS_SLOTS and stats["connections"]["connecting"] == 0
        assert len(manager_clients(admin, manager.pool_name)) == REDIS_SLOTS  # type: ignore[attr-defined]
    _roundtrip(manager, good)
    # One that never reads its ACKs is dropped once they fill its buffer.
    _flood_without_reading(manager, FrameType.DEMAND)
    wait_for(lambda: _log_count(manager, "(not reading its replies)"), what="the reason in the manager's log")
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


def test_site_frames_with_huge_or_invalid_text(hostile: Start) -> None:
    manager, good, baseline = hostile(leak_threshold=0.3, reap_interval=0.1)
    hostile_site = 2**32 - 1  # an id the good client's own SITEs never reach
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        # At the cap, not UTF-8: kept (cut and replaced), no reply.
        text = b"\xff\xfe" + b"A" * (protocol.MAX_FRAME - protocol.HEADER.size - 4 - 2)
        peer.send(hp.site(hostile_site, text))
        peer.ping()
        for site_id in range(1000, 3000):  # many sites, every one of them long
            peer.send(hp.site(site_id, b"\xc3" + os.urandom(700)))
        peer.ping()
        _roundtrip(manager, good)
        # A lease taken "at" that site and held past leak_threshold: the warning names it, safely.
        lease = wait_for(lambda: peer.try_take(call_site=hostile_site), what="a lease for the peer")
        expected = "taken at \ufffd\ufffd" + "A" * (protocol.MAX_SITE - 2)
        wait_for(lambda: _log_count(manager, expected), what="the leak warning naming the site")
        assert _log_count(manager, expected + "A") == 0  # cut at MAX_SITE bytes
        assert peer.give_back(lease) is Outcome.CLEAN
        peer.ping()
    # Over the cap: malformed, like any frame.
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        peer.send(hp.site(1, b"\xff" * protocol.MAX_FRAME))
        _closed_after_error(peer, ErrorCode.MALFORMED)
    _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["leak_warnings"] >= 1 and stats["counters"]["protocol_errors"] == 1


# ----- clients that do not talk, or talk too slowly ---------------------------------------------


def test_silent_clients_are_closed_after_the_handshake_timeout(hostile: Start) -> None:
    timeout = 0.5
    manager, good, baseline = hostile(handshake_timeout=timeout)
    started = time.monotonic()
    peers = [RawPeer(manager.socket_path) for _ in range(20)]
    try:
        _roundtrip(manager, good)
        for peer in peers:
            error = _closed_after_error(peer, ErrorCode.NOT_READY)
            assert "HELLO" in error.message
        # Loose lower bound only: the manager measured from its accept, after our connect.
        assert time.monotonic() - started >= timeout * 0.9
    finally:
        for peer in peers:
            peer.close()
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


def test_slow_drip_clients(hostile: Start) -> None:
    timeout = 0.5
    manager, good, baseline = hostile(handshake_timeout=timeout)

    # Talking without ever saying HELLO does not extend the handshake.
    with RawPeer(manager.socket_path) as peer:
        started = time.monotonic()
        frames: list[tuple[int, bytes]] = []
        while True:
            try:
                peer.send(hp.frame(SOME_UNKNOWN_TYPE))
                frames.append(peer.recv_no_fd())
            except (Closed, BrokenPipeError, ConnectionResetError):
                frames += peer.expect_closed()  # what was queued before the close
                break
            assert time.monotonic() - started < 10 * timeout + 5, "a dripping peer was never cut off"
            time.sleep(timeout / 10)  # the deliberate drip
        codes = [protocol.decode_error(body).code for _t, body in frames]
        assert codes[-1] == ErrorCode.NOT_READY and set(codes[:-1]) <= {ErrorCode.UNSUPPORTED}
    _roundtrip(manager, good)

    # One byte per frame (SEQPACKET keeps boundaries, so a drip is many tiny frames).
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        peer.send(bytes([protocol.VERSION]))
        _closed_after_error(peer, ErrorCode.MALFORMED)
    _roundtrip(manager, good)

    # Header-only frames of an unknown type, slowly, replies left unread meanwhile.
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        sent = 0
        for _ in range(30):
            peer.send(hp.frame(SOME_UNKNOWN_TYPE))
            sent += 1
            if sent % 5 == 0:
                _roundtrip(manager, good)
            time.sleep(0.02)  # the deliberate drip
        for _ in range(sent):
            peer.expect_error(ErrorCode.UNSUPPORTED)
        peer.ping()

    # A flood that never reads a reply is dropped once its replies fill the buffer.
    _flood_without_reading(manager, FrameType.PING)
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


# ----- fds nobody reads ----------------------------------------------------------------------


_TAKE_AND_HANG = """
import struct, sys, time
sys.path[:0] = [{tests!r}]
import hostile_peers as hp
from sharedpool.protocol import FrameType
peer = hp.RawPeer(sys.argv[1])
peer.hello()
taken = None
while taken is None:  # the manager's sweep may have a READY slot locked for a moment
    taken = peer.try_take_row()
peer.request(FrameType.FETCH_FD, struct.pack("!II", taken[0], taken[1]))  # its FD is never read
print("taken", flush=True)
time.sleep(60)
"""


def test_fetch_fd_then_never_read_the_fd_and_go_away(hostile: Start) -> None:
    manager, good, baseline = hostile(reap_interval=0.2)

    # Closes everything with the FD (and its fd) unread, and the row still HELD.
    peer = RawPeer(manager.socket_path)
    peer.hello()
    sent = manager.stats()["counters"]["fds_sent"]
    taken = wait_for(peer.try_take_row, what="a slot for the peer")
    peer.request(FrameType.FETCH_FD, struct.pack("!II", taken[0], taken[1]))
    wait_for(lambda: manager.stats()["counters"]["fds_sent"] == sent + 1, what="the fd sent")
    assert manager.stats()["leases"]["held"] == 1
    _roundtrip(manager, good)
    peer.close()  # the lock goes with our description: the holder vanished
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["reaped_holder_closed"] == 1
    _roundtrip(manager, good)

    # A process that is SIGKILLed with its FD unread.
    child = subprocess.Popen([sys.executable, "-c", _TAKE_AND_HANG.format(tests=TESTS), manager.socket_path],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "taken"
        wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="the child's lease")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["reaped_holder_closed"] + stats["counters"]["reaped_holder_dead"] == 2
    _roundtrip(manager, good)


# ----- fds sent to the manager --------------------------------------------------------------


def test_fds_sent_to_the_manager_never_stay_in_it(hostile: Start, tmp_path: Any) -> None:
    manager, good, baseline = hostile()
    marker = tmp_path / f"passed-{uuid.uuid4().hex}"
    marker.write_text("if the manager keeps this open, it leaks")
    fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        cases: list[tuple[bool, bytes, list[int] | None]] = [
            (False, hp.hello(), [fd]),
            (True, protocol.encode_empty(FrameType.PING), [fd]),
            (True, protocol.encode_slot(FrameType.FETCH_FD, 0, 0), [fd, fd]),
            (True, protocol.encode_report(0, 0, 1, Outcome.BROKEN, ReportCause.GIVEN_BACK), [left.fileno()]),
            (True, protocol.encode_empty(FrameType.DEMAND), [fd] * 3),
            (True, hp.frame(SOME_UNKNOWN_TYPE), [fd] * 250),
            (True, protocol.encode_empty(FrameType.STATS), None),  # None: its own control socket
        ]
        for index, (greet, data, fds) in enumerate(cases):
            with RawPeer(manager.socket_path) as peer:
                if greet:
                    peer.hello()
                peer.send(data, fds if fds is not None else [peer.sock.fileno()])
                try:
                    error = _closed_after_error(peer, ErrorCode.MALFORMED)
                except AssertionError as exc:
                    raise AssertionError(f"case {index}: {exc}") from None
                assert "ancillary data truncated" in error.message
            assert str(marker) not in hp.fd_targets(manager.pid)
            _roundtrip(manager, good)
    finally:
        os.close(fd)
        left.close()
        right.close()
    stats = _at_rest(manager, baseline)
    assert str(marker) not in hp.fd_targets(manager.pid)
    assert stats["counters"]["protocol_errors"] == len(cases)


# ----- a flood of idle control connections --------------------------------------------------


def test_a_thousand_idle_control_connections(hostile: Start) -> None:
    max_clients, flood = 50, 1000
    manager, good, baseline = hostile(max_clients=max_clients, handshake_timeout=60)
    observer = RawPeer(manager.socket_path)
    peers: list[RawPeer] = []
    try:
        observer.hello()
        _wait_fds(manager, baseline + 1)  # exactly two control connections now: good's and ours
        for _batch in range(flood // 100):
            for _ in range(100):
                peer = RawPeer(manager.socket_path)
                peers.append(peer)
                try:
                    peer.send(hp.hello())
                except BrokenPipeError:
                    pass  # refused and closed before our HELLO: its ERROR is still queued for us
            _roundtrip(manager, good)
        welcomed = refused = 0
        for peer in peers:
            frame_type, body, fds = peer.recv()
            hp.close_fds(fds)  # WELCOME's lease table
            if frame_type == FrameType.WELCOME:
                assert len(fds) == 1
                welcomed += 1
            else:
                assert frame_type == FrameType.ERROR and not fds, hp.describe(frame_type, body)
                assert protocol.decode_error(body).code == ErrorCode.TOO_MANY_CLIENTS, hp.describe(frame_type, body)
                assert peer.expect_closed() == []
                refused += 1
        assert (welcomed, refused) == (max_clients - 2, flood - (max_clients - 2))
        stats = _stats_via(observer)
        assert stats["control_connections"] == max_clients
        assert stats["counters"]["clients_refused"] == refused
        _roundtrip(manager, good)
        peers[0].ping()  # an admitted one is served
        for peer in peers:
            peer.close()
        _wait_fds(manager, baseline + 1)
        assert _stats_via(observer)["control_connections"] == 2
    finally:
        for peer in peers:
            peer.close()
        observer.close()
    fresh = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
    try:
        _roundtrip(manager, fresh)  # new connections are admitted again
    finally:
        fresh.close()
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


def test_a_worker_refused_for_max_clients_is_told_why(hostile: Start) -> None:
    manager, good, baseline = hostile(max_clients=2)
    # The pools of a process share one control connection (good's, here): let
    # it go, so that two raw peers fill max_clients and each new pool is refused.
    good.connection_pool.disconnect()
    with RawPeer(manager.socket_path) as filler, RawPeer(manager.socket_path) as second:
        filler.hello()
        second.hello()
        for _ in range(10):
            refused = sharedpool.Redis(socket_path=manager.socket_path, manager_timeout=0)
            try:
                with pytest.raises(sharedpool.ManagerUnavailable, match="max_clients=2"):
                    refused.ping()
            finally:
                refused.close()
        # The hardest case for the reason to get through: the HELLO is already
        # queued when the manager accepts; closing with it unread would reset
        # the connection ahead of the ERROR.
        manager.signal(signal.SIGSTOP)
        try:
            late = RawPeer(manager.socket_path)
            late.send(hp.hello())
        finally:
            manager.signal(signal.SIGCONT)
        with late:
            assert "max_clients=2" in late.expect_error(ErrorCode.TOO_MANY_CLIENTS).message
            assert late.expect_closed() == []
            assert not late.was_reset, "the manager closed with our HELLO unread: ECONNRESET came first"
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


# ----- the decoder, by property ------------------------------------------------------------------


_u64 = st.integers(0, 2**64 - 1)
_u32 = st.integers(0, 2**32 - 1)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_json_objects = st.dictionaries(st.text(max_size=8), _json, max_size=4)
_empty_frames = st.sampled_from([FrameType.PING, FrameType.PONG, FrameType.STATS, FrameType.DEMAND, FrameType.ACK])
_valid_frames = st.one_of(
    st.builds(lambda d, i: protocol.encode_json(FrameType.HELLO, d, i), _json_objects, _u32),
    st.builds(lambda d: protocol.encode_json(FrameType.ADMIN, d), _json_objects),
    st.builds(protocol.encode_slot, st.sampled_from([FrameType.FETCH_FD, FrameType.FD]), _u32, _u32, _u32),
    st.builds(protocol.encode_report, _u32, _u32, _u64, st.sampled_from(Outcome), st.sampled_from(ReportCause)),
    st.builds(protocol.encode_site, _u32, st.text(max_size=40)),
    st.builds(protocol.encode_error, st.sampled_from(ErrorCode), st.text(max_size=40), _u32, _u64),
    st.builds(protocol.encode_empty, _empty_frames, _u32),
)


@st.composite
def _mutated_frames(draw: Any) -> bytes:
    data = bytearray(draw(_valid_frames))
    edits = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2**16), st.binary(max_size=12)), min_size=1, max_size=4)
    for op, where, value in draw(edits):
        if op == 0 and data:
            data[where % len(data)] ^= 1 << (where % 8)
        elif op == 1:
            del data[where % (len(data) + 1):]
        elif op == 2:
            data += value
        elif op == 3 and len(data) > 1:
            data[1] = where % 256
        elif op == 4 and data:
            data[0] = where % 256
        elif op == 5:
            data[where % (len(data) + 1):where % (len(data) + 1)] = value
    return bytes(data)


_DECODERS = (protocol.decode_json, protocol.decode_slot, protocol.decode_report, protocol.decode_site, protocol.decode_error)


def _decode_everything(data: bytes) -> None:
    """What the manager and the client do with a frame: only ProtocolError may come out."""
    try:
        _version, _frame_type, _request_id, body = protocol.split(data)
    except ProtocolError:
        return
    for decoder in _DECODERS:
        try:
            decoder(body)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=64), _mutated_frames()), st.integers(0, 2**31 - 1))
@example(b"", 0)
@example(bytes(protocol.MAX_FRAME + 1), socket.MSG_TRUNC)
@example(hp.frame(FrameType.HELLO, b'{"pid": 1e999, "client": ' + b"9" * 5000 + b"}"), socket.MSG_CTRUNC)
@example(hp.report(0, 0, 0, 0xFF, 0xFF), 0)
@example(hp.site(0, b"\xff" * 600), 0)
@example(hp.v1_frame(1, b"{}"), 0)
def test_decoders_raise_only_protocol_error(data: bytes, flags: int) -> None:
    _decode_everything(data)
    try:
        protocol.check_recv_flags(flags)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(
    st.sampled_from([socket.SOL_SOCKET, 0, 41]),
    st.sampled_from([socket.SCM_RIGHTS, socket.SCM_CREDENTIALS, 0]),
    st.binary(max_size=40),
), max_size=3))
def test_ancillary_data_decodes_to_ints_only(ancdata: list[tuple[int, int, bytes]]) -> None:
    fds = protocol.fds_from_ancillary(ancdata)
    assert all(isinstance(fd, int) for fd in fds)
    rights = sum(len(data) // 4 for level, kind, data in ancdata if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS))
    assert len(fds) == rights


@settings(max_examples=100, deadline=None, database=None)
@given(_valid_frames)
def test_valid_frames_split_and_decode(data: bytes) -> None:
    version, frame_type, _request_id, body = protocol.split(data)
    assert version == protocol.VERSION
    decoder = {
        FrameType.HELLO: protocol.decode_json, FrameType.ADMIN: protocol.decode_json,
        FrameType.FETCH_FD: protocol.decode_slot, FrameType.FD: protocol.decode_slot,
        FrameType.REPORT: protocol.decode_report, FrameType.SITE: protocol.decode_site,
        FrameType.ERROR: protocol.decode_error,
    }.get(FrameType(frame_type))
    if decoder is not None:
        decoder(body)
    else:
        assert body == b""


# ----- live fuzz ---------------------------------------------------------------------------


def _good_worker(socket_path: str, worker: int, stop: Any, report: Any) -> None:
    r = sharedpool.Redis(socket_path=socket_path, decode_responses=True, acquire_timeout=30)
    prefix = f"fuzz-good:{worker}:{uuid.uuid4().hex}"
    ops, failures = 0, []
    while not stop.is_set() and len(failures) < 10:
        key, value = f"{prefix}:{ops}", f"{worker}-{ops}-{uuid.uuid4().hex}"
        failure = checked_round_trip(r, key, value, ops)
        if failure:
            failures.append(failure)
        ops += 1
    r.close()
    report.put({"worker": worker, "ops": ops, "failures": failures})


@pytest.mark.slow
def test_live_fuzz_while_good_workers_run(start_manager: Any, admin: redis.Redis) -> None:
    slots = 4
    manager = start_manager(
        max_connections=slots, min_idle=slots, max_leases_per_worker=1, handshake_timeout=0.5, max_clients=64,
    )
    baseline = _baseline(manager)
    seed = int(os.environ.get("SHAREDPOOL_FUZZ_SEED", random.randrange(2**32)))
    fuzz_report, good_report, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    fuzzers = [ctx.Process(target=hp.fuzz, args=(manager.socket_path, seed + n, 5.0, fuzz_report)) for n in range(3)]
    workers = [ctx.Process(target=_good_worker, args=(manager.socket_path, n, stop, good_report)) for n in range(2)]
    for process in workers + fuzzers:
        process.start()
    try:
        summaries = [fuzz_report.get(timeout=60) for _ in fuzzers]
        _alive(manager)
        stop.set()
        results = [good_report.get(timeout=60) for _ in workers]
    finally:
        stop.set()
        for process in workers + fuzzers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    where = f"(fuzz seed {seed}: rerun with SHAREDPOOL_FUZZ_SEED={seed})"
    assert [p.exitcode for p in workers + fuzzers] == [0] * 5, where
    for result in results:
        assert result["failures"] == [], f"good worker {result['worker']} {where}: {result['failures']}"
        assert result["ops"] >= 10, f"good worker {result['worker']} starved: {result['ops']} ops {where}"
    frames = sum(s["frames"] for s in summaries)
    replies = {name for s in summaries for name in s["replies"]}
    assert frames >= 300, f"fuzzers sent only {frames} frames {where}"
    assert {"MALFORMED", "UNSUPPORTED", "WELCOME", "STALE"} <= replies, f"{replies} {where}"

    _at_rest(manager, baseline)
    stats = manager.stats()
    assert stats["counters"]["protocol_errors"] > 0
    assert stats["control_connections"] == 1  # only the stats channel itself
    wait_for(lambda: len(manager_clients(admin, manager.pool_name)) == slots, what=f"{slots} Redis connections {where}")  # type: ignore[attr-defined]
    good = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
    try:
        _roundtrip(manager, good)
    finally:
        good.close()


# ----- regressions: bugs these tests found --------------------------------------------

_DEEP = b"[" * 100_000


def test_decode_json_refuses_deep_nesting_with_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_json(_DEEP)


def test_deeply_nested_json_does_not_crash_the_manager(hostile: Start) -> None:
    manager, good, baseline = hostile()
    for greet, frame_type in ((False, FrameType.HELLO), (True, FrameType.ADMIN)):
        with RawPeer(manager.socket_path) as peer:
            if greet:
                peer.hello()
            peer.send(hp.frame(frame_type, _DEEP[: protocol.MAX_FRAME - protocol.HEADER.size]))
            _closed_after_error(peer, ErrorCode.MALFORMED)
        _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["protocol_errors"] == 2


# One small process forks N children; each connects (so SO_PEERCRED names a
# distinct worker pid), says HELLO and exits, while the parent keeps the socket.
_MANY_WORKERS = """
import os, socket, sys
path, count, hello = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
socks = []
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            sock.connect(path)
            sock.send(hello)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    socks.append(sock)
print("connected", flush=True)
sys.stdin.read()
"""


def test_stats_with_many_worker_processes_does_not_crash_the_manager(hostile: Start) -> None:
    manager, good, baseline = hostile()
    observer = RawPeer(manager.socket_path)
    observer.hello()
    processes = 800  # each adds ~70 bytes to the STATS reply: 800 is well past 64 KiB
    holder = subprocess.Popen(
        [sys.executable, "-c", _MANY_WORKERS, manager.socket_path, str(processes), hp.hello(0).hex()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "connected"
        _wait_fds(manager, baseline + 1 + processes)
        observer.send(protocol.encode_empty(FrameType.STATS))
        # A reply, cut to the busiest workers so that it fits a frame; never a dead manager.
        frame_type, body = observer.recv_no_fd()
        assert frame_type == FrameType.STATS_REPLY, f"{hp.describe(frame_type, body)}; manager log:\n{_log_tail(manager, 12)}"
        stats = protocol.decode_json(body)
        assert stats["workers_total"] >= processes and 0 < len(stats["workers"]) < processes
        _roundtrip(manager, good)
    finally:
        holder.communicate("", timeout=30)  # EOF on its stdin: it exits, closing them all
        holder.stdout.close()  # type: ignore[union-attr]
        observer.close()
    _at_rest(manager, baseline)


@contextlib.contextmanager
def _exhausted_fds(manager: ManagerProcess, spare: int) -> Iterator[tuple[psutil.Process, list[RawPeer]]]:
    """Lower the manager's RLIMIT_NOFILE to its fd count + ``spare``, fill it with silent
    peers; afterwards close them and give the manager its limit back."""
    process = psutil.Process(manager.pid)
    original = process.rlimit(psutil.RLIMIT_NOFILE)
    process.rlimit(psutil.RLIMIT_NOFILE, (hp.fd_count(manager.pid) + spare, original[1]))
    peers = [RawPeer(manager.socket_path) for _ in range(spare + 10)]
    try:
        wait_for(lambda: _log_count(manager, "cannot accept control connection") > 0, what="the manager's fd table full")
        yield process, peers
    finally:
        for peer in peers:
            peer.close()
        if manager.process is not None and manager.process.poll() is None:
            process.rlimit(psutil.RLIMIT_NOFILE, original)


def _survives(manager: ManagerProcess, seconds: float) -> None:
    """Watch the manager for ``seconds`` of periodic work (sweeps): fail as soon as it exits."""
    assert manager.process is not None
    try:
        wait_for(lambda: manager.process.poll() is not None, timeout=seconds, what="the manager to exit")  # type: ignore[union-attr]
    except AssertionError:
        return  # still running, as it should be
    _alive(manager)


@pytest.mark.parametrize("trigger", ["hello", "sweep"])
def test_fd_exhaustion_does_not_crash_the_manager(hostile: Start, trigger: str) -> None:
    manager, good, baseline = hostile(max_connections=2, handshake_timeout=60, reap_interval=0.2)
    with contextlib.ExitStack() as stack:
        pinned = stack.enter_context(good.lease()) if trigger == "sweep" else None  # what the sweep looks at
        if pinned is not None:
            pinned.set("exhausted", "yes")
        with _exhausted_fds(manager, spare=4) as (_process, peers):
            if trigger == "hello":
                peers[0].send(hp.hello())  # accepted before the table filled
                try:
                    frame_type, body, fds = peers[0].recv()
                    hp.close_fds(fds)
                    assert frame_type in (FrameType.WELCOME, FrameType.ERROR), hp.describe(frame_type, body)
                except Closed:
                    pass
            _survives(manager, 1.5)  # several sweeps (reap_interval 0.2 s) with the table full
            if pinned is not None:
                assert pinned.get("exhausted") == "yes"
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


def test_fd_exhaustion_does_not_spin_the_accept_loop(hostile: Start) -> None:
    manager, good, baseline = hostile(max_connections=1, handshake_timeout=60)
    with _exhausted_fds(manager, spare=4) as (process, _peers):
        logged = _log_count(manager, "cannot accept control connection")
        # A measurement window (not a wait for a condition): CPU used and errors logged over 1 s.
        cpu = process.cpu_percent(interval=1.0)
        logged = _log_count(manager, "cannot accept control connection") - logged
        _alive(manager)
        assert cpu < 50 and logged < 20, f"out of fds, the manager used {cpu:.0f}% CPU and logged {logged} accept errors in 1 s"
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


def test_holder_dropped_for_not_reading_its_fds_keeps_its_lease_until_it_vanishes(hostile: Start) -> None:
    manager, good, baseline = hostile(reap_interval=0.2)
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        lease = wait_for(peer.try_take, what="a lease for the peer")  # kept: a command may be in flight on it
        try:
            # Asks for its fd again and again and reads nothing: every answer carries an fd,
            # queued on a socket nobody reads, until the manager gives up on it.
            asked = 0
            with pytest.raises((BrokenPipeError, ConnectionResetError, ConnectionRefusedError)):
                while asked < 1_000_000:
                    peer.send(protocol.encode_slot(FrameType.FETCH_FD, lease.slot, lease.generation))
                    asked += 1
            _roundtrip(manager, good)
            # protocol.py: a lease belongs to the slot lock its holder took, not to the channel.
            stats = manager.stats()
            assert stats["leases"]["held"] == 1 and stats["counters"]["reaped_holder_closed"] == 0
            assert hp.redis_ping(lease.fd) == PONG
            # Now the holder vanishes without giving it back: reaped, and its connection shut down.
            peer.close()
            stats = _at_rest(manager, baseline)
            assert stats["counters"]["reaped_holder_closed"] == 1, stats["counters"]
            try:
                answer = hp.redis_ping(lease.fd)
            except OSError:
                answer = b""
            assert answer == b"", "the vanished holder's Redis connection was not shut down: it is back in the pool"
        finally:
            hp.close_fds([lease.fd])
    _roundtrip(manager, good)
    _at_rest(manager, baseline)
