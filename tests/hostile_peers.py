"""Hostile peers for ``test_hostile.py``: raw control connections, frame
generators and mutators, and a look at the manager's fd table.

Everything here speaks the wire format of ``sharedpool/protocol.py``
(version 2) by hand, over ``socket.socket(AF_UNIX, SOCK_SEQPACKET)``, so
that it can send what the real client never would. A peer that said HELLO
has the lease table (the memfd WELCOME carried) and can take a lease the
way the real client does: lock the slot's byte on its own open file
description, write the row, ask FETCH_FD for the fd.
"""

from __future__ import annotations

import array
import errno
import itertools
import json
import os
import random
import re
import socket
import struct
import time
from typing import Any, NamedTuple

import psutil

from sharedpool import protocol
from sharedpool import table as tbl
from sharedpool.protocol import ErrorCode, FrameType, Outcome, ReportCause
from sharedpool.table import RowState

# Frame types this protocol version does not define: the manager must answer
# them with ERROR UNSUPPORTED and keep the connection.
UNKNOWN_TYPES = tuple(t for t in range(256) if t not in {int(f) for f in FrameType})
# Types a worker never sends (the manager's own frames, "s->c" in the spec), bounced back at it.
SERVER_TYPES = tuple(
    FrameType[name] for name in re.findall(r"^\d+\s+([A-Z_]+)\s+s->c\s", protocol.__doc__ or "", re.M)
)
assert FrameType.WELCOME in SERVER_TYPES and FrameType.FD in SERVER_TYPES
# Version 1 is refused in its own framing (see v1_frame); these get a version-2 ERROR.
BAD_VERSIONS = tuple(v for v in (0, protocol.VERSION + 1, 0x7F, 0xFF) if v not in protocol.SUPPORTED_VERSIONS)

_ANCILLARY = socket.CMSG_SPACE(struct.calcsize("i") * 256)
_TIMEVAL = struct.Struct("ll")
_V1_HEADER = struct.Struct("!BBH")
_V1_ERROR = struct.Struct("!HQ")


# ----- the manager's fd table -------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:  # closed while we looked
            pass
    return targets


# ----- frames -------------------------------------------------------------------


def frame(frame_type: int, body: bytes = b"", version: int = protocol.VERSION, reserved: int = 0, request_id: int = 0) -> bytes:
    """Any header at all, including ones ``protocol`` refuses to build."""
    return protocol.HEADER.pack(version, frame_type, reserved, request_id) + body


def v1_frame(frame_type: int, body: bytes = b"") -> bytes:
    """A frame as a version-1 client sent it: a 4-byte header."""
    return _V1_HEADER.pack(1, frame_type, 0) + body


def decode_v1_error(data: bytes) -> tuple[int, int, int, str]:
    """(version, frame type, error code, message) of a frame in version-1 framing."""
    version, frame_type, _reserved = _V1_HEADER.unpack_from(data)
    code, _lease = _V1_ERROR.unpack_from(data, _V1_HEADER.size)
    return version, frame_type, code, data[_V1_HEADER.size + _V1_ERROR.size:].decode("utf-8", "replace")


def hello(pid: int | None = None) -> bytes:
    return protocol.encode_json(FrameType.HELLO, {"pid": os.getpid() if pid is None else pid, "client": "hostile"})


def site(site_id: int, text: bytes) -> bytes:
    """A SITE frame with any bytes at all as its text (``encode_site`` caps and encodes)."""
    return protocol.header(FrameType.SITE) + struct.pack("!I", site_id) + text


def report(slot: int, generation: int, seq: int, outcome: int, cause: int) -> bytes:
    """A REPORT with any outcome and cause bytes, in range or not."""
    return protocol.header(FrameType.REPORT) + struct.pack("!IIQBB", slot, generation, seq, outcome, cause)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Closed(Exception):
    """The manager closed the connection (EOF or reset)."""


class Lease(NamedTuple):
    slot: int
    generation: int
    seq: int
    fd: int  # this peer's dup of the slot's Redis socket


class RawPeer:
    """One control connection that sends whatever it is told to."""

    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
        except BaseException:
            self.sock.close()
            raise
        self.timeout = timeout
        self.ids = itertools.count(1)
        self.table: tbl.Table | None = None
        self.lock_fd = -1
        self.start = psutil.Process(os.getpid()).create_time()
        # Linux reports ECONNRESET once, ahead of the frames still queued, when
        # the manager closed its end with frames of ours unread. Noted, then
        # the queued frames are read as usual.
        self.was_reset = False

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close everything: the control socket, the table, and with our lock
        description every lease we still hold (it goes as a killed process's would)."""
        self.sock.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        if self.table is not None:
            self.table.close()
            self.table = None

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.send(data)

    def request(self, frame_type: FrameType, body: bytes = b"") -> int:
        """Send a request with a fresh request id; return the id."""
        request_id = next(self.ids)
        self.send(protocol.header(frame_type, request_id) + body)
        return request_id

    def recv_frame(self, timeout: float | None = None) -> tuple[int, int, bytes, list[int]]:
        """The next frame as (type, request id, body, fds); raises ``Closed`` at EOF."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data, anc, flags, _ = self.sock.recvmsg(protocol.MAX_FRAME + 1, _ANCILLARY, protocol.RECV_FLAGS)
        except ConnectionResetError:
            if self.was_reset:
                raise Closed() from None
            self.was_reset = True
            return self.recv_frame(timeout)
        except OSError as exc:
            if exc.errno == errno.EBADF or isinstance(exc, socket.timeout):
                raise
            raise Closed() from None
        fds = protocol.fds_from_ancillary(anc)
        if not data:
            close_fds(fds)
            raise Closed()
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), f"manager sent a cut frame (flags {flags:#x})"
        version, frame_type, request_id, body = protocol.split(data)
        assert version == protocol.VERSION, f"manager answered with protocol version {version}"
        return frame_type, request_id, body, fds

    def recv(self, timeout: float | None = None) -> tuple[int, bytes, list[int]]:
        frame_type, _request_id, body, fds = self.recv_frame(timeout)
        return frame_type, body, fds

    def recv_no_fd(self, timeout: float | None = None) -> tuple[int, bytes]:
        frame_type, body, fds = self.recv(timeout)
        close_fds(fds)
        assert not fds, f"frame type {frame_type} unexpectedly carried {len(fds)} fds"
        return frame_type, body

    def hello(self) -> dict[str, Any]:
        """HELLO; WELCOME must carry exactly one fd, the lease table, kept for ``take``."""
        self.send(hello())
        frame_type, body, fds = self.recv()
        if frame_type != FrameType.WELCOME or len(fds) != 1:
            close_fds(fds)
            raise AssertionError(f"HELLO answered with {describe(frame_type, body)} and {len(fds)} fds")
        welcome = protocol.decode_json(body)
        geometry = welcome["table"]
        self.table = tbl.Table(fds[0], int(geometry["capacity"]), int(geometry["waiter_capacity"]))
        self.lock_fd = tbl.own_description(fds[0])  # DESIGN fact 11: our own description for our locks
        return welcome

    def expect_error(self, code: ErrorCode, timeout: float | None = None) -> protocol.ErrorFrame:
        frame_type, body = self.recv_no_fd(timeout)
        assert frame_type == FrameType.ERROR, f"expected ERROR {code.name}, got {describe(frame_type, body)}"
        error = protocol.decode_error(body)
        assert error.code == code, f"expected ERROR {code.name}, got {describe(frame_type, body)}"
        return error

    def expect_closed(self, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        """Read until EOF within ``timeout``; return the frames that came first."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"connection still open after {timeout:.1f} s; frames seen: {[describe(*f) for f in seen]}"
            try:
                frame_type, body, fds = self.recv(left)
            except Closed:
                return seen
            except TimeoutError:
                continue
            close_fds(fds)
            seen.append((frame_type, body))

    def ping(self) -> None:
        """PING and expect its own PONG: the connection is open and served."""
        asked = self.request(FrameType.PING)
        frame_type, request_id, body, fds = self.recv_frame()
        close_fds(fds)
        assert frame_type == FrameType.PONG and not fds, f"PING answered with {describe(frame_type, body)}"
        assert request_id == asked, f"PONG for request {request_id}, asked {asked}"

    def fetch_fd(self, slot: int, generation: int) -> int:
        asked = self.request(FrameType.FETCH_FD, struct.pack("!II", slot, generation))
        frame_type, request_id, body, fds = self.recv_frame()
        if frame_type != FrameType.FD or len(fds) != 1 or request_id != asked:
            close_fds(fds)
            raise AssertionError(f"FETCH_FD {slot}/{generation} answered with {describe(frame_type, body)}, {len(fds)} fds")
        assert protocol.decode_slot(body) == (slot, generation)
        return fds[0]

    def try_take_row(self, call_site: int = 0) -> tuple[int, int, int] | None:
        """Lock a READY slot and write the row HELD: (slot, generation, lease number), or None."""
        table = self.table
        assert table is not None, "say HELLO first"
        for slot in range(table.slots_in_use):
            if table.state_of(slot) != RowState.READY:
                continue
            generation = table.generation_of(slot)
            lock = tbl.slot_lock(slot, generation)
            if not tbl.try_lock(self.lock_fd, lock):
                continue
            seq = table.take_in_place(slot, generation, os.getpid(), self.start, time.monotonic(), call_site, table.db_of(slot))
            if not seq:
                tbl.unlock(self.lock_fd, lock)
                continue
            return slot, generation, seq
        return None

    def try_take(self, call_site: int = 0) -> Lease | None:
        """Take a lease as the client does (lock, write the row, fetch the fd); None if all are taken."""
        taken = self.try_take_row(call_site)
        if taken is None:
            return None
        slot, generation, seq = taken
        return Lease(slot, generation, seq, self.fetch_fd(slot, generation))

    def give_back(self, lease: Lease, outcome: Outcome = Outcome.CLEAN) -> Outcome | None:
        """Give a lease back as the client does: write the row, unlock, REPORT if the manager has work."""
        assert self.table is not None
        written = self.table.give_back_in_place(lease.slot, lease.generation, lease.seq, outcome, time.monotonic())
        tbl.unlock(self.lock_fd, tbl.slot_lock(lease.slot, lease.generation))
        close_fds([lease.fd])
        if written is not None and written is not Outcome.CLEAN:
            self.send(protocol.encode_report(lease.slot, lease.generation, lease.seq, written, ReportCause.GIVEN_BACK))
        return written


def describe(frame_type: int, body: bytes) -> str:
    try:
        name = FrameType(frame_type).name
    except ValueError:
        name = f"type {frame_type}"
    if frame_type == FrameType.ERROR:
        error = protocol.decode_error(body)
        try:
            code = ErrorCode(error.code).name
        except ValueError:
            code = str(error.code)
        return f"ERROR {code} (lease {error.lease_seq}): {error.message}"
    return f"{name} {body[:80]!r}"


def redis_ping(fd: int) -> bytes:
    """Speak RESP on a leased fd (a dup of the manager's Redis socket)."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.settimeout(5.0)  # DESIGN fact 9: every holder sets its own mode
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return sock.recv(64)
    finally:
        sock.close()  # close() of a dup, never shutdown(): DESIGN fact 1


# ----- random and mutated frames (the live fuzzer) ---------------------------------


def valid_frame(rng: random.Random) -> bytes:
    """A well-formed frame a worker could send (never ADMIN: that is authorised power, not input)."""
    kind = rng.randrange(10)
    request_id = rng.choice([0, 1, rng.randrange(2**32)])
    if kind == 0:
        return hello(rng.choice([os.getpid(), 0, -1, 2**40]))
    if kind == 1:
        slot, generation = rng.choice([0, 1, 2, 3, 63, 64, 2**32 - 1]), rng.choice([0, 1, 2, rng.randrange(2**32)])
        return protocol.encode_slot(FrameType.FETCH_FD, slot, generation, request_id)
    if kind == 2:
        # Mostly in range; stale or garbage slot, generation and lease numbers.
        return report(rng.choice([0, 1, 2, 3, 2**32 - 1]), rng.choice([0, 1, 2, rng.randrange(2**32)]),
                      rng.choice([0, 1, rng.randrange(2**64)]), rng.randrange(4), rng.randrange(4))
    if kind == 3:
        return protocol.encode_empty(rng.choice([FrameType.PING, FrameType.STATS, FrameType.DEMAND]), request_id)
    if kind == 4:
        return site(rng.randrange(2**32), rng.choice([b"", b"app.py:1 in f", b"\xff\xfe\x00" * 10, b"x" * 2000]))
    if kind == 5:
        return frame(rng.choice(UNKNOWN_TYPES), rng.randbytes(rng.randrange(16)), request_id=request_id)
    if kind == 6:
        return frame(rng.choice(SERVER_TYPES), rng.randbytes(rng.randrange(32)), request_id=request_id)
    if kind == 7:
        return protocol.encode_error(rng.choice(list(ErrorCode)), "from a worker?", request_id, rng.randrange(4))
    if kind == 8:
        return v1_frame(rng.randrange(1, 12), rng.randbytes(rng.randrange(16)))
    payload: Any = rng.choice([[], "x", 1, None, {"pid": "x"}, {"client": ["a"] * 5}, {"pid": 1.5e300}])
    return frame(FrameType.HELLO, json.dumps(payload).encode(), request_id=request_id)


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        how = rng.randrange(9)
        if how == 0 and data:  # flip bits
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif how == 1:  # truncate
            del data[rng.randrange(len(data) + 1):]
        elif how == 2:  # extend
            data += rng.randbytes(rng.randrange(1, 64))
        elif how == 3 and len(data) > 1:  # another type
            data[1] = rng.randrange(256)
        elif how == 4 and data:  # another version
            data[0] = rng.choice(BAD_VERSIONS + (1, protocol.VERSION))
        elif how == 5 and len(data) > 3:  # reserved bits
            data[2:4] = rng.randbytes(2)
        elif how == 6 and data:  # overwrite a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif how == 7:  # a boundary size
            size = rng.choice([protocol.HEADER.size - 1, protocol.MAX_FRAME, protocol.MAX_FRAME + 1])
            data = (data + bytes(size))[:size]
        elif how == 8 and len(data) >= protocol.HEADER.size:  # another request id
            data[4:8] = rng.randbytes(4)
    return bytes(data)


def random_frame(rng: random.Random) -> bytes:
    # Mostly frames that keep the connection open, so that bursts reach
    # deeper states before a fatal one.
    roll = rng.random()
    if roll < 0.08:
        return rng.randbytes(rng.randrange(0, 24))
    if roll < 0.12:
        body = rng.randbytes(rng.randrange(64))
        return frame(rng.randrange(256), body, rng.randrange(256), rng.randrange(65536), rng.randrange(2**32))
    if roll < 0.70:
        return valid_frame(rng)
    return mutate(rng, valid_frame(rng))


def fuzz(socket_path: str, seed: int, duration: float, report: Any) -> None:
    """Throw random and mutated frames at the manager for ``duration`` seconds.

    Bursts of frames on short-lived connections: with or without HELLO,
    sometimes carrying fds, sometimes never reading the replies. Puts a
    summary dict on ``report``.
    """
    rng = random.Random(seed)
    summary: dict[str, Any] = {"seed": seed, "connections": 0, "frames": 0, "replies": {}, "refused_connects": 0}
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        # Blocking, with kernel timeouts, so that MSG_DONTWAIT means what it says
        # (a Python-level timeout polls before every call).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(2, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(0, 50_000))
        try:
            sock.connect(socket_path)
        except OSError:
            sock.close()
            summary["refused_connects"] += 1
            continue
        summary["connections"] += 1
        reads = rng.random() < 0.8
        try:
            if rng.random() < 0.8:
                sock.send(hello())
            for _ in range(rng.randint(1, 30)):
                data = random_frame(rng)
                if len(data) > protocol.MAX_FRAME + 1:
                    data = data[: protocol.MAX_FRAME + 1]
                if rng.random() < 0.05:
                    fds = array.array("i", [devnull] * rng.randint(1, 4))
                    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                else:
                    sock.send(data)
                summary["frames"] += 1
                if reads:
                    _drain(sock, summary)
            if reads and rng.random() < 0.5:
                _drain(sock, summary, flags=0)  # waits SO_RCVTIMEO for late replies
        except OSError:
            pass  # the manager closed us: expected for most bursts
        finally:
            sock.close()
    os.close(devnull)
    report.put(summary)


def _drain(sock: socket.socket, summary: dict[str, Any], flags: int = socket.MSG_DONTWAIT) -> None:
    while True:
        try:
            data, anc, _flags, _ = sock.recvmsg(protocol.MAX_FRAME + 1, _ANCILLARY, flags | protocol.RECV_FLAGS)
        except BlockingIOError:
            return
        close_fds(protocol.fds_from_ancillary(anc))  # WELCOME's table, FD's Redis socket
        if not data:
            raise ConnectionResetError("closed by the manager")
        name = "?"
        try:
            version, frame_type, _request_id, body = protocol.split(data)
            if version == 1:
                name = "V1_REFUSAL"
            else:
                name = FrameType(frame_type).name
                if frame_type == FrameType.ERROR:
                    name = ErrorCode(protocol.decode_error(body).code).name
        except (protocol.ProtocolError, ValueError):
            pass
        summary["replies"][name] = summary["replies"].get(name, 0) + 1
