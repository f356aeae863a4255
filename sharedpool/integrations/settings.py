"""The server integrations' settings, and the private socket directory of an embedded manager.

``IntegrationSettings`` says how a server's master fits sharedpool in
(embedded manager or not, where the control socket is, the embedded
manager's config file, log and timeouts); its ``manager`` field holds
``ManagerConfig`` overrides for the embedded manager. ``settings_from()``
fills it from ``SHAREDPOOL_*`` variables and keyword overrides.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sharedpool import config as _config
from sharedpool import errors
from sharedpool.config import ENV_PREFIX, SOCKET_ENV_ALIAS, ManagerConfig
from sharedpool.config_values import parse_bool

log = logging.getLogger("sharedpool.integrations")

SOCKET_ENV = _config.env_name("socket_path")  # SHAREDPOOL_SOCKET_PATH

_MANAGER_FIELDS = frozenset(f.name for f in dataclasses.fields(ManagerConfig))


@dataclass(frozen=True)
class IntegrationSettings:
    """The integration's settings; ``manager`` holds ``ManagerConfig`` overrides."""

    embedded: bool = False
    socket_path: str = ""
    config_file: str = ""
    manager_log: str = ""
    start_timeout: float = 15.0
    report_timeout: float = 1.0
    manager: Mapping[str, Any] = field(default_factory=dict)


_SETTING_ENV = {
    "embedded": ENV_PREFIX + "EMBEDDED",
    "config_file": ENV_PREFIX + "CONFIG",
    "manager_log": ENV_PREFIX + "MANAGER_LOG",
    "start_timeout": ENV_PREFIX + "START_TIMEOUT",
    "report_timeout": ENV_PREFIX + "REPORT_TIMEOUT",
}


def _parse_setting(name: str, raw: Any, source: str) -> Any:
    if name == "embedded":
        if isinstance(raw, bool):
            return raw
        try:
            return parse_bool(str(raw))
        except ValueError:
            raise errors.ConfigError(name, raw, "1, true, yes, on, 0, false, no or off", source) from None
    if name in ("start_timeout", "report_timeout"):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise errors.ConfigError(name, raw, "a number of seconds", source) from None
        if isinstance(raw, bool) or not value > 0:
            raise errors.ConfigError(name, raw, "a number of seconds greater than 0", source)
        return value
    if not isinstance(raw, str):
        raise errors.ConfigError(name, raw, "a path", source)
    return raw


def settings_from(environ: Mapping[str, str] | None = None, **overrides: Any) -> IntegrationSettings:
    """Settings from ``SHAREDPOOL_*`` variables, overridden by keyword arguments.

    Keyword arguments are the ``IntegrationSettings`` fields other than ``manager``,
    plus any ``ManagerConfig`` field (``max_connections=2``,
    ``redis_url=...``), which goes to the embedded manager. Every value is
    checked here, so a typo stops the server at start, naming the setting.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, key in _SETTING_ENV.items():
        if environ.get(key, "") != "":
            values[name] = _parse_setting(name, environ[key], key)
    socket_path = environ.get(SOCKET_ENV) or environ.get(SOCKET_ENV_ALIAS) or ""
    manager: dict[str, Any] = {}
    for name, raw in overrides.items():
        if raw is None:
            continue
        if name == "socket_path":
            socket_path = str(raw)
        elif name in _SETTING_ENV:
            values[name] = _parse_setting(name, raw, f"configure({name}=...)")
        elif name in _MANAGER_FIELDS:
            manager[name] = raw
        else:
            allowed = sorted(set(_SETTING_ENV) | _MANAGER_FIELDS)
            raise errors.ConfigError(name, raw, "a known setting: " + ", ".join(allowed), "configure()")
    if manager:
        # Convert and check now, with the same rules as 'sharedpool serve'.
        checked = _config.build(ManagerConfig, environ={}, overrides=manager)
        manager = {name: getattr(checked, name) for name in manager}
    return IntegrationSettings(socket_path=socket_path, manager=manager, **values)


def manager_config(settings: IntegrationSettings, environ: Mapping[str, str] | None = None) -> ManagerConfig:
    """The config the embedded manager will run with: file < environment < settings."""
    toml = _config.load_toml(settings.config_file) if settings.config_file else None
    overrides = dict(settings.manager)
    if settings.socket_path:
        overrides["socket_path"] = settings.socket_path
    built: ManagerConfig = _config.build(
        ManagerConfig, toml=toml, toml_source=settings.config_file, environ=environ, overrides=overrides
    )
    return built


def private_socket_path(server: str) -> str:
    """A control socket in a fresh 0700 directory of its own (``mkdtemp``).

    The directory is removed at exit by the process that made it (not by
    the workers it forks, which inherit the ``atexit`` handler).
    """
    directory = tempfile.mkdtemp(prefix=f"sharedpool-{server}-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            remove_private_dir(directory)

    atexit.register(remove)
    return os.path.join(directory, "sp.sock")


def remove_private_dir(directory: str) -> None:
    """Remove a directory made by ``private_socket_path`` unless a manager still holds it."""
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if name.endswith(".lock") and not _lock_is_free(os.path.join(directory, name)):
            log.info("not removing %s: a manager still serves from it", directory)
            return
    shutil.rmtree(directory, ignore_errors=True)


def _lock_is_free(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
