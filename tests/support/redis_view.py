"""What Redis itself says about a manager's connections: the witness no manager counter can replace."""

from __future__ import annotations

from typing import Any

import psutil
import redis

from sharedpool.dev.launch import ManagerProcess


def manager_clients(admin: redis.Redis, pool_name: str) -> list[dict[str, Any]]:
    """Connections in Redis's CLIENT LIST that belong to the given manager's pool."""
    prefix = f"sharedpool:{pool_name}:"
    return [c for c in admin.client_list() if c.get("name", "").startswith(prefix)]


# What a connection's handshake sends before it has a name (redis-py sends
# HELLO, then CLIENT SETNAME): a manager's connection being opened, not a
# stranger. A stranger goes on to run real commands and is seen then.
_HANDSHAKE = frozenset({"hello", "auth", "client|setname", "client|setinfo", "select", "NULL"})


def strangers(admin: redis.Redis, manager: ManagerProcess) -> list[str]:
    """Connections in Redis that are neither the manager's nor ``admin`` itself.

    A manager's connection is known by its name, or else by its address:
    a lease may rename it for a while (rq names its connection after the
    worker; the manager resets it after the lease).
    """
    own = admin.client_id()
    prefix = f"sharedpool:{manager.pool_name}:"
    before = _local_addresses(manager.pid)
    clients = admin.client_list()
    managers = before | _local_addresses(manager.pid)
    return [
        f"{c.get('name')!r} from {c.get('addr')} on db {c.get('db')} (cmd {c.get('cmd')})"
        for c in clients
        if int(c["id"]) != own
        and not c.get("name", "").startswith(prefix)
        and c.get("addr") not in managers
        and not (not c.get("name") and c.get("cmd") in _HANDSHAKE)
    ]


def _local_addresses(pid: int) -> set[str]:
    """``ip:port`` of every TCP socket of process ``pid``: what Redis shows as those clients' ``addr``."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return set()
    return {f"{c.laddr.ip}:{c.laddr.port}" for c in connections if c.laddr}
