"""What Redis itself says about a manager's connections: the witness no manager counter can replace."""

from __future__ import annotations

from typing import Any

import redis


def manager_clients(admin: redis.Redis, pool_name: str) -> list[dict[str, Any]]:
    """Connections in Redis's CLIENT LIST that belong to the given manager's pool."""
    prefix = f"sharedpool:{pool_name}:"
    return [c for c in admin.client_list() if c.get("name", "").startswith(prefix)]


# What a connection's handshake sends before it has a name (redis-py sends
# HELLO, then CLIENT SETNAME): a manager's connection being opened, not a
# stranger. A stranger goes on to run real commands and is seen then.
_HANDSHAKE = frozenset({"hello", "auth", "client|setname", "client|setinfo", "select", "NULL"})


def strangers(admin: redis.Redis, pool_name: str) -> list[str]:
    """Connections in Redis that are neither the manager's nor ``admin`` itself."""
    own = admin.client_id()
    prefix = f"sharedpool:{pool_name}:"
    return [
        f"{c.get('name')!r} from {c.get('addr')} on db {c.get('db')} (cmd {c.get('cmd')})"
        for c in admin.client_list()
        if int(c["id"]) != own
        and not c.get("name", "").startswith(prefix)
        and not (not c.get("name") and c.get("cmd") in _HANDSHAKE)
    ]
