"""Issue 7: no input can crash or stall the manager.

Every test starts its own real manager and throws at it, over raw
``AF_UNIX``/``SOCK_SEQPACKET`` connections, what a broken or hostile peer
could send. After each act the manager must still run, still serve a
well-behaved ``sharedpool.Redis`` client, and end up with no lease held and
no fd more than before (``/proc/<pid>/fd``, waited for with a deadline:
the manager closes connections asynchronously).

Every test runs its manager with ``min_idle == max_connections``, so each
slot is always open (a reaped connection is replaced) and the number of
Redis fds at rest is fixed: the fd baseline is then exact.

The tests at the end are regressions for manager bugs they found: deeply
nested JSON, a STATS reply larger than a frame, fd exhaustion (crash and
accept busy-loop), and a failed fd re-send undoing a live lease.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import multiprocess
import psutil
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sharedpool
from sharedpool import protocol
from sharedpool.client.channel import ControlChannel
from sharedpool.launch import ManagerProcess
from sharedpool.protocol import ErrorCode, FrameType, Outcome, ProtocolError

import hostile_peers as hp
from conftest import manager_clients, wait_for
from hostile_peers import Closed, RawPeer

ctx = multiprocess.get_context("fork")

PONG = b"+PONG\r\n"
SOME_UNKNOWN_TYPE = hp.UNKNOWN_TYPES[0]
REDIS_SLOTS = 2


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
        good.delete(key)
    except Exception:
        # A manager that is dying closes its sockets first: say so, with its log.
        assert manager.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            manager.process.wait(timeout=5)
        _alive(manager)
        raise


def _start(start_manager: Any, **settings: Any) -> tuple[ManagerProcess, redis.Redis, int]:
    """A manager, a good client that has used it once, and the manager's fd count at rest."""
    settings.setdefault("max_connections", REDIS_SLOTS)
    settings["min_idle"] = settings["max_connections"]
    manager = start_manager(**settings)
    good = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True, acquire_timeout=15)
    _roundtrip(manager, good)
    return manager, good, _baseline(manager)


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
    channel = ControlChannel(manager.socket_path)
    try:
        # The STATS reply proves the manager accepted (and holds an fd for) this channel.
        channel.request(protocol.encode_empty(FrameType.STATS), FrameType.STATS_REPLY)
        with_ours = hp.fd_count(manager.pid)
    finally:
        channel.close()
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


# ----- size, type, truncation, version, order ------------------------------------------------


def test_frames_over_the_size_cap_are_refused_and_closed(start_manager) -> None:
    manager, good, baseline = _start(start_manager)
    for size in (protocol.MAX_FRAME + 1, protocol.MAX_FRAME + 4096, 150_000):
        for greet in (False, True):
            with RawPeer(manager.socket_path) as peer:
                if greet:
                    peer.hello()
                peer.send(hp.frame(FrameType.HELLO if not greet else FrameType.PING, bytes(size - protocol.HEADER.size)))
                error = _closed_after_error(peer, ErrorCode.MALFORMED)
                assert str(protocol.MAX_FRAME) in error.message
            _roundtrip(manager, good)

    # Exactly at the cap is a legal frame.
    with RawPeer(manager.socket_path) as peer:
        padding = "p" * (protocol.MAX_FRAME - len(hp.hello()) - len(',"pad":""'))
        big_hello = protocol.encode_json(FrameType.HELLO, {"pid": os.getpid(), "client": "hostile", "pad": padding})
        assert len(big_hello) == protocol.MAX_FRAME
        peer.send(big_hello)
        assert peer.recv_no_fd()[0] == FrameType.WELCOME
        peer.send(hp.frame(SOME_UNKNOWN_TYPE, bytes(protocol.MAX_FRAME - protocol.HEADER.size)))
        peer.expect_error(ErrorCode.UNSUPPORTED)
        short = protocol.encode_acquire(5000)
        long_where = short + b"w" * (protocol.MAX_FRAME - len(short))
        assert len(long_where) == protocol.MAX_FRAME
        peer.send(long_where)
        frame_type, body, fds = peer.recv()
        hp.close_fds(fds)
        assert frame_type == FrameType.GRANT, hp.describe(frame_type, body)
        peer.send(protocol.encode_release(protocol.decode_grant(body).lease_id, Outcome.CLEAN))
        peer.ping()
    _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["protocol_errors"] >= 6


def test_unknown_frame_types_get_unsupported_and_the_connection_is_kept(start_manager) -> None:
    manager, good, baseline = _start(start_manager)
    with RawPeer(manager.socket_path) as peer:
        # Before HELLO too: an unknown type is not a reason to close.
        for frame_type in hp.UNKNOWN_TYPES[:3]:
            peer.send(hp.frame(frame_type))
            error = peer.expect_error(ErrorCode.UNSUPPORTED)
            assert error.lease_id == 0 and str(frame_type) in error.message
        peer.hello()
        for frame_type in hp.UNKNOWN_TYPES + hp.SERVER_TYPES:
            peer.send(hp.frame(frame_type, b"body?" * (frame_type % 4)))
            error = peer.expect_error(ErrorCode.UNSUPPORTED)
            assert str(int(frame_type)) in error.message
        peer.ping()
        grant, fd = peer.acquire_fd()
        assert hp.redis_ping(fd) == PONG
        hp.close_fds([fd])
        peer.send(protocol.encode_release(grant.lease_id, Outcome.CLEAN))
        peer.ping()
        _roundtrip(manager, good)
    _at_rest(manager, baseline)


_HEADER_PIECES = [protocol.header(FrameType.PING)[:n] for n in range(1, protocol.HEADER.size)]
_MALFORMED_BEFORE_HELLO = _HEADER_PIECES + [
    hp.frame(FrameType.HELLO, body)
    for body in (b"", b"{", b'{"pid": 1', b"\xff\xfe\x00", b"[]", b"null", b'"hello"', b"42", b"{}" + b"\x00")
]
_MALFORMED_AFTER_HELLO = _HEADER_PIECES + [
    *(hp.frame(FrameType.ACQUIRE, bytes(n)) for n in range(4)),
    *(hp.frame(FrameType.RELEASE, bytes(n)) for n in (0, 1, 8, 10, 64)),
    protocol.encode_release(1, Outcome.CLEAN)[:-1] + bytes([max(Outcome) + 1]),
    *(hp.frame(FrameType.FETCH_FD, bytes(n)) for n in (0, 7, 9)),
    hp.frame(FrameType.ADMIN, b"not json"),
    hp.frame(FrameType.ADMIN, b"[1, 2]"),
]


def test_truncated_and_garbled_frames_close_only_their_connection(start_manager) -> None:
    manager, good, baseline = _start(start_manager)
    with RawPeer(manager.socket_path) as bystander:
        bystander.hello()
        cases = [(False, data) for data in _MALFORMED_BEFORE_HELLO] + [(True, data) for data in _MALFORMED_AFTER_HELLO]
        for index, (greet, data) in enumerate(cases):
            with RawPeer(manager.socket_path) as peer:
                if greet:
                    peer.hello()
                    if index % 2:  # half of them while holding a lease: it must be reaped
                        _grant, fds = peer.acquire()
                        hp.close_fds(fds)
                peer.send(data)
                try:
                    _closed_after_error(peer, ErrorCode.MALFORMED)
                except AssertionError as exc:
                    raise AssertionError(f"case {index} ({'after' if greet else 'before'} HELLO) {data[:40]!r}: {exc}") from None
            bystander.ping()
            _roundtrip(manager, good)

        # A zero-length SEQPACKET message reads like EOF: the manager may only close.
        with RawPeer(manager.socket_path) as peer:
            peer.hello()
            peer.send(b"")
            peer.expect_closed()
        bystander.ping()
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["protocol_errors"] >= len(cases)
    assert stats["counters"]["reaped_holder_closed"] >= len(_MALFORMED_AFTER_HELLO) // 2


def test_wrong_protocol_version_gets_version_error_and_is_closed(start_manager) -> None:
    manager, good, baseline = _start(start_manager)
    assert hp.BAD_VERSIONS
    for version in hp.BAD_VERSIONS:
        with RawPeer(manager.socket_path) as peer:
            peer.send(hp.frame(FrameType.HELLO, hp.hello()[protocol.HEADER.size:], version=version))
            error = _closed_after_error(peer, ErrorCode.VERSION)
            assert str(version) in error.message
        with RawPeer(manager.socket_path) as peer:
            peer.hello()
            _grant, fds = peer.acquire()
            hp.close_fds(fds)
            peer.send(hp.frame(FrameType.PING, version=version))
            _closed_after_error(peer, ErrorCode.VERSION)
        _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["reaped_holder_closed"] >= len(hp.BAD_VERSIONS)


def test_frames_out_of_order(start_manager) -> None:
    manager, good, baseline = _start(start_manager)
    before_hello = [
        protocol.encode_acquire(1000),
        protocol.encode_release(1, Outcome.CLEAN),
        protocol.encode_fetch_fd(1),
        protocol.encode_empty(FrameType.PING),
        protocol.encode_empty(FrameType.STATS),
        protocol.encode_json(FrameType.ADMIN, {"command": "pause"}),
    ]
    for data in before_hello:
        with RawPeer(manager.socket_path) as peer:
            peer.send(data)
            _closed_after_error(peer, ErrorCode.NOT_READY)
        _roundtrip(manager, good)

    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        peer.send(hp.hello())
        error = _closed_after_error(peer, ErrorCode.MALFORMED)
        assert "HELLO" in error.message
    _roundtrip(manager, good)

    # A second ACQUIRE while one waits: BUSY, and the connection keeps its place.
    with RawPeer(manager.socket_path) as first, RawPeer(manager.socket_path) as second, RawPeer(manager.socket_path) as third:
        grants = []
        for peer in (first, second):
            peer.hello()
            grant, fds = peer.acquire()
            hp.close_fds(fds)
            grants.append(grant)
        third.hello()
        third.send(protocol.encode_acquire(20_000))
        wait_for(lambda: manager.stats()["leases"]["waiting"] == 1, what="third peer waiting")
        third.send(protocol.encode_acquire(20_000))
        third.expect_error(ErrorCode.BUSY)
        first.send(protocol.encode_release(grants[0].lease_id, Outcome.CLEAN))
        frame_type, body, fds = third.recv()
        hp.close_fds(fds)
        assert frame_type == FrameType.GRANT, hp.describe(frame_type, body)
        third.send(protocol.encode_release(protocol.decode_grant(body).lease_id, Outcome.CLEAN))
        second.send(protocol.encode_release(grants[1].lease_id, Outcome.CLEAN))
        for peer in (first, second, third):
            peer.ping()  # no ERROR queued before the PONG: every release was applied
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


# ----- leases that are not yours ----------------------------------------------------------------


def test_releasing_an_unknown_foreign_or_released_lease_is_refused_and_not_applied(start_manager) -> None:
    manager, good, baseline = _start(start_manager)
    with RawPeer(manager.socket_path) as holder, RawPeer(manager.socket_path) as thief:
        holder.hello()
        thief.hello()
        grant, leased_fd = holder.acquire_fd()
        assert hp.redis_ping(leased_fd) == PONG

        for outcome in Outcome:  # a BROKEN or NEEDS_RESET release, if applied, would kill or reset it
            thief.send(protocol.encode_release(grant.lease_id, outcome))
            error = thief.expect_error(ErrorCode.RELEASE_REFUSED)
            assert error.lease_id == grant.lease_id
        thief.send(protocol.encode_fetch_fd(grant.lease_id))
        assert thief.expect_error(ErrorCode.UNKNOWN_LEASE).lease_id == grant.lease_id
        for unknown in (0, grant.lease_id + 1000, 2**64 - 1):
            thief.send(protocol.encode_release(unknown, Outcome.BROKEN))
            assert thief.expect_error(ErrorCode.RELEASE_REFUSED).lease_id == unknown
        thief.ping()  # refused, not closed

        # Not applied: the holder still has its lease and its connection works.
        stats = manager.stats()
        assert stats["leases"]["held"] == 1
        assert stats["counters"]["releases_refused"] == len(Outcome) + 3
        assert hp.redis_ping(leased_fd) == PONG
        holder.send(protocol.encode_fetch_fd(grant.lease_id))
        frame_type, body, again = holder.recv()
        assert frame_type == FrameType.GRANT and len(again) == 1, hp.describe(frame_type, body)
        assert hp.redis_ping(again[0]) == PONG
        hp.close_fds(again)
        _roundtrip(manager, good)  # the other slot serves the good client meanwhile

        holder.send(protocol.encode_release(grant.lease_id, Outcome.CLEAN))
        holder.ping()  # the release was accepted: no ERROR before the PONG
        assert manager.stats()["leases"]["held"] == 0
        for peer in (holder, thief):  # now already released, for everyone
            peer.send(protocol.encode_release(grant.lease_id, Outcome.CLEAN))
            assert peer.expect_error(ErrorCode.RELEASE_REFUSED).lease_id == grant.lease_id
            peer.ping()
        hp.close_fds([leased_fd])
    _roundtrip(manager, good)
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["reaped_holder_closed"] == 0  # nothing was torn down


# ----- clients that do not talk, or talk too slowly ---------------------------------------------


def test_silent_clients_are_closed_after_the_handshake_timeout(start_manager) -> None:
    timeout = 0.5
    manager, good, baseline = _start(start_manager, handshake_timeout=timeout)
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


def test_slow_drip_clients(start_manager) -> None:
    timeout = 0.5
    manager, good, baseline = _start(start_manager, handshake_timeout=timeout)

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
        peer.send(b"\x01")
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
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        pings = 0
        with pytest.raises((BrokenPipeError, ConnectionResetError, ConnectionRefusedError)):
            while pings < 1_000_000:
                peer.send(protocol.encode_empty(FrameType.PING))
                pings += 1
        assert pings > 10
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


# ----- grants nobody reads ------------------------------------------------------------------


_ACQUIRE_AND_HANG = """
import os, socket, sys, time
sys.path[:0] = [{tests!r}]
import hostile_peers as hp
from sharedpool import protocol
peer = hp.RawPeer(sys.argv[1])
peer.hello()
peer.send(protocol.encode_acquire(10_000))
print("acquired", flush=True)
time.sleep(60)
"""


def test_acquire_then_never_read_the_grant_and_go_away(start_manager) -> None:
    manager, good, baseline = _start(start_manager)

    # Closes its control connection with the GRANT (and its fd) unread.
    peer = RawPeer(manager.socket_path)
    peer.hello()
    peer.send(protocol.encode_acquire(10_000))
    wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="the lease granted")
    _roundtrip(manager, good)
    peer.close()
    stats = _at_rest(manager, baseline)
    assert stats["counters"]["reaped_holder_closed"] == 1
    _roundtrip(manager, good)

    # A process that is SIGKILLed with its GRANT unread.
    script = _ACQUIRE_AND_HANG.format(tests=os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", script, manager.socket_path], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "acquired"
        wait_for(lambda: manager.stats()["leases"]["held"] == 1, what="the child's lease granted")
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


def test_fds_sent_to_the_manager_never_stay_in_it(start_manager, tmp_path) -> None:
    manager, good, baseline = _start(start_manager)
    marker = tmp_path / f"passed-{uuid.uuid4().hex}"
    marker.write_text("if the manager keeps this open, it leaks")
    fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        cases: list[tuple[bool, bytes, list[int] | None]] = [
            (False, hp.hello(), [fd]),
            (True, protocol.encode_empty(FrameType.PING), [fd]),
            (True, protocol.encode_acquire(1000), [fd, fd]),
            (True, protocol.encode_release(1, Outcome.CLEAN), [left.fileno()]),
            (True, hp.frame(SOME_UNKNOWN_TYPE), [fd] * 250),
            (True, protocol.encode_empty(FrameType.STATS), None),  # None: its own control socket
        ]
        for index, (greet, data, fds) in enumerate(cases):
            with RawPeer(manager.socket_path) as peer:
                if greet:
                    peer.hello()
                peer.send(data, fds if fds is not None else [peer.sock.fileno()])
                try:
                    _closed_after_error(peer, ErrorCode.MALFORMED)
                except AssertionError as exc:
                    raise AssertionError(f"case {index}: {exc}") from None
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


def test_a_thousand_idle_control_connections(start_manager) -> None:
    max_clients, flood = 50, 1000
    manager, good, baseline = _start(start_manager, max_clients=max_clients, handshake_timeout=60)
    observer = RawPeer(manager.socket_path)
    peers: list[RawPeer] = []
    try:
        observer.hello()
        _wait_fds(manager, baseline + 1)  # exactly two control connections now: good's and ours
        for batch in range(flood // 100):
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
            frame_type, body = peer.recv_no_fd()
            if frame_type == FrameType.WELCOME:
                welcomed += 1
            else:
                assert frame_type == FrameType.ERROR, hp.describe(frame_type, body)
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


def test_a_worker_refused_for_max_clients_is_told_why(start_manager) -> None:
    manager, good, baseline = _start(start_manager, max_clients=2)
    with RawPeer(manager.socket_path) as filler:
        filler.hello()
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
    max_leaves=16,
)
_valid_frames = st.one_of(
    st.builds(lambda d: protocol.encode_json(FrameType.HELLO, d), st.dictionaries(st.text(max_size=8), _json, max_size=4)),
    st.builds(lambda d: protocol.encode_json(FrameType.ADMIN, d), st.dictionaries(st.text(max_size=8), _json, max_size=4)),
    st.builds(protocol.encode_acquire, st.integers(0, protocol.DEFAULT_TIMEOUT), st.text(max_size=40)),
    st.builds(protocol.encode_grant, _u64, _u32, _u32, st.booleans()),
    st.builds(protocol.encode_release, _u64, st.sampled_from(Outcome)),
    st.builds(protocol.encode_fetch_fd, _u64),
    st.builds(protocol.encode_error, st.sampled_from(ErrorCode), st.text(max_size=40), _u64),
    st.builds(protocol.encode_revoked, _u64, st.text(max_size=40)),
    st.builds(protocol.encode_empty, st.sampled_from([FrameType.PING, FrameType.PONG, FrameType.STATS])),
)


@st.composite
def _mutated_frames(draw: Any) -> bytes:
    data = bytearray(draw(_valid_frames))
    for op, where, value in draw(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2**16), st.binary(max_size=12)), min_size=1, max_size=4)):
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


_DECODERS = (
    protocol.decode_json, protocol.decode_acquire, protocol.decode_grant, protocol.decode_release,
    protocol.decode_fetch_fd, protocol.decode_error, protocol.decode_revoked,
)


def _decode_everything(data: bytes) -> None:
    """What the manager and the client do with a frame: only ProtocolError may come out."""
    try:
        _version, _frame_type, body = protocol.split(data)
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
@example(hp.frame(FrameType.RELEASE, bytes(8) + bytes([0xFF])), 0)
def test_decoders_raise_only_protocol_error(data: bytes, flags: int) -> None:
    _decode_everything(data)
    try:
        protocol.check_recv_flags(flags)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(
    st.sampled_from([socket.SOL_SOCKET, 0, 41]), st.sampled_from([socket.SCM_RIGHTS, socket.SCM_CREDENTIALS, 0]), st.binary(max_size=40),
), max_size=3))
def test_ancillary_data_decodes_to_ints_only(ancdata: list[tuple[int, int, bytes]]) -> None:
    fds = protocol.fds_from_ancillary(ancdata)
    assert all(isinstance(fd, int) for fd in fds)
    rights = sum(len(data) // 4 for level, kind, data in ancdata if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS))
    assert len(fds) == rights


@settings(max_examples=100, deadline=None, database=None)
@given(_valid_frames)
def test_valid_frames_split_and_decode(data: bytes) -> None:
    version, frame_type, body = protocol.split(data)
    assert version == protocol.VERSION
    decoder = {
        FrameType.HELLO: protocol.decode_json, FrameType.ADMIN: protocol.decode_json,
        FrameType.ACQUIRE: protocol.decode_acquire, FrameType.GRANT: protocol.decode_grant,
        FrameType.RELEASE: protocol.decode_release, FrameType.FETCH_FD: protocol.decode_fetch_fd,
        FrameType.ERROR: protocol.decode_error, FrameType.REVOKED: protocol.decode_revoked,
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
        try:
            if ops % 3 == 0:
                with r.pipeline() as pipe:
                    got = pipe.set(key, value).get(key).execute()[1]
            elif ops % 3 == 1:
                with r.lease() as pinned:
                    pinned.set(key, value)
                    got = pinned.get(key)
            else:
                r.set(key, value)
                got = r.get(key)
            if got != value:
                failures.append(f"{key}: wrote {value!r}, read {got!r}")
        except Exception as exc:
            failures.append(f"{key}: {type(exc).__name__}: {exc}")
        ops += 1
    r.close()
    report.put({"worker": worker, "ops": ops, "failures": failures})


@pytest.mark.slow
def test_live_fuzz_while_good_workers_run(start_manager, admin: redis.Redis) -> None:
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
    assert {"MALFORMED", "UNSUPPORTED", "WELCOME"} <= replies, f"{replies} {where}"

    _at_rest(manager, baseline)
    stats = manager.stats()
    assert stats["counters"]["protocol_errors"] > 0
    assert stats["control_connections"] == 1  # only the stats channel itself
    wait_for(lambda: len(manager_clients(admin, manager.pool_name)) == slots, what=f"{slots} Redis connections {where}")
    good = sharedpool.Redis(socket_path=manager.socket_path, decode_responses=True)
    try:
        _roundtrip(manager, good)
    finally:
        good.close()


# ----- regressions: bugs these tests found, now fixed --------------------------------------------

_DEEP = b"[" * 100_000


def test_decode_json_refuses_deep_nesting_with_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_json(_DEEP)


def test_deeply_nested_json_does_not_crash_the_manager(start_manager) -> None:
    manager, good, baseline = _start(start_manager)
    for greet, frame_type in ((False, FrameType.HELLO), (True, FrameType.ADMIN)):
        with RawPeer(manager.socket_path) as peer:
            if greet:
                peer.hello()
            peer.send(hp.frame(frame_type, _DEEP[: protocol.MAX_FRAME - protocol.HEADER.size]))
            try:
                _closed_after_error(peer, ErrorCode.MALFORMED)
            except Closed:
                pass
        _roundtrip(manager, good)
    _at_rest(manager, baseline)


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


def test_stats_with_many_worker_processes_does_not_crash_the_manager(start_manager) -> None:
    manager, good, baseline = _start(start_manager)
    observer = RawPeer(manager.socket_path)
    observer.hello()
    processes = 800  # each adds ~95 bytes to the STATS reply: 800 is well past 64 KiB
    holder = subprocess.Popen(
        [sys.executable, "-c", _MANY_WORKERS, manager.socket_path, str(processes), hp.hello(0).hex()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "connected"
        _wait_fds(manager, baseline + 1 + processes)
        observer.send(protocol.encode_empty(FrameType.STATS))
        try:  # a reply or a clean ERROR; never a dead manager
            frame_type, body = observer.recv_no_fd()
            assert frame_type in (FrameType.STATS_REPLY, FrameType.ERROR), hp.describe(frame_type, body)
        except Closed:
            pass
        _roundtrip(manager, good)
    finally:
        holder.communicate("", timeout=30)  # EOF on its stdin: it exits, closing them all
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
        wait_for(lambda: manager.process.poll() is not None, timeout=seconds, what="the manager to exit")
    except AssertionError:
        return  # still running, as it should be
    _alive(manager)


@pytest.mark.parametrize("trigger", ["hello", "sweep"])
def test_fd_exhaustion_does_not_crash_the_manager(start_manager, trigger: str) -> None:
    manager, good, baseline = _start(start_manager, max_connections=2, handshake_timeout=60, reap_interval=0.2)
    with contextlib.ExitStack() as stack:
        pinned = stack.enter_context(good.lease()) if trigger == "sweep" else None  # what the sweep looks at
        if pinned is not None:
            pinned.set("exhausted", "yes")
        with _exhausted_fds(manager, spare=4) as (_process, peers):
            if trigger == "hello":
                peers[0].send(hp.hello())  # accepted before the table filled
                try:
                    frame_type, body = peers[0].recv_no_fd()
                    assert frame_type in (FrameType.WELCOME, FrameType.ERROR), hp.describe(frame_type, body)
                except Closed:
                    pass
            _survives(manager, 1.5)  # several sweeps (reap_interval 0.2 s) with the table full
            if pinned is not None:
                assert pinned.get("exhausted") == "yes"
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


def test_fd_exhaustion_does_not_spin_the_accept_loop(start_manager) -> None:
    manager, good, baseline = _start(start_manager, max_connections=1, handshake_timeout=60)
    with _exhausted_fds(manager, spare=4) as (process, _peers):
        logged = _log_count(manager, "cannot accept control connection")
        # A measurement window (not a wait for a condition): CPU used and errors logged over 1 s.
        cpu = process.cpu_percent(interval=1.0)
        logged = _log_count(manager, "cannot accept control connection") - logged
        _alive(manager)
        assert cpu < 50 and logged < 20, f"out of fds, the manager used {cpu:.0f}% CPU and logged {logged} accept errors in 1 s"
    _roundtrip(manager, good)
    _at_rest(manager, baseline)


def test_holder_dropped_while_refetching_its_fd_has_its_lease_reaped(start_manager) -> None:
    manager, good, baseline = _start(start_manager)
    with RawPeer(manager.socket_path) as peer:
        peer.hello()
        grant, leased_fd = peer.acquire_fd()  # kept: a holder may have a command in flight on it
        try:
            # Asks for its fd again and again and reads nothing: every answer carries an fd,
            # queued on a socket nobody reads, until the manager gives up on it.
            asked = 0
            with pytest.raises((BrokenPipeError, ConnectionResetError, ConnectionRefusedError)):
                while asked < 1_000_000:
                    peer.send(protocol.encode_fetch_fd(grant.lease_id))
                    asked += 1
            _roundtrip(manager, good)
            stats = _at_rest(manager, baseline)
            # protocol.py: "When that connection closes, every lease it held is abandoned:
            # the connection is shut down and replaced, because a reply may still be in flight."
            assert stats["counters"]["reaped_holder_closed"] == 1, stats["counters"]
            try:
                answer = hp.redis_ping(leased_fd)
            except OSError:
                answer = b""
            assert answer == b"", "the dropped holder's Redis connection was not shut down: it is back in the pool"
        finally:
            hp.close_fds([leased_fd])
    _roundtrip(manager, good)
    _at_rest(manager, baseline)
