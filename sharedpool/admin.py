"""One-shot requests to a running manager: open a control channel, ask, close.

Everything outside a worker's pool that talks to a manager goes through
here: the CLI (``stats``, ``check``, ``admin``), the server integrations
(the readiness ping, gunicorn's dead-worker report), the development
launcher and the benchmark.

* ``answers()``: whether a manager answers a PING now (never raises);
* ``stats()`` / ``welcome()`` / ``probe()``: the STATS snapshot, the
  handshake's WELCOME, a fresh check of Redis;
* ``admin()`` / ``report_dead_worker()``: pause, resume, reconnect, reload,
  shutdown, reap. Only the manager's own uid and root may send them; the
  manager checks the sender's SO_PEERCRED uid, not anything the request says.

A ``socket_path`` of None means the client's default: ``SHAREDPOOL_SOCKET_PATH``
(or ``SHAREDPOOL_SOCKET``), else the per-user default path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sharedpool import errors, protocol
from sharedpool.client.channel import ControlChannel
from sharedpool.config import ClientConfig, build
from sharedpool.protocol import FrameType

COMMANDS = ("pause", "resume", "reconnect", "reload", "shutdown", "reap")


def resolve_socket_path(socket_path: str | None) -> str:
    """``socket_path``, or the one a client would use when it is None or empty."""
    if socket_path:
        return socket_path
    config: ClientConfig = build(ClientConfig, overrides={})
    return config.socket_path


@contextmanager
def channel(socket_path: str | None = None, timeout: float = 5.0) -> Iterator[ControlChannel]:
    """A control channel of our own for a few requests, closed on exit.

    ``timeout`` bounds the connect and the handshake, and then each reply.
    """
    opened = ControlChannel(resolve_socket_path(socket_path), connect_timeout=timeout, reply_timeout=timeout)
    try:
        yield opened
    finally:
        opened.close()


def stats_of(opened: ControlChannel) -> dict[str, Any]:
    """The manager's STATS snapshot, asked on a channel already open (``stats --watch`` keeps one)."""
    return opened.request(protocol.encode_empty(FrameType.STATS), FrameType.STATS_REPLY)


def stats(socket_path: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    with channel(socket_path, timeout) as opened:
        return stats_of(opened)


def welcome(socket_path: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The WELCOME the manager sends every new channel (its pool, limits, protocol, lease table geometry)."""
    with channel(socket_path, timeout) as opened:
        return opened.welcome


def answers(socket_path: str, timeout: float = 2.0) -> bool:
    """Whether a manager answers a PING at ``socket_path`` right now."""
    try:
        with channel(socket_path, timeout) as opened:
            opened.ping()
        return True
    except errors.SharedPoolError:
        return False


def probe(socket_path: str | None = None, timeout: float = 2.0) -> dict[str, Any]:
    """Ask the manager to check Redis now (a fresh connect and PING); all within ``timeout``."""
    started = time.monotonic()
    with channel(socket_path, timeout) as opened:
        remaining = max(0.05, timeout - (time.monotonic() - started))
        # The manager's own connect gets most of what is left, so that its
        # answer (even a failure) arrives before we stop waiting.
        frame = protocol.encode_json(FrameType.PROBE, {"timeout": remaining * 0.8})
        return opened.request(frame, FrameType.PROBE_REPLY, timeout=remaining)


def admin(command: str, socket_path: str | None = None, timeout: float = 5.0, **arguments: Any) -> dict[str, Any]:
    """Send one admin command; return the manager's reply (raises SharedPoolError on refusal)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown admin command {command!r}: one of {', '.join(COMMANDS)}")
    with channel(socket_path, timeout) as opened:
        return opened.request(protocol.encode_json(FrameType.ADMIN, {"command": command, **arguments}), FrameType.ADMIN_REPLY)


def report_dead_worker(pid: int, socket_path: str | None = None, timeout: float = 5.0) -> int:
    """Tell the manager a worker died (gunicorn's child_exit); returns how many leases it took back."""
    return int(admin("reap", socket_path, timeout, pid=pid).get("reaped", 0) or 0)
