"""The wire format, over a real socketpair with real fd passing."""

from __future__ import annotations

import array
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedpool import protocol
from sharedpool.protocol import FrameType, Outcome, ProtocolError


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def test_grant_with_fd_arrives_with_its_frame() -> None:
    manager_end, worker_end = _pair()
    reader, writer = os.pipe()
    try:
        frame = protocol.encode_grant(7, 3, 2, True)
        manager_end.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [writer]))])
        manager_end.send(protocol.encode_grant(8, 3, 2, False))
        data, anc, flags, _ = worker_end.recvmsg(protocol.MAX_FRAME, protocol.FD_ANCILLARY_SPACE)
        protocol.check_recv_flags(flags)
        version, frame_type, body = protocol.split(data)
        assert (version, frame_type) == (protocol.VERSION, FrameType.GRANT)
        assert protocol.decode_grant(body) == protocol.Grant(7, 3, 2, True)
        (passed,) = protocol.fds_from_ancillary(anc)
        os.write(passed, b"through the passed fd")
        os.close(passed)
        assert os.read(reader, 100) == b"through the passed fd"
        # The second frame is separate and carries no fd: SEQPACKET keeps boundaries.
        data, anc, flags, _ = worker_end.recvmsg(protocol.MAX_FRAME, protocol.FD_ANCILLARY_SPACE)
        assert protocol.fds_from_ancillary(anc) == []
        assert protocol.decode_grant(protocol.split(data)[2]) == protocol.Grant(8, 3, 2, False)
    finally:
        for fd in (reader, writer):
            os.close(fd)
        manager_end.close()
        worker_end.close()


def test_oversized_frame_is_reported_truncated() -> None:
    a, b = _pair()
    try:
        a.send(b"\x01\x03\x00\x00" + b"x" * protocol.MAX_FRAME)
        data, _anc, flags, _ = b.recvmsg(protocol.MAX_FRAME)
        with pytest.raises(ProtocolError, match="truncated"):
            protocol.check_recv_flags(flags)
    finally:
        a.close()
        b.close()


def test_round_trips() -> None:
    assert protocol.decode_acquire(protocol.encode_acquire(1500, "app.py:3")[4:]) == (1500, "app.py:3")
    assert protocol.decode_release(protocol.encode_release(99, Outcome.NEEDS_RESET)[4:]) == (99, Outcome.NEEDS_RESET)
    assert protocol.decode_fetch_fd(protocol.encode_fetch_fd(5)[4:]) == 5
    error = protocol.decode_error(protocol.encode_error(protocol.ErrorCode.TIMEOUT, "no lease", 4)[4:])
    assert (error.code, error.lease_id, error.message) == (protocol.ErrorCode.TIMEOUT, 4, "no lease")
    assert protocol.decode_json(protocol.encode_json(FrameType.HELLO, {"pid": 1})[4:]) == {"pid": 1}


@pytest.mark.parametrize(
    "frame_type, body",
    [
        (FrameType.GRANT, b"\x00" * 5),
        (FrameType.RELEASE, b"\x00" * 8 + b"\x07"),  # outcome 7 does not exist
        (FrameType.RELEASE, b""),
        (FrameType.ACQUIRE, b"\x00"),
        (FrameType.FETCH_FD, b"\x00" * 3),
        (FrameType.ERROR, b"\x00"),
        (FrameType.HELLO, b"[1, 2]"),
        (FrameType.HELLO, b"\xff\xfe"),
    ],
)
def test_malformed_bodies_raise_protocol_error(frame_type: FrameType, body: bytes) -> None:
    decoders = {
        FrameType.GRANT: protocol.decode_grant,
        FrameType.RELEASE: protocol.decode_release,
        FrameType.ACQUIRE: protocol.decode_acquire,
        FrameType.FETCH_FD: protocol.decode_fetch_fd,
        FrameType.ERROR: protocol.decode_error,
        FrameType.HELLO: protocol.decode_json,
    }
    with pytest.raises(ProtocolError):
        decoders[frame_type](body)


def test_short_frame_refused() -> None:
    with pytest.raises(ProtocolError, match="shorter than its header"):
        protocol.split(b"\x01")


_DECODERS = [
    protocol.decode_grant, protocol.decode_release, protocol.decode_acquire,
    protocol.decode_fetch_fd, protocol.decode_error, protocol.decode_json,
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decoders_never_raise_anything_but_protocol_error(body: bytes) -> None:
    for decode in _DECODERS:
        try:
            decode(body)
        except ProtocolError:
            pass
