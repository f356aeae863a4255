"""Configuration: one frozen object for the manager, one for the client.

Every field is filled from, in rising precedence: its default, the TOML
file (``--config``), the ``SHAREDPOOL_<FIELD>`` environment variable, and
the ``--field-name`` flag. Every value is checked when the config is built;
a refused value raises ``ConfigError`` naming the field, the value, where it
came from and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sharedpool.config_values import (
    choice,
    client_name,
    format_addresses,
    int_range,
    non_negative_float,
    parse_addresses,
    parse_bool,
    parse_octal,
    parse_uid_list,
    positive_float,
    redis_url,
    socket_mode,
)
from sharedpool.db_ranges import DEFAULT_DATABASES, MAX_DATABASE, format_databases, parse_databases, url_database
from sharedpool.errors import ConfigError, mask_secrets

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "SHAREDPOOL_"
# The short name the client documentation promises; SHAREDPOOL_SOCKET_PATH
# (the field's regular name) wins when both are set.
SOCKET_ENV_ALIAS = "SHAREDPOOL_SOCKET"


def default_socket_path() -> str:
    """Per-user default, independent of the environment.

    Not under ``$XDG_RUNTIME_DIR``: a manager run by systemd and workers
    started from a login shell often see different values of it, and would
    then look for each other in different places.
    """
    return f"/tmp/sharedpool-{os.getuid()}/sharedpool.sock"


def _spec(
    default: Any,
    help: str,
    parse: Callable[[str], Any],
    check: Callable[[str, Any], str | None] | None = None,
    metavar: str = "",
) -> Any:
    return field(
        default=default,
        metadata={"help": help, "parse": parse, "check": check, "metavar": metavar},
    )


@dataclass(frozen=True)
class ManagerConfig:
    """Everything ``sharedpool serve`` can be told. Frozen: reload builds a new one."""

    pool_name: str = _spec("default", "name of this pool, shown in CLIENT LIST and errors", str)
    redis_url: str = _spec(
        "redis://127.0.0.1:6379/0",
        "Redis to share: redis://[user:password@]host:port/db or unix:///path?db=N",
        str,
        redis_url,
        "URL",
    )
    redis_url_file: str = _spec(
        "", "read redis_url from this file (keeps the password out of argv)", str, None, "PATH"
    )
    socket_path: str = _spec(
        "", "control socket path [default: /tmp/sharedpool-<uid>/sharedpool.sock]", str, None, "PATH"
    )
    socket_mode: int = _spec(0o600, "permission bits of the control socket, octal", parse_octal, socket_mode, "MODE")
    socket_group: str = _spec(
        "", "group (name or gid) that owns the socket and its directory, to share them with socket_mode 660", str, None, "GROUP"
    )
    allowed_uids: tuple[int, ...] = _spec(
        (), "uids allowed to connect, comma separated [default: the manager's own uid]", parse_uid_list, None, "UIDS"
    )
    databases: tuple[int, ...] = _spec(
        (), "databases served, e.g. 0-15 or 0,2,5-7 (the redis_url's db is the default one) [default: 0-15]",
        parse_databases, None, "DBS",
    )
    max_connections: int = _spec(
        10, "most Redis connections the manager opens, all databases together", int, int_range(1, 10_000), "N"
    )
    max_connections_per_database: int = _spec(
        0, "most connections one database may have open (0: only max_connections bounds it)", int, int_range(0, 10_000), "N"
    )
    min_idle: int = _spec(
        1, "idle connections kept open per warm database: the default one, and each one listed in databases",
        int, int_range(0, 10_000), "N",
    )
    client_name: str = _spec(
        "sharedpool:{pool}:{slot}", "CLIENT SETNAME of each connection: {pool}, {slot}, {db} filled in (empty: none)",
        str, client_name, "TEMPLATE",
    )
    acquire_timeout: float = _spec(
        5.0, "seconds a worker waits for a lease before PoolTimeout", float, positive_float, "SECONDS",
    )
    max_leases_per_worker: int = _spec(
        0, "most leases one worker process may hold at once (0: no limit)", int, int_range(0, 10_000), "N",
    )
    max_waiting: int = _spec(256, "most workers queued for a lease; more are refused at once", int, int_range(0, 1_000_000), "N")
    max_lifetime: float = _spec(
        3600.0, "seconds before an idle connection is recycled (0: never)", float, non_negative_float, "SECONDS",
    )
    idle_timeout: float = _spec(
        600.0, "seconds idle before a connection above min_idle is closed (0: never)", float, non_negative_float, "SECONDS",
    )
    health_check_interval: float = _spec(
        30.0, "seconds between health checks of idle connections (0: off)", float, non_negative_float, "SECONDS",
    )
    leak_threshold: float = _spec(
        30.0, "seconds a lease may be held before a warning is logged (0: off)", float, non_negative_float, "SECONDS",
    )
    max_lease_time: float = _spec(
        0.0, "seconds after which a held lease is revoked (0: never)", float, non_negative_float, "SECONDS",
    )
    reap_interval: float = _spec(1.0, "seconds between sweeps for dead lease holders", float, positive_float, "SECONDS")
    shutdown_grace: float = _spec(
        10.0, "seconds to wait for leases on SIGTERM before closing anyway", float, non_negative_float, "SECONDS",
    )
    redis_timeout: float = _spec(
        5.0, "socket and connect timeout of the manager's own Redis I/O", float, positive_float, "SECONDS",
    )
    protocol: int = _spec(3, "RESP version the connections are set up with", int, choice(2, 3), "2|3")
    max_clients: int = _spec(1024, "most control connections at once; more are refused", int, int_range(1, 1_000_000), "N")
    handshake_timeout: float = _spec(5.0, "seconds a new control connection has to send HELLO", float, positive_float, "SECONDS")
    log_level: str = _spec(
        "INFO", "DEBUG, INFO, WARNING or ERROR", str.upper, choice("DEBUG", "INFO", "WARNING", "ERROR"), "LEVEL",
    )
    log_format: str = _spec("text", "text, or json (one object per line)", str.lower, choice("text", "json"), "FORMAT")
    metrics_port: int = _spec(0, "serve Prometheus metrics on this TCP port (0: off)", int, int_range(0, 65535), "PORT")
    metrics_host: str = _spec("127.0.0.1", "address the metrics endpoint listens on", str, None, "HOST")
    # rediss:// only, redis-py's names; empty: the URL's query parameter, else the default in brackets.
    ssl_cert_reqs: str = _spec("", "verify Redis's certificate: required, optional or none [required]", str, None, "REQS")
    ssl_ca_certs: str = _spec("", "CA bundle that signs Redis's certificate [the system's]", str, None, "PATH")
    ssl_ca_path: str = _spec("", "directory of CA certificates (c_rehash layout)", str, None, "DIR")
    ssl_ca_data: str = _spec("", "CA certificates as PEM text", str, None, "PEM")
    ssl_certfile: str = _spec("", "client certificate, for mutual TLS", str, None, "PATH")
    ssl_keyfile: str = _spec("", "client certificate's private key", str, None, "PATH")
    ssl_password: str = _spec("", "password of ssl_keyfile (never logged)", str, None, "PASSWORD")
    ssl_check_hostname: str = _spec(
        "", "check that the certificate names the URL's host: true or false [true]", str, None, "BOOL",
    )
    ssl_min_version: str = _spec("", "TLSv1_2 or TLSv1_3; TLS 1.3 is needed either way [TLSv1_3]", str, None, "VERSION")
    # Sentinel: the master's address comes from the Sentinels, its password and database from redis_url.
    sentinels: tuple[tuple[str, int], ...] = _spec(
        (), "Sentinels to ask for the master, host:port,host:port (set: redis_url's host and port are not used)",
        parse_addresses, None, "ADDRS",
    )
    sentinel_service: str = _spec("", "name of the master the Sentinels monitor (sentinel monitor NAME ...)", str, None, "NAME")
    sentinel_username: str = _spec("", "username for the Sentinels' own AUTH (ACL)", str, None, "USER")
    sentinel_password: str = _spec(
        "", "password of the Sentinels' own AUTH, not the master's (never logged)", str, None, "PASSWORD",
    )
    sentinel_timeout: float = _spec(
        1.0, "seconds each Sentinel has to answer a query before the next one is asked", float, positive_float, "SECONDS",
    )
    # Redis Cluster (manager/cluster.py): redis_url names a seed node.
    cluster: bool = _spec(
        False, "serve a Redis Cluster: redis_url is a seed node, every node gets its own connections", parse_bool,
        None, "BOOL",
    )
    max_connections_per_node: int = _spec(
        0, "cluster: most connections one node may have open (0: only max_connections bounds it)", int,
        int_range(0, 10_000), "N",
    )
    cluster_refresh_interval: float = _spec(
        5.0, "cluster: seconds between node list refreshes (CLUSTER SHARDS)", float, positive_float, "SECONDS",
    )

    def __post_init__(self) -> None:
        if not self.socket_path:
            object.__setattr__(self, "socket_path", default_socket_path())
        if self.socket_group:
            socket_gid(self.socket_group)  # refuse an unknown group at start
        if self.min_idle > self.max_connections:
            raise ConfigError(
                "min_idle", self.min_idle, f"at most max_connections ({self.max_connections})"
            )
        tls_options(self)  # refuses a bad ssl_* value, or one given for a plain URL, at start
        _check_sentinel(self)
        default_db = url_database(self.redis_url)
        if self.cluster and self.sentinels:
            # A cluster fails over by itself; Sentinel watches one master and its replicas.
            raise ConfigError("cluster", True, "false with sentinels (a Redis Cluster is not monitored by Sentinel)")
        if self.cluster:
            self._check_cluster(default_db)
        elif default_db not in self.served_databases:
            raise ConfigError(
                "databases", format_databases(self.served_databases),
                f"a list that includes db {default_db}, the default database named by redis_url",
            )

    def _check_cluster(self, default_db: int) -> None:
        scheme = urlsplit(self.redis_url).scheme
        if scheme != "redis":
            raise ConfigError("redis_url", mask_url(self.redis_url), "with cluster: a redis://host:port seed node "
                              "(unix sockets and rediss:// are not served in cluster mode)")
        if default_db:
            raise ConfigError("redis_url", mask_url(self.redis_url), "with cluster: database 0 (a cluster has no other)")
        if self.databases:
            raise ConfigError("databases", format_databases(self.databases), "unset with cluster (nodes take their place)")
        if self.max_connections_per_database:
            raise ConfigError("max_connections_per_database", self.max_connections_per_database,
                              "0 with cluster: use max_connections_per_node")

    @property
    def served_databases(self) -> tuple[int, ...]:
        """The databases this manager serves (``databases``, or 0-15 when not set)."""
        return self.databases or DEFAULT_DATABASES

    @property
    def default_database(self) -> int:
        """The database of a client that names none: the one in ``redis_url``."""
        return url_database(self.redis_url)

    @property
    def warm_databases(self) -> tuple[int, ...]:
        """Databases ``min_idle`` applies to: the default one, and each one listed
        explicitly in ``databases`` (the implicit 0-15 does not open 16 x min_idle)."""
        return tuple(sorted({self.default_database, *self.databases}))

    def safe_dict(self) -> dict[str, Any]:
        """The config as plain data with the Redis password masked."""
        values = dataclasses.asdict(self)
        values["redis_url"] = mask_url(self.redis_url)
        values["ssl_password"] = "***" if self.ssl_password else ""
        values["sentinel_password"] = "***" if self.sentinel_password else ""
        values["sentinels"] = format_addresses(self.sentinels)
        values["socket_mode"] = f"{self.socket_mode:o}"
        values["allowed_uids"] = list(self.allowed_uids)
        values["databases"] = format_databases(self.served_databases)
        return values

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.safe_dict().items())
        return f"ManagerConfig({fields})"


@dataclass(frozen=True)
class ClientConfig:
    """What a worker needs to find and use the manager."""

    socket_path: str = _spec("", "control socket of the manager", str, None, "PATH")
    acquire_timeout: float = _spec(
        0.0, "seconds to wait for a lease (0: the manager's acquire_timeout)", float, non_negative_float, "SECONDS"
    )
    manager_timeout: float = _spec(
        5.0, "seconds to keep retrying when no manager answers (0: fail at once)", float, non_negative_float, "SECONDS"
    )

    def __post_init__(self) -> None:
        if not self.socket_path:
            object.__setattr__(self, "socket_path", default_socket_path())


def _check_sentinel(config: ManagerConfig) -> None:
    if bool(config.sentinels) != bool(config.sentinel_service):
        given, missing = ("sentinels", "sentinel_service") if config.sentinels else ("sentinel_service", "sentinels")
        value = format_addresses(config.sentinels) if config.sentinels else config.sentinel_service
        raise ConfigError(given, value, f"set together with {missing} (the Sentinels, and the master's name they know)")
    if not config.sentinels:
        for name in ("sentinel_username", "sentinel_password"):
            if getattr(config, name):
                raise ConfigError(name, "***" if name == "sentinel_password" else getattr(config, name),
                                  "set only with sentinels and sentinel_service")
        return
    if urlsplit(config.redis_url).scheme != "redis":
        raise ConfigError(
            "redis_url", mask_url(config.redis_url),
            "a redis:// URL with sentinels (the master is reached by TCP; rediss:// with Sentinel is not supported yet)",
        )


def socket_gid(group: str) -> int:
    import grp

    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError("socket_group", group, "an existing group name or a numeric gid") from None


def tls_options(config: ManagerConfig) -> Any:
    """The ``TLSOptions`` of a rediss:// config (None for redis:// and unix://); refuses bad ``ssl_*`` values."""
    given = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name.startswith("ssl_")}
    if urlsplit(config.redis_url).scheme != "rediss":
        named = sorted(name for name, value in given.items() if value)
        if named:
            value = "***" if named[0] == "ssl_password" else given[named[0]]
            raise ConfigError(named[0], value, "set only with a rediss:// redis_url")
        return None
    from sharedpool.tls.handshake import options_from

    try:
        return options_from(config.redis_url, given)
    except ValueError as exc:
        name = str(exc).partition("=")[0]
        raise ConfigError(name, "***" if name == "ssl_password" else str(exc).partition("=")[2].partition(":")[0],
                          str(exc).partition(": expected ")[2] or str(exc)) from None


def mask_url(url: str) -> str:
    """``url`` with its password masked (``errors.mask_secrets``: any scheme, even a malformed URL)."""
    return mask_secrets(url)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _convert(cls: type, name: str, raw: Any, source: str) -> Any:
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    parse = spec.metadata["parse"]
    try:
        if isinstance(raw, str):
            value = parse(raw)
        elif isinstance(raw, bool) and parse is not parse_bool:
            raise ValueError(raw)
        elif parse is int and isinstance(raw, int):
            value = raw
        elif parse is float and isinstance(raw, (int, float)):
            value = float(raw)
        elif parse is parse_databases and isinstance(raw, (list, tuple)):
            if not raw or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_DATABASE for v in raw):
                raise ValueError(raw)
            value = tuple(sorted(set(raw)))
        elif parse is parse_databases and isinstance(raw, int) and not isinstance(raw, bool):
            value = parse_databases(str(raw))
        elif parse is parse_addresses and isinstance(raw, (list, tuple)) and all(isinstance(v, str) for v in raw):
            value = parse(",".join(raw))
        elif parse is parse_uid_list and isinstance(raw, (list, tuple)):
            value = tuple(int(v) for v in raw if not isinstance(v, bool) and isinstance(v, int))
            if len(value) != len(raw):
                raise ValueError(raw)
        elif parse is parse_bool and isinstance(raw, bool):
            value = raw
        elif parse is parse_octal and isinstance(raw, int):
            value = parse(str(raw))
        else:
            raise ValueError(raw)
    except (TypeError, ValueError):
        raise ConfigError(name, raw, _type_words(spec), source) from None
    check = spec.metadata["check"]
    if check is not None:
        problem = check(name, value)
        if problem:
            raise ConfigError(name, raw, problem, source)
    return value


def _type_words(spec: dataclasses.Field[Any]) -> str:
    parse = spec.metadata["parse"]
    if parse is int:
        return "an integer"
    if parse is float:
        return "a number"
    if parse is parse_octal:
        return "octal permission bits such as 600"
    if parse is parse_uid_list:
        return "a comma-separated list of integer uids"
    if parse is parse_bool:
        return "true or false"
    if parse is parse_addresses:
        return "host:port addresses, comma separated (a TOML list of them too)"
    if parse is parse_databases:
        return f"database numbers from 0 to {MAX_DATABASE}: a list, or ranges like 0-15 or 0,2,5-7"
    return "a string"


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_mode & (stat.S_IRWXO):
                mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
                raise ConfigError(
                    "config", path, f"a file others cannot read (mode is {mode:o}; it may hold the Redis password: chmod o-rwx)"
                )
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError("config", path, f"a readable TOML file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", path, f"valid TOML ({exc})") from None
    # Accept both a flat file and one with a [sharedpool] table.
    section = data.get("sharedpool", data)
    if not isinstance(section, dict):
        raise ConfigError("config", path, "a TOML table of settings")
    return section


def build(
    cls: type,
    *,
    toml: Mapping[str, Any] | None = None,
    toml_source: str = "config file",
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """Fill ``cls`` from defaults < toml < environment < overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in (toml or {}).items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(key, raw, "a known setting: " + ", ".join(sorted(names)), toml_source)
        values[name] = _convert(cls, name, raw, toml_source)
    environ = os.environ if environ is None else environ
    if "socket_path" in names and SOCKET_ENV_ALIAS in environ and env_name("socket_path") not in environ:
        values["socket_path"] = _convert(cls, "socket_path", environ[SOCKET_ENV_ALIAS], SOCKET_ENV_ALIAS)
    for name in names:
        key = env_name(name)
        if key in environ:
            values[name] = _convert(cls, name, environ[key], key)
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        if name not in names:
            raise ConfigError(name, raw, "a known setting: " + ", ".join(sorted(names)))
        values[name] = _convert(cls, name, raw, flag_name(name))
    if values.get("redis_url_file") and (overrides or {}).get("redis_url") is None:
        values["redis_url"] = _read_url_file(cls, values["redis_url_file"])
    return cls(**values)


def _read_url_file(cls: type, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            url = handle.read().strip()
    except OSError as exc:
        raise ConfigError("redis_url_file", path, f"a readable file ({exc.strerror})") from None
    return str(_convert(cls, "redis_url", url, f"redis_url_file {path}"))


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per field, help text with default and env name."""
    for spec in dataclasses.fields(cls):
        flags = [flag_name(spec.name)]
        if spec.name == "socket_path":
            flags.append("--socket")
        default = spec.default
        if spec.name == "socket_mode":
            shown = f"{default:o}"
        elif isinstance(default, tuple):
            shown = ",".join(str(d) for d in default) or "-"
        else:
            shown = str(default) if default != "" else "-"
        help_text = f"{spec.metadata['help']} [default: {shown}; env {env_name(spec.name)}]"
        if "[default:" in spec.metadata["help"]:
            # The help already says what the default means better than its value.
            help_text = f"{spec.metadata['help']} [env {env_name(spec.name)}]"
        if spec.name == "socket_path":
            help_text = f"{spec.metadata['help']} [env {env_name(spec.name)} or {SOCKET_ENV_ALIAS}]"
        parser.add_argument(
            *flags,
            dest=spec.name,
            default=None,
            # A switch (--cluster) that also takes a value (--cluster false), as env and TOML do.
            **({"nargs": "?", "const": "true"} if spec.metadata["parse"] is parse_bool else {}),  # type: ignore[arg-type]
            metavar=spec.metadata["metavar"] or spec.name.upper(),
            help=help_text,
        )


def from_args(cls: type, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    config_path = getattr(args, "config", None)
    toml = load_toml(config_path) if config_path else None
    return build(cls, toml=toml, toml_source=config_path or "", environ=environ, overrides=overrides)


def client_config(**overrides: Any) -> ClientConfig:
    """The client's settings: keyword arguments given (not None) win over SHAREDPOOL_* environment."""
    config: ClientConfig = build(ClientConfig, overrides=overrides)
    return config
