"""Exclusion and wake-up between the processes of one table.

Locks are open-file-description locks on single bytes far beyond the end of
the file (a lock needs no bytes to exist); who holds one is not written
here (DESIGN fact 12: ``F_OFD_GETLK`` reports no pid).
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

_LOCK_BASE = 1 << 40
ALIVE_LOCK = _LOCK_BASE
HEADER_LOCK = _LOCK_BASE + 1
_GENERATIONS_PER_SLOT = 1 << 24
_SLOT_LOCKS_AT = _LOCK_BASE + (1 << 32)
_FLOCK = struct.Struct("hhqqi4x")  # native alignment: struct flock as the kernel lays it out
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)


def slot_lock(slot: int, generation: int) -> int:
    return _SLOT_LOCKS_AT + slot * _GENERATIONS_PER_SLOT + generation % _GENERATIONS_PER_SLOT


def try_lock(fd: int, offset: int) -> bool:
    """Take a write lock on one byte without waiting; False if another description has it."""
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, offset, 1, 0))
        return True
    except BlockingIOError:
        return False
    except PermissionError:  # EACCES: the same "held elsewhere" on some kernels
        return False


def lock_wait(fd: int, offset: int) -> None:
    """Take a write lock, waiting as long as it takes (tests and tools only)."""
    fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, 0, offset, 1, 0))


def lock_within(fd: int, offset: int, seconds: float) -> bool:
    """Take a lock held only for microseconds by others, trying for at most ``seconds``.

    Never a blocking F_OFD_SETLKW: a holder frozen inside its few
    microseconds (SIGSTOP, swap) must not freeze us with it.
    """
    if try_lock(fd, offset):
        return True
    # Its holder is most likely running right now on the other core, or was
    # preempted: let it finish before sleeping on it.
    for _ in range(4):
        os.sched_yield()
        if try_lock(fd, offset):
            return True
    deadline = time.monotonic() + seconds
    pause = 20e-6
    while time.monotonic() < deadline:
        time.sleep(pause)
        if try_lock(fd, offset):
            return True
        pause = min(pause * 2, 0.002)
    return False


def unlock(fd: int, offset: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, 0, offset, 1, 0))


def is_locked(fd: int, offset: int, exclusive: bool = True) -> bool:
    """Whether another open file description holds a lock there (never our own)."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    reply = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(kind, 0, offset, 1, 0))
    return bool(_FLOCK.unpack(reply)[0] != fcntl.F_UNLCK)


def own_description(memfd: int) -> int:
    """A new open file description of the table (DESIGN fact 11: one per thread)."""
    return os.open(f"/proc/self/fd/{memfd}", os.O_RDWR | os.O_CLOEXEC)


def wake_address(epoch: str, pid: int, token: int) -> bytes:
    """The abstract-namespace datagram address a waiting thread listens on."""
    return f"\0sharedpool-{epoch}-{pid}-{token}".encode()
