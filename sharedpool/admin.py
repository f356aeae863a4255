"""Admin requests to a running manager (pause, resume, reconnect, reload, shutdown, reap).

Only the manager's own uid and root may send them; the manager checks the
sender's SO_PEERCRED uid, not anything the request says.
"""

from __future__ import annotations

from typing import Any

from sharedpool import protocol
from sharedpool.client.channel import ControlChannel
from sharedpool.config import ClientConfig, build

COMMANDS = ("pause", "resume", "reconnect", "reload", "shutdown", "reap")


def admin(command: str, socket_path: str | None = None, timeout: float = 5.0, **arguments: Any) -> dict[str, Any]:
    """Send one admin command; return the manager's reply (raises SharedPoolError on refusal)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown admin command {command!r}: one of {', '.join(COMMANDS)}")
    path = build(ClientConfig, overrides={"socket_path": socket_path}).socket_path
    channel = ControlChannel(path, connect_timeout=timeout, reply_timeout=timeout)
    try:
        frame = protocol.encode_json(protocol.FrameType.ADMIN, {"command": command, **arguments})
        return channel.request(frame, protocol.FrameType.ADMIN_REPLY)
    finally:
        channel.close()


def report_dead_worker(pid: int, socket_path: str | None = None) -> int:
    """Tell the manager a worker died (gunicorn's child_exit); returns leases reaped."""
    return int(admin("reap", socket_path, pid=pid).get("reaped", 0))
