"""Names of the manager's statistics: one place, used by the manager, the
``stats`` command, ``--json`` output and the Prometheus metrics."""

from __future__ import annotations

# Counted by the manager where the transition happens:
RESETS = "connections_reset"
OPENED = "connections_opened"
CLOSED = "connections_closed"
REDIS_ERRORS = "redis_errors"
FDS_SENT = "fds_sent"
CLIENTS_ACCEPTED = "clients_accepted"
CLIENTS_REFUSED = "clients_refused"
PROTOCOL_ERRORS = "protocol_errors"
REFUSED_UNAVAILABLE = "refused_redis_unavailable"
RECYCLED = "connections_recycled"
IDLE_CLOSED = "connections_idle_closed"
HEALTH_CHECK_FAILED = "health_checks_failed"
LEAK_WARNINGS = "leak_warnings"
TABLE_REPAIRS = "table_repairs"
STALE_FETCHES = "fetches_refused_stale"
REBOUND = "connections_rebound"  # an idle connection lent to another database
FAILOVERS = "failovers"  # Sentinel: the master moved to another address
SENTINEL = "sentinel"  # top level, Sentinel mode only: service, master, failovers, sentinels

REAP_CAUSES = ("holder_closed", "holder_dead", "broken", "revoked")


def reaped_key(cause: str) -> str:
    return f"reaped_{cause}"


# The per-database section of a snapshot: {DATABASES: {"0": {DB_OPEN: ...}}}.
DATABASES = "databases"
DB_OPEN = "open"  # connections of that database: open, being opened or reset
DB_IDLE = "idle"
DB_HELD = "held"
DB_WAITING = "waiting"
DB_SUBSCRIBERS = "subscribers"  # held leases in subscribed mode (exempt from leak warnings and max_lease_time)
DATABASE_KEYS = (DB_OPEN, DB_IDLE, DB_HELD, DB_WAITING, DB_SUBSCRIBERS)
SUBSCRIBERS = "subscribers"  # top level: held leases in subscribed mode, all databases together
TABLE_CORE = "table_core"  # the manager's lease-table path: "c" (the accelerator) or "python" (table.core.PATH)
BLOCKING = "blocking"  # top level: held leases pinned for blocking polls (kombu's BRPOP), as exempt as subscribers

# --cluster: {CLUSTER: {"seed", "version", "refreshes", "nodes": [{"index", "addr", "role", ...}]}};
# each node's connections are in DATABASES under its index.
CLUSTER = "cluster"

# Read from the lease table when a snapshot is taken (the workers count them):
GRANTED = "leases_granted"
RELEASED = "leases_released"

COUNTERS = (
    RESETS, OPENED, CLOSED, REDIS_ERRORS, FDS_SENT, CLIENTS_ACCEPTED, CLIENTS_REFUSED, PROTOCOL_ERRORS,
    REFUSED_UNAVAILABLE, RECYCLED, IDLE_CLOSED, HEALTH_CHECK_FAILED, LEAK_WARNINGS, TABLE_REPAIRS, STALE_FETCHES,
    REBOUND, FAILOVERS,
) + tuple(reaped_key(cause) for cause in REAP_CAUSES)


def from_histogram(histogram: list[int]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds from a lease-table histogram (bucket upper bounds)."""
    from sharedpool.table import percentile

    return {
        "p50_ms": round(percentile(histogram, 0.50) * 1000, 3),
        "p95_ms": round(percentile(histogram, 0.95) * 1000, 3),
        "p99_ms": round(percentile(histogram, 0.99) * 1000, 3),
        "samples": sum(histogram),
    }
