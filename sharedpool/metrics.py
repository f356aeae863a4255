"""Prometheus metrics: the manager's stats snapshot as text exposition format 0.0.4.

The format is written directly instead of through ``prometheus-client``:
we export a few gauges and counters from a dict the manager already
builds, so a dependency with its own registry, collectors and process
metrics would be heavier than the thirty lines that print them.

Every metric is named ``sharedpool_<stats key>`` and labelled
``pool="<name>"``, so the names match ``sharedpool stats --json``:

==========================================  =======  ===============================
metric                                      type     from the snapshot
==========================================  =======  ===============================
``sharedpool_connections{state}``           gauge    ``connections.open|idle|...``
``sharedpool_connections_max``              gauge    ``connections.max``
``sharedpool_leases_held``                  gauge    ``leases.held``
``sharedpool_leases_waiting``               gauge    ``leases.waiting``
``sharedpool_leases_subscribers``           gauge    ``subscribers``
``sharedpool_database_connections{db,state}`` gauge  ``databases.<db>.open|idle|held``
``sharedpool_database_waiting{db}``         gauge    ``databases.<db>.waiting``
``sharedpool_database_subscribers{db}``     gauge    ``databases.<db>.subscribers``
``sharedpool_uptime_seconds``               gauge    ``uptime_s``
``sharedpool_redis_up``                     gauge    ``redis_down_for_s`` is null
``sharedpool_paused``                       gauge    ``paused``
``sharedpool_control_connections``          gauge    ``control_connections``
``sharedpool_<counter>_total``              counter  ``counters.<counter>``
``sharedpool_leases_reaped_total{cause}``   counter  ``counters.reaped_<cause>``
``sharedpool_wait_time_seconds{quantile}``  gauge    ``wait_time.p50_ms|p95_ms|p99_ms``
``sharedpool_hold_time_seconds{quantile}``  gauge    ``hold_time.p50_ms|p95_ms|p99_ms``
``sharedpool_worker_leases_held{pid}``      gauge    ``workers[].leases_held``
==========================================  =======  ===============================

``MetricsServer`` serves ``GET /metrics`` from a thread. It never touches
the manager's state: it renders whatever snapshot ``get_snapshot()``
returns, which the manager's loop refreshes.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sharedpool import stat_keys

log = logging.getLogger("sharedpool.metrics")

PREFIX = "sharedpool_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CONNECTION_STATES = ("open", "idle", "leased", "connecting", "resetting")
_QUANTILES = (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"))
# Every reaped_<cause> counter goes into one family labelled by cause, so a
# new cause needs no new metric name (and no dashboard change).
_REAPED_PREFIX = stat_keys.reaped_key("")
_REAPED_FAMILY = "leases_reaped"

# HELP text of the counters we know; an unknown key (a newer manager) is
# still exported, with a generic help line.
_COUNTER_HELP: dict[str, str] = {
    stat_keys.GRANTED: "Leases taken by workers (read from the lease table).",
    stat_keys.RELEASED: "Leases given back by workers (taken minus held).",
    stat_keys.REFUSED_UNAVAILABLE: "Demands for a connection while Redis was unreachable (each starts a new attempt).",
    stat_keys.RESETS: "Connections reset between leases.",
    stat_keys.OPENED: "Redis connections opened.",
    stat_keys.CLOSED: "Redis connections closed.",
    stat_keys.REDIS_ERRORS: "Errors talking to Redis (connect, reset).",
    stat_keys.FDS_SENT: "File descriptors passed to workers.",
    stat_keys.CLIENTS_ACCEPTED: "Control connections accepted.",
    stat_keys.CLIENTS_REFUSED: "Control connections refused (uid not allowed, max_clients).",
    stat_keys.PROTOCOL_ERRORS: "Malformed frames received from workers.",
    stat_keys.RECYCLED: "Connections recycled after max_lifetime.",
    stat_keys.IDLE_CLOSED: "Connections closed after idle_timeout.",
    stat_keys.HEALTH_CHECK_FAILED: "Idle connections found closed by Redis or dirty.",
    stat_keys.LEAK_WARNINGS: "Leases held longer than leak_threshold.",
    stat_keys.TABLE_REPAIRS: "Lease-table rows the manager found scribbled and repaired.",
    stat_keys.STALE_FETCHES: "Requests for the fd of a slot generation that no longer exists.",
    stat_keys.REBOUND: "Idle connections rebound to another database (max_connections reached).",
    stat_keys.FAILOVERS: "Sentinel failovers followed: the master moved to another address.",
}
_DB_CONNECTION_STATES = (stat_keys.DB_OPEN, stat_keys.DB_IDLE, stat_keys.DB_HELD)

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_:]")


class _Family:
    """One metric family: its HELP/TYPE lines and its samples, printed together."""

    __slots__ = ("name", "kind", "help", "samples")

    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name = PREFIX + _NAME_UNSAFE.sub("_", name)
        self.kind = kind
        self.help = help
        self.samples: list[tuple[dict[str, str], float]] = []

    def add(self, value: float, **labels: str) -> _Family:
        self.samples.append((labels, value))
        return self

    def lines(self, common: Mapping[str, str]) -> Iterable[str]:
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.samples:
            yield f"{self.name}{_labels({**common, **labels})} {_value(value)}"


def render_prometheus(snapshot: Mapping[str, Any]) -> str:
    """The snapshot of ``Manager.snapshot()`` as Prometheus text format 0.0.4."""
    families: list[_Family] = []

    def family(name: str, kind: str, help: str) -> _Family:
        new = _Family(name, kind, help)
        families.append(new)
        return new

    conns = snapshot.get("connections", {})
    # "open" overlaps the others (idle + leased + resetting), as in the stats
    # dict; the HELP line says so, since summing over state would count twice.
    gauge = family(
        "connections", "gauge",
        'Redis connections by state; state="open" is idle + leased + resetting, so do not sum over state.',
    )
    for state in _CONNECTION_STATES:
        gauge.add(conns.get(state, 0), state=state)
    family("connections_max", "gauge", "Most Redis connections the manager may open (max_connections).").add(conns.get("max", 0))

    leases = snapshot.get("leases", {})
    family("leases_held", "gauge", "Leases held by workers right now.").add(leases.get("held", 0))
    family("leases_waiting", "gauge", "Workers waiting for a lease right now.").add(leases.get("waiting", 0))
    family("leases_subscribers", "gauge", "Held leases in subscribed mode (not leaks, never revoked).").add(
        snapshot.get(stat_keys.SUBSCRIBERS, 0)
    )
    databases = snapshot.get(stat_keys.DATABASES, {})
    by_db = family(
        "database_connections", "gauge",
        'Redis connections of each database; state="open" includes idle and held, so do not sum over state.',
    )
    waiting = family("database_waiting", "gauge", "Workers waiting for a lease of each database.")
    subscribers = family("database_subscribers", "gauge", "Held leases in subscribed mode, per database.")
    for db, values in databases.items():
        for state in _DB_CONNECTION_STATES:
            by_db.add(values.get(state, 0), db=str(db), state=state)
        waiting.add(values.get(stat_keys.DB_WAITING, 0), db=str(db))
        subscribers.add(values.get(stat_keys.DB_SUBSCRIBERS, 0), db=str(db))
    family("uptime_seconds", "gauge", "Seconds since the manager started.").add(snapshot.get("uptime_s", 0))
    family("redis_up", "gauge", "1 when the manager reaches Redis, 0 during an outage.").add(
        0 if snapshot.get("redis_down_for_s") is not None else 1
    )
    family("paused", "gauge", "1 while an admin 'pause' stops new leases.").add(1 if snapshot.get("paused") else 0)
    family("control_connections", "gauge", "Control connections from workers.").add(snapshot.get("control_connections", 0))

    reaped: _Family | None = None
    for key, value in sorted(snapshot.get("counters", {}).items()):
        if key.startswith(_REAPED_PREFIX):
            if reaped is None:
                reaped = family(
                    _REAPED_FAMILY + "_total", "counter", "Leases taken back from workers, by cause."
                )
            reaped.add(value, cause=key[len(_REAPED_PREFIX):])
        else:
            help = _COUNTER_HELP.get(key, f"Count of {key} since the manager started.")
            family(key + "_total", "counter", help).add(value)

    for key, what in (("wait_time", "waited for a lease"), ("hold_time", "held a lease")):
        times = snapshot.get(key, {})
        gauge = family(
            key + "_seconds", "gauge", f"Seconds workers {what}: quantiles of the recent samples."
        )
        for quantile, field in _QUANTILES:
            # The snapshot keeps milliseconds for people; Prometheus wants base units.
            gauge.add(float(times.get(field, 0.0)) / 1000.0, quantile=quantile)

    gauge = family("worker_leases_held", "gauge", "Leases held right now, per worker process.")
    for worker in snapshot.get("workers", []):
        gauge.add(worker.get("leases_held", 0), pid=str(worker.get("pid", "")))

    common = {"pool": str(snapshot.get("pool", ""))}
    return "".join(line + "\n" for f in families for line in f.lines(common))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in labels.items()) + "}"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, b"not found: metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body = render_prometheus(self.server.get_snapshot()).encode("utf-8")
        except Exception as exc:  # a scrape must never take the thread (or manager) down
            log.warning("cannot render metrics for %s: %s", self.client_address[0], exc, exc_info=True)
            self._reply(503, f"metrics unavailable: {exc}\n".encode(), "text/plain; charset=utf-8")
            return
        self._reply(200, body, CONTENT_TYPE)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server writes every request to stderr; in the manager that
        # would interleave with (and break) one-JSON-object-per-line logs.
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    # Request threads must not keep the manager alive on exit.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], get_snapshot: Callable[[], Mapping[str, Any]]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.get_snapshot = get_snapshot
        super().__init__(address, _Handler)


class MetricsServer:
    """``GET /metrics`` over HTTP from a daemon thread; ``port=0`` picks a free port."""

    def __init__(self, host: str, port: int, get_snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self.host = host
        self.requested_port = port
        self.get_snapshot = get_snapshot
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self._server is not None else f"{self.host}:{self.requested_port} (stopped)"
        return f"<MetricsServer http://{where}/metrics>"

    @property
    def port(self) -> int:
        """The bound port (the real one when asked for port 0)."""
        if self._server is None:
            raise RuntimeError("MetricsServer is not started: its port is not bound yet")
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        """Bind (an OSError such as EADDRINUSE is raised here) and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.requested_port), self.get_snapshot)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
            name="sharedpool-metrics", daemon=True,
        )
        self._thread.start()
        log.info("serving Prometheus metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()  # waits for serve_forever to return
        server.server_close()
        if thread is not None:
            thread.join()
