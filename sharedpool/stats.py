"""Names of the manager's statistics: one place, used by the manager, the
``stats`` command, ``--json`` output and (later) Prometheus metrics."""

from __future__ import annotations

from collections.abc import Iterable

GRANTED = "leases_granted"
RELEASED = "leases_released"
TIMEOUTS = "acquire_timeouts"
REFUSED_FULL = "refused_max_waiting"
REFUSED_UNAVAILABLE = "refused_redis_unavailable"
REFUSED_SHUTDOWN = "refused_shutting_down"
RELEASE_REFUSED = "releases_refused"
RESETS = "connections_reset"
OPENED = "connections_opened"
CLOSED = "connections_closed"
REDIS_ERRORS = "redis_errors"
STALE_AT_GRANT = "connections_dead_at_grant"
FDS_SENT = "fds_sent"
CLIENTS_ACCEPTED = "clients_accepted"
CLIENTS_REFUSED = "clients_refused"
PROTOCOL_ERRORS = "protocol_errors"
REFUSED_WORKER_LIMIT = "refused_max_leases_per_worker"
RECYCLED = "connections_recycled"
IDLE_CLOSED = "connections_idle_closed"
HEALTH_CHECK_FAILED = "health_checks_failed"
LEAK_WARNINGS = "leak_warnings"
RECALLS = "sticky_recalls"

REAP_CAUSES = ("holder_closed", "holder_dead", "broken", "revoked", "undelivered")


def reaped_key(cause: str) -> str:
    return f"reaped_{cause}"


COUNTERS = (
    GRANTED, RELEASED, TIMEOUTS, REFUSED_FULL, REFUSED_UNAVAILABLE, REFUSED_SHUTDOWN,
    RELEASE_REFUSED, RESETS, OPENED, CLOSED, REDIS_ERRORS, STALE_AT_GRANT, FDS_SENT,
    CLIENTS_ACCEPTED, CLIENTS_REFUSED, PROTOCOL_ERRORS, REFUSED_WORKER_LIMIT, RECYCLED,
    IDLE_CLOSED, HEALTH_CHECK_FAILED, LEAK_WARNINGS, RECALLS,
) + tuple(reaped_key(cause) for cause in REAP_CAUSES)


def percentiles(samples: Iterable[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds of recent samples (nearest rank)."""
    ordered = sorted(samples)
    if not ordered:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "samples": 0}
    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)
    return {"p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99), "samples": len(ordered)}
