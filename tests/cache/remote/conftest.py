"""A real redis-server per test, on a free loopback port, started and stopped here (redis_processes.py)."""

from __future__ import annotations

import os
import shutil

import pytest

from prophet_rag.config import StoreConfig
from redis_processes import RedisServer, SlowProxy

KEY_ENV = "PROPHET_RAG_TEST_REMOTE_KEY"


@pytest.fixture
def slow_proxy(redis_server):
    """`slow_proxy(delay_s)`: a `SlowProxy` in front of `redis_server`, closed after the test."""
    proxies: list[SlowProxy] = []

    def start(delay_s: float) -> SlowProxy:
        proxies.append(SlowProxy(redis_server.port, delay_s))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.close()


@pytest.fixture(scope="session")
def redis_binary() -> str:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        message = ("redis-server is not installed: `make install` installs it (Debian: apt-get install "
                   "redis-server); the shared-tier tests need a real server.")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # CI must run these tests, never skip them
        pytest.skip(message)
    return binary


@pytest.fixture
def start_redis(redis_binary, tmp_path):
    """`start_redis(*args)`: a fresh server (extra redis-server arguments, e.g. "--requirepass", "pw")."""
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        servers.append(RedisServer(redis_binary, tmp_path / f"redis-{len(servers)}", *args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(start_redis) -> RedisServer:
    return start_redis()


@pytest.fixture
def auth_key(monkeypatch) -> str:
    key = "3f" * 32
    monkeypatch.setenv(KEY_ENV, key)
    return key


@pytest.fixture
def remote_config(tmp_path, redis_server, auth_key):
    """`remote_config(name, **options)`: a StoreConfig with its own local directory over the shared server."""

    def make(name: str = "local", **options) -> StoreConfig:
        options = {"remote_timeout_s": 0.5, "auth_key_env": KEY_ENV, **options}
        return StoreConfig(directory=tmp_path / name, remote_url=options.pop("remote_url", redis_server.url),
                           **options)

    return make
