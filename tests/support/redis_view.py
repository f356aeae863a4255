"""What Redis itself says about a manager's connections: the witness no manager counter can replace."""

from __future__ import annotations

from typing import Any

import redis


def manager_clients(admin: redis.Redis, pool_name: str) -> list[dict[str, Any]]:
    """Connections in Redis's CLIENT LIST that belong to the given manager's pool."""
    prefix = f"sharedpool:{pool_name}:"
    return [c for c in admin.client_list() if c.get("name", "").startswith(prefix)]
