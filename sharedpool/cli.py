"""``sharedpool`` command line: serve | stats | check | demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from sharedpool import admin, config, errors, stat_keys
from sharedpool.config import ManagerConfig
from sharedpool.table import core as table_core
from sharedpool.version import __version__

log = logging.getLogger("sharedpool")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharedpool",
        description="One Redis connection pool shared by all the worker processes of a host.",
        epilog="Run 'sharedpool COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"sharedpool {__version__} (table core: {table_core.PATH})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the manager that owns the Redis connections",
        description=(
            "Run the manager. Settings come from defaults < --config TOML file < "
            "SHAREDPOOL_* environment < flags. Every flag below has an environment "
            "variable and a TOML key of the same name."
        ),
    )
    serve.add_argument("--config", metavar="PATH", help="TOML file of settings (flat, or under [sharedpool])")
    config.add_arguments(serve, ManagerConfig)

    one_shot = (("stats", "show the manager's pool statistics"), ("check", "exit 0 when the manager answers and reaches Redis"))
    for name, text in one_shot:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--socket-path", "--socket", dest="socket_path", metavar="PATH",
                         help="control socket [env SHAREDPOOL_SOCKET; default /tmp/sharedpool-<uid>/sharedpool.sock]")
        if name == "stats":
            sub.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
            sub.add_argument("--watch", action="store_true", help="refresh in place, like top, until Ctrl-C")
            sub.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                             help="refresh period for --watch (default 1)")
        else:
            sub.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help="how long to wait for the manager")

    admin_parser = commands.add_parser(
        "admin",
        help="pause | resume | reconnect | reload | shutdown | reap PID (manager's uid or root only)",
        description=(
            "pause: stop new leases (takers wait); resume: lease again; reconnect: replace every "
            "connection gracefully; reload: re-read the config like SIGHUP; shutdown: stop like "
            "SIGTERM; reap PID: a worker died, take its leases back now."
        ),
    )
    admin_parser.add_argument("admin_command", choices=admin.COMMANDS, metavar="ACTION")
    admin_parser.add_argument("pid", nargs="?", type=int, help="for reap: the dead worker's pid")
    admin_parser.add_argument("--socket-path", "--socket", dest="socket_path", metavar="PATH",
                              help="control socket [env SHAREDPOOL_SOCKET]")

    demo = commands.add_parser(
        "demo",
        help="run a manager, an embedded Redis and worker processes, and show the sharing",
        description=(
            "A real run: Redis (--redis-url, else a redis-server from SHAREDPOOL_REDIS_SERVER, PATH or "
            "the 'embedded' extra), a manager, and workers doing a request mix."
        ),
    )
    demo.add_argument("--workers", type=int, default=6, metavar="N", help="worker processes (default 6)")
    demo.add_argument("--max-connections", type=int, default=2, metavar="N",
                      help="Redis connections the manager may open (default 2)")
    demo.add_argument("--duration", type=float, default=10.0, metavar="SECONDS",
                      help="how long to run (default 10; Ctrl-C stops earlier)")
    demo.add_argument("--redis-url", metavar="URL", help="use this Redis instead of starting one")
    demo.add_argument("--kill-every", type=float, default=2.0, metavar="SECONDS",
                      help="SIGKILL a random worker this often to show reaping (0: never; default 2)")
    from sharedpool.bench.settings import add_arguments as add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="measure sharedpool against plain redis-py (and twemproxy) side by side",
        description="Runs every scenario for plain redis-py and sharedpool in the same run, alternating, and prints ratios.",
    )
    add_bench_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "stats":
            return _stats(args)
        if args.command == "check":
            return _check(args)
        if args.command == "admin":
            return _admin(args)
        if args.command == "bench":
            from sharedpool.bench import run_bench

            return run_bench(args)
        if args.command == "demo":
            from sharedpool.dev.demo import run_demo

            return run_demo(args)
    except errors.ConfigError as exc:
        print(f"sharedpool {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def _serve(args: argparse.Namespace) -> int:
    from sharedpool.manager import Manager, ManagerAlreadyRunning
    from sharedpool.manager.cluster import NotACluster

    settings: ManagerConfig = config.from_args(ManagerConfig, args)
    environ = dict(os.environ)
    from sharedpool.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    try:
        # SIGHUP re-reads the file and environment as they were given at start.
        return Manager(settings, reload=lambda: config.from_args(ManagerConfig, args, environ)).serve()
    except (ManagerAlreadyRunning, OSError) as exc:
        print(f"sharedpool serve: error: {exc}", file=sys.stderr)
        return 1
    except NotACluster as exc:  # --cluster against a Redis that is no cluster node
        print(f"sharedpool serve: error: --cluster: {exc}", file=sys.stderr)
        return 2


def _admin(args: argparse.Namespace) -> int:
    extra = {}
    if args.admin_command == "reap":
        if args.pid is None:
            print("sharedpool admin: error: reap needs a PID", file=sys.stderr)
            return 2
        extra["pid"] = args.pid
    try:
        reply = admin.admin(args.admin_command, args.socket_path, **extra)
    except errors.SharedPoolError as exc:
        print(f"sharedpool admin {args.admin_command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, sort_keys=True))
    return 0


def _stats(args: argparse.Namespace) -> int:
    import time

    try:
        # One channel for every refresh of --watch, not one per refresh.
        with admin.channel(args.socket_path, timeout=2.0) as channel:
            while True:
                snapshot = admin.stats_of(channel)
                text = json.dumps(snapshot, indent=2, sort_keys=True) if args.json else format_stats(snapshot)
                if not args.watch:
                    print(text)
                    return 0
                # Home the cursor and clear below: the table is redrawn in place.
                sys.stdout.write("\x1b[H\x1b[J" + text + "\n")
                sys.stdout.flush()
                time.sleep(args.interval)
    except errors.SharedPoolError as exc:
        print(f"sharedpool stats: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def format_stats(snapshot: dict[str, Any]) -> str:
    conns, leases, counters = snapshot["connections"], snapshot["leases"], snapshot["counters"]
    lines = [
        f"pool {snapshot['pool']!r}  redis {snapshot['redis']}  manager pid {snapshot['manager_pid']}  "
        f"up {snapshot['uptime_s']:.0f} s  state {snapshot['state']}",
        f"connections  open {conns['open']}/{conns['max']}  idle {conns['idle']}  leased {conns['leased']}  "
        f"connecting {conns['connecting']}  resetting {conns['resetting']}",
        f"leases       held {leases['held']}  waiting {leases['waiting']}  subscribers {snapshot.get(stat_keys.SUBSCRIBERS, 0)}  "
        f"wait p50/p99 {snapshot['wait_time']['p50_ms']}/{snapshot['wait_time']['p99_ms']} ms  "
        f"hold p50/p99 {snapshot['hold_time']['p50_ms']}/{snapshot['hold_time']['p99_ms']} ms",
        f"table core   manager {snapshot.get(stat_keys.TABLE_CORE, '?')}  this process {table_core.PATH}",
    ]
    sentinel = snapshot.get(stat_keys.SENTINEL)
    if sentinel:
        lines.append(_sentinel_line(sentinel))
    if snapshot.get("redis_down_for_s") is not None:
        lines.append(f"REDIS DOWN for {snapshot['redis_down_for_s']:.1f} s: {snapshot['last_redis_error']}")
    lines.append("counters     " + "  ".join(f"{k} {v}" for k, v in sorted(counters.items()) if v))
    databases = snapshot.get(stat_keys.DATABASES, {})
    if databases:
        lines.append(
            f"databases    served {snapshot.get('databases_served', '?')}  default {snapshot.get('default_db', '?')}"
        )
        lines.append(f"{'db':>8} " + " ".join(f"{key:>11}" for key in stat_keys.DATABASE_KEYS))
        for db, values in sorted(databases.items(), key=lambda item: int(item[0])):
            lines.append(f"{db:>8} " + " ".join(f"{values.get(key, 0):>11}" for key in stat_keys.DATABASE_KEYS))
    lines.append(f"{'pid':>8} {'held':>5} {'channels':>8}")
    for worker in snapshot["workers"]:
        lines.append(f"{worker['pid']:>8} {worker['leases_held']:>5} {worker['control_connections']:>8}")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    """Ask the manager to verify Redis now (a fresh connect and PING), within --timeout."""
    try:
        answer = admin.probe(args.socket_path, timeout=args.timeout)
    except errors.SharedPoolError as exc:
        print(f"not ok: {exc}")
        return 1
    if not answer.get("ok"):
        print(f"not ok: Redis at {answer.get('redis')}: {answer.get('error')}")
        return 1
    per_db = answer.get("open_by_db") or {}
    opened = ", ".join(f"db {db}: {count}" for db, count in sorted(per_db.items(), key=lambda item: int(item[0])))
    print(
        f"ok: pool {answer.get('pool')!r}, {answer.get('open')} connections open to {answer.get('redis')}"
        f"{f' ({opened})' if opened else ''}, serving db {answer.get('databases', '?')} (default "
        f"{answer.get('default_db', '?')}), PING answered in {float(answer.get('elapsed_s', 0)) * 1000:.1f} ms"
    )
    sentinel = answer.get(stat_keys.SENTINEL)
    if sentinel:
        print(_sentinel_line(sentinel))
    print(f"{table_core.describe()}; the manager's: {answer.get('table_core', '?')}")
    return 0


def _sentinel_line(sentinel: dict[str, Any]) -> str:
    error = f"  last error: {sentinel['last_error']}" if sentinel.get("last_error") else ""
    return (
        f"sentinel     service {sentinel.get('service')!r}  master {sentinel.get('master') or 'unknown'}  "
        f"failovers {sentinel.get('failovers', 0)}  subscribed to {sentinel.get('subscribed_to') or 'none'}  "
        f"draining {sentinel.get('draining', 0)}{error}"
    )
