"""The wire format (protocol version 2), over a real SOCK_SEQPACKET socketpair
with real fd passing; the codecs by example and by property."""

from __future__ import annotations

import array
import os
import re
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sharedpool import protocol
from sharedpool import table as tbl
from sharedpool.protocol import ErrorCode, FrameType, Outcome, ProtocolError, Report, ReportCause

_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(manager end, worker end) of a real AF_UNIX SOCK_SEQPACKET connection."""
    manager_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    manager_end.settimeout(5.0)
    worker_end.settimeout(5.0)
    yield manager_end, worker_end
    manager_end.close()
    worker_end.close()


def send(sock: socket.socket, frame: bytes, fds: list[int] | None = None) -> None:
    if fds:
        sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(frame)


def receive(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """One frame as the manager and the client read it: (data, fds, flags)."""
    data, anc, flags, _ = sock.recvmsg(protocol.MAX_FRAME, protocol.FD_ANCILLARY_SPACE, protocol.RECV_FLAGS)
    return data, protocol.fds_from_ancillary(anc), flags


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# ----- the frame ------------------------------------------------------------------


def test_header_layout_is_version_type_reserved_request_id() -> None:
    assert protocol.VERSION == 2 and protocol.SUPPORTED_VERSIONS == (2,)
    assert protocol.HEADER.size == 8
    assert protocol.header(FrameType.FETCH_FD, 0x01020304) == b"\x02\x03\x00\x00\x01\x02\x03\x04"
    assert protocol.encode_empty(FrameType.PING) == b"\x02\x0a\x00\x00\x00\x00\x00\x00"
    assert protocol.split(protocol.header(FrameType.PONG, 2**32 - 1)) == (2, FrameType.PONG, 2**32 - 1, b"")


def test_frame_types_are_the_spec_table() -> None:
    """The module docstring is the spec: its table of types and the enum agree."""
    doc = protocol.__doc__ or ""
    table = {name: int(code) for code, name in re.findall(r"^(\d+)\s+([A-Z_]+)\s+(?:c->s|s->c)\s", doc, re.M)}
    assert table == {t.name: int(t) for t in FrameType}
    # Version 1's ERROR code, which encode_v1_refusal keeps, and the first frames never move.
    assert (FrameType.HELLO, FrameType.WELCOME, FrameType.ERROR) == (1, 2, 7)
    assert not set(FrameType) & set(protocol.UNSOLICITED_TYPES)


def test_split_refuses_short_and_oversized_frames() -> None:
    for short in (b"", b"\x02", protocol.header(FrameType.PING)[:7]):
        with pytest.raises(ProtocolError, match="shorter than its header"):
            protocol.split(short)
    at_cap = protocol.header(FrameType.PING) + bytes(protocol.MAX_FRAME - protocol.HEADER.size)
    assert protocol.split(at_cap)[3] == bytes(protocol.MAX_FRAME - protocol.HEADER.size)
    with pytest.raises(ProtocolError, match=f"exceeds the {protocol.MAX_FRAME}-byte cap"):
        protocol.split(at_cap + b"x")


def test_split_returns_other_versions_for_the_caller_to_refuse() -> None:
    assert protocol.split(b"\x03\x01\x00\x00\x00\x00\x00\x07{}") == (3, 1, 7, b"{}")
    assert protocol.split(b"\x00\x0a\x00\x00\x00\x00\x00\x00")[0] == 0


# ----- over a real socketpair -------------------------------------------------------------


def test_fd_frame_carries_its_fd_and_seqpacket_keeps_boundaries(pair: tuple[socket.socket, socket.socket]) -> None:
    manager_end, worker_end = pair
    redis_side, manager_conn = socket.socketpair()  # stands in for a Redis connection
    try:
        send(manager_end, protocol.encode_slot(FrameType.FD, 3, 17, request_id=41), [manager_conn.fileno()])
        send(manager_end, protocol.encode_empty(FrameType.PONG, request_id=42))
        send(manager_end, protocol.encode_error(ErrorCode.STALE, "slot 3 generation 16 is not open", request_id=43))

        data, fds, flags = receive(worker_end)  # one recv, one frame: never the next one with it
        protocol.check_recv_flags(flags)
        assert protocol.split(data)[:3] == (protocol.VERSION, FrameType.FD, 41)
        assert protocol.decode_slot(protocol.split(data)[3]) == (3, 17)
        assert len(fds) == 1
        # The fd is a dup of the manager's connection: speak through it, read at the other side.
        leased = socket.socket(fileno=fds[0])
        try:
            assert not os.get_inheritable(leased.fileno())  # MSG_CMSG_CLOEXEC
            leased.settimeout(5.0)
            leased.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert redis_side.recv(64) == b"*1\r\n$4\r\nPING\r\n"
            redis_side.sendall(b"+PONG\r\n")
            assert manager_conn.recv(64) == b"+PONG\r\n"  # one open file description, two fds
        finally:
            leased.close()

        data, fds, flags = receive(worker_end)
        protocol.check_recv_flags(flags)
        assert fds == []
        assert protocol.split(data) == (protocol.VERSION, FrameType.PONG, 42, b"")
        data, fds, _ = receive(worker_end)
        error = protocol.decode_error(protocol.split(data)[3])
        assert (protocol.split(data)[2], error.code, error.message) == (43, ErrorCode.STALE, "slot 3 generation 16 is not open")
    finally:
        redis_side.close()
        manager_conn.close()


def test_welcome_carries_the_lease_table_memfd(pair: tuple[socket.socket, socket.socket]) -> None:
    manager_end, worker_end = pair
    table = tbl.Table.create(4, 2, 2, b"epoch-of-a-test!")
    try:
        welcome = {"epoch": "e1", "table": {"capacity": 4, "waiter_capacity": 2, "layout": tbl.LAYOUT_VERSION}, "new-key": [1]}
        send(manager_end, protocol.encode_json(FrameType.WELCOME, welcome, request_id=1), [table.fd])
        data, fds, flags = receive(worker_end)
        protocol.check_recv_flags(flags)
        version, frame_type, request_id, body = protocol.split(data)
        assert (version, frame_type, request_id) == (2, FrameType.WELCOME, 1)
        got = protocol.decode_json(body)
        assert got == welcome
        (memfd,) = fds
        theirs = tbl.Table(memfd, got["table"]["capacity"], got["table"]["waiter_capacity"])
        try:
            # One file: a row written by the manager is read by the worker.
            table.write_row(2, tbl.Row(tbl.RowState.READY, 5, lease_seq=9))
            assert theirs.row(2) == tbl.Row(tbl.RowState.READY, 5, lease_seq=9)
        finally:
            theirs.close()  # closes memfd
    finally:
        table.close()


def test_request_ids_survive_a_round_trip(pair: tuple[socket.socket, socket.socket]) -> None:
    manager_end, worker_end = pair
    requests = [
        (protocol.encode_slot(FrameType.FETCH_FD, 1, 2, request_id=1), FrameType.FETCH_FD),
        (protocol.header(FrameType.DEMAND, 2**31), FrameType.DEMAND),
        (protocol.header(FrameType.STATS, 2**32 - 1), FrameType.STATS),
        (protocol.encode_json(FrameType.ADMIN, {"command": "pause"}, request_id=77), FrameType.ADMIN),
    ]
    for frame, _ in requests:
        send(worker_end, frame)
    for frame, frame_type in requests:
        data, fds, flags = receive(manager_end)
        protocol.check_recv_flags(flags)
        assert fds == [] and data == frame
        version, got_type, request_id, _body = protocol.split(data)
        assert (version, got_type) == (2, frame_type)
        send(manager_end, protocol.encode_empty(FrameType.ACK, request_id))
    for frame, _ in requests:
        asked = protocol.split(frame)[2]
        assert protocol.split(receive(worker_end)[0])[:3] == (2, FrameType.ACK, asked)


def test_a_frame_over_the_cap_is_flagged_truncated(pair: tuple[socket.socket, socket.socket]) -> None:
    manager_end, worker_end = pair
    worker_end.send(protocol.header(FrameType.PING) + bytes(protocol.MAX_FRAME))
    data, fds, flags = receive(manager_end)
    assert len(data) == protocol.MAX_FRAME and flags & socket.MSG_TRUNC
    with pytest.raises(ProtocolError, match="frame truncated"):
        protocol.check_recv_flags(flags)
    # The rest of the cut frame is gone, never read as (part of) the next one.
    # (Sent only now: a 64 KiB frame fills a socketpair's send buffer until read.)
    worker_end.send(protocol.encode_empty(FrameType.PING, 5))
    data, _fds, flags = receive(manager_end)
    protocol.check_recv_flags(flags)
    assert protocol.split(data)[2] == 5


def test_too_many_fds_are_flagged_and_the_ones_received_can_be_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    manager_end, worker_end = pair
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        send(worker_end, protocol.encode_empty(FrameType.PING), [devnull] * 3)
        send(worker_end, protocol.encode_empty(FrameType.PING), [devnull] * 2)  # fits the space
        data, fds, flags = receive(manager_end)
        close_all(fds)
        assert len(fds) <= 2 and flags & socket.MSG_CTRUNC
        with pytest.raises(ProtocolError, match="more fds than a frame may carry"):
            protocol.check_recv_flags(flags)
        data, fds, flags = receive(manager_end)
        close_all(fds)
        assert len(fds) == 2
        protocol.check_recv_flags(flags)
    finally:
        os.close(devnull)


@pytest.mark.parametrize("flags, match", [
    (socket.MSG_TRUNC, "truncated"),
    (socket.MSG_CTRUNC, "ancillary"),
    (socket.MSG_TRUNC | socket.MSG_CTRUNC, "truncated"),
])
def test_check_recv_flags(flags: int, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.check_recv_flags(int(flags))


def test_check_recv_flags_accepts_harmless_flags() -> None:
    protocol.check_recv_flags(0)
    protocol.check_recv_flags(int(socket.MSG_EOR))  # SEQPACKET marks every record's end
    protocol.check_recv_flags(protocol.RECV_FLAGS)


# ----- version 1 peers ---------------------------------------------------------------------------

_V1_HELLO = struct.pack("!BBH", 1, 1, 0) + b'{"pid": 1234, "client": "sharedpool/0.0.9"}'


def test_a_version_1_frame_is_recognised_as_version_1() -> None:
    assert protocol.split(_V1_HELLO) == (1, 1, 0, b"")
    assert protocol.split(b"\x01") == (1, 0, 0, b"")  # even one byte says which version
    assert protocol.split(struct.pack("!BBH", 1, 10, 0)) == (1, 10, 0, b"")


def test_a_v1_refusal_is_readable_by_the_v1_layout(pair: tuple[socket.socket, socket.socket]) -> None:
    manager_end, old_client = pair
    message = "this manager speaks sharedpool protocol 2, the client speaks 1: run the same sharedpool version"
    send(manager_end, protocol.encode_v1_refusal(message))
    data = old_client.recv(protocol.MAX_FRAME)
    # What a version-1 client does: a 4-byte header, then an ERROR body of !HQ and text.
    version, frame_type, _length = struct.unpack_from("!BBH", data)
    code, lease = struct.unpack_from("!HQ", data, 4)
    assert (version, frame_type) == (1, 7)  # v1's ERROR was 7 too
    assert (code, lease) == (ErrorCode.VERSION, 0)
    assert data[4 + 10:].decode() == message


# ----- codecs by example ---------------------------------------------------------------------


def test_slot_round_trip() -> None:
    for frame_type in (FrameType.FETCH_FD, FrameType.FD):
        frame = protocol.encode_slot(frame_type, 2**32 - 1, 0, request_id=9)
        assert len(frame) == 16
        assert protocol.split(frame)[:3] == (2, frame_type, 9)
        assert protocol.decode_slot(protocol.split(frame)[3]) == (2**32 - 1, 0)


def test_report_round_trip() -> None:
    frame = protocol.encode_report(5, 6, 2**64 - 1, Outcome.NEEDS_RESET, ReportCause.HOLDER_GONE)
    version, frame_type, request_id, body = protocol.split(frame)
    assert (version, frame_type, request_id, len(body)) == (2, FrameType.REPORT, 0, 18)
    report = protocol.decode_report(body)
    assert report == Report(5, 6, 2**64 - 1, Outcome.NEEDS_RESET, ReportCause.HOLDER_GONE)
    assert type(report.outcome) is Outcome and type(report.cause) is ReportCause


_NO_OUTCOME, _NO_CAUSE = max(Outcome) + 1, max(ReportCause) + 1


@pytest.mark.parametrize("outcome, cause", [(_NO_OUTCOME, 0), (255, 0), (0, _NO_CAUSE), (2, 255)])
def test_report_out_of_range_is_refused(outcome: int, cause: int) -> None:
    body = struct.pack("!IIQBB", 1, 1, 1, outcome, cause)
    with pytest.raises(ProtocolError, match="out of range"):
        protocol.decode_report(body)


def test_site_round_trip_and_its_cap() -> None:
    frame = protocol.encode_site(7, "app/views.py:88 in checkout")
    assert protocol.split(frame)[:3] == (2, FrameType.SITE, 0)
    assert protocol.decode_site(protocol.split(frame)[3]) == (7, "app/views.py:88 in checkout")
    long = protocol.encode_site(1, "é" * 1000)  # 2000 bytes of UTF-8
    assert len(long) == protocol.HEADER.size + 4 + protocol.MAX_SITE
    assert protocol.decode_site(protocol.split(long)[3]) == (1, "é" * (protocol.MAX_SITE // 2))
    # A reader caps what it keeps too, and never fails on bad UTF-8.
    body = struct.pack("!I", 3) + b"\xff\xfe" + b"x" * 10_000
    site_id, text = protocol.decode_site(body)
    assert site_id == 3 and text == "\ufffd\ufffd" + "x" * (protocol.MAX_SITE - 2)
    assert protocol.decode_site(struct.pack("!I", 4)) == (4, "")


def test_error_round_trip_and_a_message_too_long_for_a_frame() -> None:
    frame = protocol.encode_error(ErrorCode.REDIS_UNAVAILABLE, "Redis at x unreachable", request_id=3, lease_seq=8)
    version, frame_type, request_id, body = protocol.split(frame)
    assert (version, frame_type, request_id) == (2, FrameType.ERROR, 3)
    assert protocol.decode_error(body) == protocol.ErrorFrame(ErrorCode.REDIS_UNAVAILABLE, 8, "Redis at x unreachable")
    huge = protocol.encode_error(ErrorCode.INTERNAL, "ü" * protocol.MAX_FRAME)
    assert len(huge) <= protocol.MAX_FRAME
    error = protocol.decode_error(protocol.split(huge)[3])  # cut mid-character: still decodes
    assert error.code == ErrorCode.INTERNAL and error.message.startswith("üüü")


def test_json_round_trip_ignores_nothing_and_refuses_what_is_no_object() -> None:
    payload = {"pid": 12, "client": "sharedpool/0.1.0", "unknown": {"nested": [1, 2.5, None, True]}, "ü": "ß"}
    frame = protocol.encode_json(FrameType.HELLO, payload, request_id=4)
    assert protocol.split(frame)[:3] == (2, FrameType.HELLO, 4)
    assert protocol.decode_json(protocol.split(frame)[3]) == payload
    with pytest.raises(ValueError, match=f"exceeds {protocol.MAX_FRAME}"):
        protocol.encode_json(FrameType.STATS_REPLY, {"x": "y" * protocol.MAX_FRAME})


@pytest.mark.parametrize("body, match", [
    (b"[1, 2]", "JSON list, expected an object"),
    (b"null", "JSON NoneType"),
    (b'"text"', "JSON str"),
    (b"", "not UTF-8 JSON"),
    (b"{", "not UTF-8 JSON"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"[" * 100_000, "nested too deeply|not UTF-8 JSON"),
])
def test_json_garbage_is_a_protocol_error(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_json(body)


@pytest.mark.parametrize("decode, sizes", [
    (protocol.decode_slot, (0, 7, 9, 64)),
    (protocol.decode_report, (0, 17, 19)),
    (protocol.decode_site, (0, 3)),
    (protocol.decode_error, (0, 9)),
])
def test_fixed_bodies_of_the_wrong_size_are_protocol_errors(decode, sizes: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    for size in sizes:
        with pytest.raises(ProtocolError, match=f"of {size} bytes"):
            decode(bytes(size))


def test_fds_from_ancillary_reads_only_scm_rights() -> None:
    rights = array.array("i", [5, 6]).tobytes()
    assert protocol.fds_from_ancillary([(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights + b"\x01\x02")]) == [5, 6]
    assert protocol.fds_from_ancillary([(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, rights)]) == []
    assert protocol.fds_from_ancillary([]) == []


# ----- codecs by property -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None, database=None)
@given(_u32, _u32, _u32, st.sampled_from([FrameType.FETCH_FD, FrameType.FD]))
def test_slot_round_trips(slot: int, generation: int, request_id: int, frame_type: FrameType) -> None:
    version, got_type, got_id, body = protocol.split(protocol.encode_slot(frame_type, slot, generation, request_id))
    assert (version, got_type, got_id, protocol.decode_slot(body)) == (2, frame_type, request_id, (slot, generation))


@settings(max_examples=200, deadline=None, database=None)
@given(_u32, _u32, _u64, st.sampled_from(Outcome), st.sampled_from(ReportCause))
def test_report_round_trips(slot: int, generation: int, seq: int, outcome: Outcome, cause: ReportCause) -> None:
    body = protocol.split(protocol.encode_report(slot, generation, seq, outcome, cause))[3]
    assert protocol.decode_report(body) == Report(slot, generation, seq, outcome, cause)


@settings(max_examples=200, deadline=None, database=None)
@given(_u32, st.text(max_size=700))
def test_site_round_trips(site_id: int, text: str) -> None:
    body = protocol.split(protocol.encode_site(site_id, text))[3]
    # Cut at MAX_SITE bytes, perhaps mid-character: the cut character reads as U+FFFD.
    expected = text.encode("utf-8")[: protocol.MAX_SITE].decode("utf-8", "replace")
    assert protocol.decode_site(body) == (site_id, expected)


@settings(max_examples=200, deadline=None, database=None)
@given(st.sampled_from(ErrorCode), st.text(max_size=200), _u32, _u64)
def test_error_round_trips(code: ErrorCode, message: str, request_id: int, seq: int) -> None:
    _v, _t, got_id, body = protocol.split(protocol.encode_error(code, message, request_id, seq))
    assert got_id == request_id and protocol.decode_error(body) == protocol.ErrorFrame(code, seq, message)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None, database=None)
@given(st.dictionaries(st.text(max_size=8), _json_values, max_size=5), _u32)
def test_json_round_trips(payload: dict, request_id: int) -> None:  # type: ignore[type-arg]
    _v, _t, got_id, body = protocol.split(protocol.encode_json(FrameType.ADMIN, payload, request_id))
    assert got_id == request_id and protocol.decode_json(body) == payload


_DECODERS = (protocol.decode_slot, protocol.decode_report, protocol.decode_site, protocol.decode_error, protocol.decode_json)


@settings(max_examples=400, deadline=None, database=None)
@given(st.binary(max_size=80) | st.builds(lambda b: protocol.header(FrameType.REPORT) + b, st.binary(max_size=24)))
@example(b"\x01")
@example(b"[" * 5000)
@example(b'{"pid": 1e999}')
@example(struct.pack("!IIQBB", 1, 1, 1, 9, 9))
@example(struct.pack("!I", 1) + b"\xc3")
def test_decoders_raise_only_protocol_error(data: bytes) -> None:
    """What the manager does with any frame: split, then any decoder; only ProtocolError may come out."""
    bodies = [data]
    try:
        bodies.append(protocol.split(data)[3])
    except ProtocolError:
        pass
    for body in bodies:
        for decode in _DECODERS:
            try:
                decode(body)
            except ProtocolError:
                pass


@settings(max_examples=200, deadline=None, database=None)
@given(st.integers(0, 2**31 - 1))
def test_check_recv_flags_raises_only_protocol_error(flags: int) -> None:
    try:
        protocol.check_recv_flags(flags)
    except ProtocolError:
        assert flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    else:
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)

