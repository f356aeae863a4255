"""Hostile peers for ``test_hostile.py``: raw control connections, frame
generators and mutators, and a look at the manager's fd table.

Everything here speaks the wire format of ``sharedpool/protocol.py`` by
hand, over ``socket.socket(AF_UNIX, SOCK_SEQPACKET)``, so that it can send
what the real client never would.
"""

from __future__ import annotations

import array
import errno
import json
import os
import random
import socket
import struct
import time
from typing import Any

from sharedpool import protocol
from sharedpool.protocol import ErrorCode, FrameType, Outcome

# Frame types this protocol version does not define: the manager must answer
# them with ERROR UNSUPPORTED and keep the connection.
UNKNOWN_TYPES = tuple(t for t in range(256) if t not in {int(f) for f in FrameType})
# Types a worker never sends (the manager's own frames), bounced back at it.
SERVER_TYPES = (
    FrameType.WELCOME, FrameType.GRANT, FrameType.ERROR, FrameType.STATS_REPLY,
    FrameType.PONG, FrameType.ADMIN_REPLY, FrameType.REVOKED,
)
BAD_VERSIONS = tuple(v for v in (0, protocol.VERSION + 1, 0x7F, 0xFF) if v not in protocol.SUPPORTED_VERSIONS)

_ANCILLARY = socket.CMSG_SPACE(struct.calcsize("i") * 256)
_TIMEVAL = struct.Struct("ll")


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


def frame(frame_type: int, body: bytes = b"", version: int = protocol.VERSION, reserved: int = 0) -> bytes:
    """Any header at all, including ones ``protocol`` refuses to build."""
    return protocol.HEADER.pack(version, frame_type, reserved) + body


def hello(pid: int | None = None) -> bytes:
    return protocol.encode_json(FrameType.HELLO, {"pid": os.getpid() if pid is None else pid, "client": "hostile"})


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Closed(Exception):
    """The manager closed the connection (EOF or reset)."""


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
        # Linux reports ECONNRESET once, ahead of the frames still queued, when
        # the manager closed its end with frames of ours unread. Noted, then
        # the queued frames are read as usual.
        self.was_reset = False

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.send(data)

    def recv(self, timeout: float | None = None) -> tuple[int, bytes, list[int]]:
        """The next frame as (type, body, fds); raises ``Closed`` at EOF."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data, anc, flags, _ = self.sock.recvmsg(protocol.MAX_FRAME + 1, _ANCILLARY)
        except ConnectionResetError:
            if self.was_reset:
                raise Closed() from None
            self.was_reset = True
            return self.recv(timeout)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise
            raise Closed() from None
        fds = protocol.fds_from_ancillary(anc)
        if not data:
            close_fds(fds)
            raise Closed()
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), f"manager sent a cut frame (flags {flags:#x})"
        version, frame_type, body = protocol.split(data)
        assert version == protocol.VERSION, f"manager answered with protocol version {version}"
        return frame_type, body, fds

    def recv_no_fd(self, timeout: float | None = None) -> tuple[int, bytes]:
        frame_type, body, fds = self.recv(timeout)
        close_fds(fds)
        assert not fds, f"frame type {frame_type} unexpectedly carried {len(fds)} fds"
        return frame_type, body

    def hello(self) -> dict[str, Any]:
        self.send(hello())
        frame_type, body = self.recv_no_fd()
        assert frame_type == FrameType.WELCOME, f"HELLO answered with {describe(frame_type, body)}"
        return protocol.decode_json(body)

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
                frame_type, body = self.recv_no_fd(left)
            except Closed:
                return seen
            except socket.timeout:
                continue
            seen.append((frame_type, body))

    def ping(self) -> None:
        """PING and expect PONG: the connection is open and served."""
        self.send(protocol.encode_empty(FrameType.PING))
        frame_type, body = self.recv_no_fd()
        assert frame_type == FrameType.PONG, f"PING answered with {describe(frame_type, body)}"

    def acquire(self, timeout_ms: int = 5000) -> tuple[protocol.Grant, list[int]]:
        self.send(protocol.encode_acquire(timeout_ms, "hostile"))
        frame_type, body, fds = self.recv()
        assert frame_type == FrameType.GRANT, f"ACQUIRE answered with {describe(frame_type, body)}"
        return protocol.decode_grant(body), fds

    def fetch_fd(self, lease_id: int) -> int:
        self.send(protocol.encode_fetch_fd(lease_id))
        frame_type, body, fds = self.recv()
        assert frame_type == FrameType.GRANT and len(fds) == 1, f"FETCH_FD answered with {describe(frame_type, body)}, {len(fds)} fds"
        return fds[0]

    def acquire_fd(self, timeout_ms: int = 5000) -> tuple[protocol.Grant, int]:
        """A lease and an fd for it, fetched if the manager thinks this process has it cached."""
        grant, fds = self.acquire(timeout_ms)
        assert len(fds) == int(grant.has_fd), f"GRANT {grant} came with {len(fds)} fds"
        return grant, (fds[0] if fds else self.fetch_fd(grant.lease_id))


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
        return f"ERROR {code} (lease {error.lease_id}): {error.message}"
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
    kind = rng.randrange(9)
    if kind == 0:
        return hello(rng.choice([os.getpid(), 0, -1, 2**40]))
    if kind == 1:
        return protocol.encode_acquire(rng.choice([0, 1, 50, protocol.DEFAULT_TIMEOUT]), rng.choice(["", "x" * 600, "é\x00"]))
    if kind == 2:
        return protocol.encode_release(rng.choice([0, 1, 2, 3, rng.randrange(2**64)]), rng.choice(list(Outcome)))
    if kind == 3:
        return protocol.encode_fetch_fd(rng.choice([0, 1, 2, rng.randrange(2**64)]))
    if kind == 4:
        return protocol.encode_empty(rng.choice([FrameType.PING, FrameType.STATS]))
    if kind == 5:
        return frame(rng.choice(UNKNOWN_TYPES), rng.randbytes(rng.randrange(16)))
    if kind == 6:
        return frame(rng.choice(SERVER_TYPES), rng.randbytes(rng.randrange(32)))
    if kind == 7:
        return protocol.encode_error(rng.choice(list(ErrorCode)), "from a worker?", rng.randrange(4))
    payload: Any = rng.choice([[], "x", 1, None, {"pid": "x"}, {"client": ["a"] * 5}, {"pid": 1.5e300}])
    return protocol.HEADER.pack(protocol.VERSION, FrameType.HELLO, 0) + json.dumps(payload).encode()


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        how = rng.randrange(8)
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
            data[0] = rng.choice(BAD_VERSIONS + (protocol.VERSION,))
        elif how == 5 and len(data) > 3:  # reserved bits
            data[2:4] = rng.randbytes(2)
        elif how == 6 and data:  # overwrite a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif how == 7:  # a boundary size
            size = rng.choice([protocol.HEADER.size - 1, protocol.MAX_FRAME, protocol.MAX_FRAME + 1])
            data = (data + bytes(size))[:size]
    return bytes(data)


def random_frame(rng: random.Random) -> bytes:
    # Mostly frames that keep the connection open, so that bursts reach
    # deeper states (held leases, waiting ACQUIREs) before a fatal one.
    roll = rng.random()
    if roll < 0.08:
        return rng.randbytes(rng.randrange(0, 24))
    if roll < 0.12:
        return frame(rng.randrange(256), rng.randbytes(rng.randrange(64)), rng.randrange(256), rng.randrange(65536))
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
                    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [devnull] * rng.randint(1, 4)))])
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
            data, anc, _flags, _ = sock.recvmsg(protocol.MAX_FRAME + 1, _ANCILLARY, flags)
        except BlockingIOError:
            return
        close_fds(protocol.fds_from_ancillary(anc))
        if not data:
            raise ConnectionResetError("closed by the manager")
        name = "?"
        try:
            _v, frame_type, body = protocol.split(data)
            name = FrameType(frame_type).name
            if frame_type == FrameType.ERROR:
                name = ErrorCode(protocol.decode_error(body).code).name
        except (protocol.ProtocolError, ValueError):
            pass
        summary["replies"][name] = summary["replies"].get(name, 0) + 1
