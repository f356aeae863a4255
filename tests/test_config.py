"""Configuration: precedence, refusals, and the CLI that documents it all."""

from __future__ import annotations

import dataclasses
import os

import pytest
from support.cli import run_cli

from sharedpool import config
from sharedpool.config import ManagerConfig
from sharedpool.errors import ConfigError


def test_precedence_defaults_toml_env_flags(tmp_path) -> None:
    toml = {"max_connections": 7, "min_idle": 2, "acquire_timeout": 3}
    built = config.build(ManagerConfig, toml=toml, environ={"SHAREDPOOL_MAX_CONNECTIONS": "9"}, overrides={"min_idle": "4"})
    assert (built.max_connections, built.min_idle, built.acquire_timeout) == (9, 4, 3.0)
    assert built.max_waiting == 256  # untouched default


@pytest.mark.parametrize(
    "source, message",
    [
        ({"overrides": {"max_connections": "many"}}, "invalid max_connections='many' (from --max-connections): an integer"),
        ({"overrides": {"max_connections": "0"}}, "an integer from 1 to 10000"),
        (
            {"environ": {"SHAREDPOOL_ACQUIRE_TIMEOUT": "-2"}},
            "invalid acquire_timeout='-2' (from SHAREDPOOL_ACQUIRE_TIMEOUT): a number of seconds greater than 0",
        ),
        ({"toml": {"max_conections": 3}}, "invalid max_conections=3 (from config file): a known setting"),
        ({"toml": {"max_connections": 2.5}}, "invalid max_connections=2.5 (from config file): an integer"),
        ({"overrides": {"min_idle": "5", "max_connections": "2"}}, "invalid min_idle=5: at most max_connections (2)"),
        ({"overrides": {"socket_mode": "666"}}, "invalid socket_mode='666'"),
        ({"overrides": {"protocol": "4"}}, "invalid protocol='4' (from --protocol): one of 2, 3"),
        ({"overrides": {"redis_url": "http://x"}}, "a redis://host:port/db or unix:///path/to/redis.sock URL"),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(source: dict, message: str) -> None:
    source.setdefault("environ", {})
    with pytest.raises(ConfigError) as caught:
        config.build(ManagerConfig, **source)
    assert message in str(caught.value)


def test_password_comes_from_file_and_is_masked(tmp_path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text("redis://:hunter2@10.0.0.1:6379/0\n")
    built = config.build(ManagerConfig, environ={}, overrides={"redis_url_file": str(url_file)})
    assert built.redis_url == "redis://:hunter2@10.0.0.1:6379/0"
    assert "hunter2" not in repr(built)
    assert built.safe_dict()["redis_url"] == "redis://:***@10.0.0.1:6379/0"


def test_world_readable_config_file_is_refused(tmp_path) -> None:
    path = tmp_path / "sharedpool.toml"
    path.write_text('redis_url = "redis://:pw@localhost:6379"\n')
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="others cannot read"):
        config.load_toml(str(path))
    os.chmod(path, 0o600)
    assert config.load_toml(str(path))["redis_url"].startswith("redis://")


def test_client_socket_from_environment() -> None:
    built = config.build(config.ClientConfig, environ={"SHAREDPOOL_SOCKET": "/run/x.sock"})
    assert built.socket_path == "/run/x.sock"
    assert config.build(config.ClientConfig, environ={}).socket_path == f"/tmp/sharedpool-{os.getuid()}/sharedpool.sock"


def test_serve_help_documents_every_option() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for spec in dataclasses.fields(ManagerConfig):
        assert config.flag_name(spec.name) in result.stdout
        assert config.env_name(spec.name) in result.stdout
    top = run_cli("--help")
    assert "serve" in top.stdout and "stats" in top.stdout


def test_serve_refuses_bad_flag_with_exit_2(tmp_path) -> None:
    result = run_cli("serve", "--socket", str(tmp_path / "s"), "--max-connections", "-3")
    assert result.returncode == 2
    assert "invalid max_connections='-3' (from --max-connections): an integer from 1 to 10000" in result.stderr
