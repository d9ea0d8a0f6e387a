"""StoreConfig's remote settings are validated with the fix in the message; the circuit breaker's states."""

from __future__ import annotations

import pytest

from prophet_rag.cache.remote import RedisTier
from prophet_rag.cache.remote_guard import CircuitBreaker
from prophet_rag.config import StoreConfig
from prophet_rag.errors import InvalidRequestError, StoreError


def _config(tmp_path, **options) -> StoreConfig:
    return StoreConfig(directory=tmp_path, **{"auth_key_env": "SOME_KEY", **options})


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://cache.internal:6380", "redis://h/3",
                                 "redis://[::1]:6379/1", "redis://redis_primary.svc-1:1/"])
def test_redis_urls_are_accepted(tmp_path, url):
    assert _config(tmp_path, remote_url=url).remote_url == url


@pytest.mark.parametrize(("url", "fix"), [
    ("http://h:6379", "scheme 'http'"),
    ("unix:///tmp/redis.sock", "scheme 'unix'"),
    ("redis://", "names no host"),
    ("redis://h:99999", "not a valid URL"),
    ("redis://h/cache", "database number"),
    ("redis://h/²", "non-ASCII"),
    ("redis://h:6379/0#x", "fragment"),
    ("redis://h:0", "port 0"),
    ("redis://h%2Fx:1/0", "not a plain host name"),
    (6379, "must be a string"),
])
def test_bad_urls_are_refused_with_the_fix(tmp_path, url, fix):
    with pytest.raises(InvalidRequestError, match=fix) as error:
        _config(tmp_path, remote_url=url)
    assert "redis://host:6379/0" in str(error.value)


def test_a_password_in_the_url_is_refused_without_echoing_it(tmp_path):
    with pytest.raises(InvalidRequestError, match="remote_password_env") as error:
        _config(tmp_path, remote_url="redis://user:hunter2-secret@h:6379/0")
    assert "hunter2" not in str(error.value)


SECRET = "hunter2-secret"


@pytest.mark.parametrize(("query", "setting"), [
    (f"password={SECRET}", "password: remote_password_env"),
    ("socket_timeout=20", "socket_timeout: remote_timeout_s"),
    ("socket_connect_timeout=20", "remote_timeout_s"),
    ("ssl_cert_reqs=none", "TLS verification is always on"),
    ("ssl_check_hostname=false", "TLS verification is always on"),
    ("ssl_ca_certs=/tmp/ca.pem", "remote_tls_ca_file"),
    ("db=3", "the URL's path"),
    (f"{SECRET}=1", "StoreConfig setting."),
])
def test_options_in_the_url_are_refused_naming_the_setting_to_use(tmp_path, query, setting):
    # redis-py lets a URL's query override the client's arguments: a timeout, certificate checks, a password.
    for url in (f"redis://h:6379/0?{query}", f"rediss://h/0?x=1&{query}"):
        with pytest.raises(InvalidRequestError, match="options after '[?]'") as error:
            _config(tmp_path, remote_url=url)
        assert setting in str(error.value) and SECRET not in str(error.value)


@pytest.mark.parametrize("url", [f"redis://?password={SECRET}", f"redis:///0?{SECRET}", f"redis://{SECRET}:1:2/0",
                                 f"redis://h/{SECRET}", f"http://{SECRET}@h", f"redis://h:{SECRET}",
                                 f"redis://{SECRET}@h:1/0", f"redis://h:1/0#{SECRET}", f"redis://h:1/ {SECRET}",
                                 f"redis://:{SECRET}@/0"])
def test_no_refusal_echoes_what_the_url_holds(tmp_path, url):
    with pytest.raises(InvalidRequestError) as error:
        _config(tmp_path, remote_url=url)
    assert SECRET not in str(error.value)


def test_a_user_in_the_url_is_refused_naming_remote_username(tmp_path):
    with pytest.raises(InvalidRequestError, match="remote_username"):
        _config(tmp_path, remote_url="redis://app-user@h:1/0")


def test_tls_verification_is_spelled_out_for_the_client(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_KEY", "ab" * 32)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    tier = RedisTier(_config(tmp_path, remote_url="rediss://cache.internal:6380/0", remote_tls_ca_file=ca), "f" * 64)
    options = tier._client.connection_pool.connection_kwargs
    assert (options["ssl_cert_reqs"], options["ssl_check_hostname"], options["ssl_ca_certs"]) == (
        "required", True, str(ca))
    assert options["socket_timeout"] == 1.0
    tier.close()


def test_a_tls_ca_file_needs_tls_and_must_be_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_KEY", "ab" * 32)
    with pytest.raises(InvalidRequestError, match="rediss://"):
        _config(tmp_path, remote_url="redis://h:6379", remote_tls_ca_file=tmp_path / "ca.pem")
    config = _config(tmp_path, remote_url="rediss://h:6380", remote_tls_ca_file=tmp_path / "missing.pem")
    with pytest.raises(StoreError, match="remote_tls_ca_file .*cannot be read"):
        RedisTier(config, "f" * 64)


def test_a_shared_tier_requires_a_key(tmp_path):
    with pytest.raises(InvalidRequestError, match="auth_key_file") as error:
        StoreConfig(directory=tmp_path, remote_url="redis://h:6379")
    assert "openssl rand" in str(error.value)


def test_the_config_holds_the_name_of_the_password_variable_never_a_password(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_PW", "hunter2-secret")
    config = _config(tmp_path, remote_url="redis://h:6379", remote_username="svc", remote_password_env="REDIS_PW")
    assert "remote_password_env='REDIS_PW'" in repr(config) and "hunter2" not in repr(config)
    assert [f for f in StoreConfig.__dataclass_fields__ if "password" in f] == ["remote_password_env"]


@pytest.mark.parametrize(("option", "value"), [
    ("remote_timeout_s", 0), ("remote_timeout_s", 61), ("remote_timeout_s", float("nan")), ("remote_timeout_s", "1"),
    ("remote_namespace", ""), ("remote_namespace", "a b"), ("remote_namespace", "{tag}"),
    ("remote_namespace", "x" * 65),
    ("remote_ttl_s", 0), ("remote_ttl_s", 1.5), ("remote_breaker_failures", 0), ("remote_breaker_failures", True),
    ("remote_breaker_cooldown_s", 0), ("remote_password_env", "not a name"), ("remote_username", "a user"),
    ("remote_username", ""),
])
def test_bad_remote_settings_are_refused(tmp_path, option, value):
    with pytest.raises(InvalidRequestError, match=option):
        _config(tmp_path, remote_url="redis://h:6379", **{option: value})


def test_without_a_url_nothing_remote_is_required(tmp_path):
    config = StoreConfig(directory=tmp_path)
    assert config.remote_url is None and config.remote_timeout_s == 1.0


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_the_threshold_of_failures_in_a_row():
    clock = _Clock()
    breaker = CircuitBreaker(3, 10.0, clock)
    for _ in range(2):
        assert breaker.allow() and breaker.failed() is False
    breaker.succeeded()  # a success resets the run
    assert [breaker.failed() for _ in range(3)] == [False, False, True]
    assert breaker.is_open and breaker.opens == 1
    assert breaker.allow() is False


def test_the_breaker_lets_one_probe_through_after_the_cooldown():
    clock = _Clock()
    breaker = CircuitBreaker(1, 10.0, clock)
    breaker.failed()
    clock.now += 9.9
    assert breaker.allow() is False
    clock.now += 0.2
    assert breaker.allow() is True
    assert breaker.allow() is False  # one probe at a time
    breaker.succeeded()
    assert not breaker.is_open and breaker.allow() and breaker.allow()


def test_a_failed_probe_reopens_the_breaker_for_another_cooldown():
    clock = _Clock()
    breaker = CircuitBreaker(2, 5.0, clock)
    breaker.failed()
    breaker.failed()
    clock.now += 5.0
    assert breaker.allow()
    assert breaker.failed() is False  # already open: not a new opening
    assert breaker.opens == 1
    clock.now += 4.9
    assert breaker.allow() is False
    clock.now += 0.1
    assert breaker.allow() is True
