"""Typed, frozen configuration, validated where it is built.

`SelectionConfig` says which context tokens are recomputed, `GenerationConfig` how the answer is decoded,
`PromptConfig` how a request is laid out, `StoreConfig` where chunk KV caches live, `PrefixCacheConfig` how much
of finished requests' KV is kept for the next turn of their conversations and `BatchConfig` how many requests are
decoded together.
"""

from __future__ import annotations

import ipaddress
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from prophet_rag.errors import InvalidRequestError
from prophet_rag.methods import REGISTRY

DEFAULT_INSTRUCTION = (
    "Answer the question using the documents below. Only give the answer and do not output any other words."
)


def _is_number(value: object) -> bool:
    # bool is an int to Python, never a sensible count or ratio here.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: object, minimum: int, hint: str) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise InvalidRequestError(f"{name} must be an integer >= {minimum}{hint}, got {value!r}.")


def _check_ratio(name: str, value: float) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise InvalidRequestError(
            f"{name} must be a number in [0, 1], got {value!r}; 0.2 recomputes 20% of the context."
        )


def _strings(name: str, value: object) -> tuple[str, ...]:
    """`value` as a tuple of non-empty strings; a single string is one string, not its characters."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (tuple, list)) or not all(isinstance(s, str) and s for s in items):
        raise InvalidRequestError(f"{name} must be a string or a list of non-empty strings, got {value!r}.")
    return tuple(items)


@dataclass(frozen=True)
class SelectionConfig:
    """Which context tokens are recomputed for a request.

    `ratio` is the share of eligible context tokens (chunks only; the exact prefix and the fresh suffix never count)
    that is recomputed: the budget is `floor(ratio * eligible)`.
    """

    method: str = "prophet_focus"
    ratio: float = 0.2
    cacheblend_check_layer: int = 1
    infoflow_layers: tuple[int, ...] | None = None
    reorder_chunks: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in REGISTRY:
            raise InvalidRequestError(f"unknown method {self.method!r}; choose one of {', '.join(REGISTRY)}.")
        _check_ratio("ratio", self.ratio)
        _check_int("cacheblend_check_layer", self.cacheblend_check_layer, 1, " (layer 0 is always recomputed)")
        layers = self.infoflow_layers
        if layers is not None:
            if not isinstance(layers, (tuple, list)) or not layers or not all(
                    isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0 for x in layers):
                raise InvalidRequestError(
                    f"infoflow_layers must be a non-empty tuple of layer indices >= 0, got {layers!r}."
                )
            object.__setattr__(self, "infoflow_layers", tuple(int(x) for x in layers))
        if not isinstance(self.reorder_chunks, bool):
            raise InvalidRequestError(f"reorder_chunks must be True or False, got {self.reorder_chunks!r}.")
        _check_int("seed", self.seed, 0, "")


@dataclass(frozen=True)
class GenerationConfig:
    """How the answer is decoded. `temperature=0` is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, "")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}.")
        _check_int("top_k", self.top_k, 0, " (0 disables it)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}.")
        object.__setattr__(self, "stop", _strings("stop", self.stop))
        if self.eos_token_ids is not None:
            ids = self.eos_token_ids
            if not isinstance(ids, (tuple, list)) or not all(
                    isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
                raise InvalidRequestError(f"eos_token_ids must be a tuple of token ids, got {ids!r}.")
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in ids))
        if self.seed is not None:
            _check_int("seed", self.seed, 0, " (or None)")


@dataclass(frozen=True)
class BatchConfig:
    """How many requests an engine decodes together (continuous batching, `compute/batcher.py`).

    Up to `max_batch` requests hold a place at once: each is prefilled on its caller's thread, then decoded with the
    others, one forward pass per step over all of them. Up to `max_waiting` more callers wait for a place, first come
    first served; a request beyond those raises `OverloadedError` when it starts. `max_batch=1` turns batching off:
    requests then run one after another. With `batch_prefills`, the forward passes of prefills (the question's Stage I
    pass, the selective forward) run in the decode steps too, together with those of the other requests prefilling
    at the same time; without it, each prefill runs its passes alone, between the steps.

    `prefill_priority` puts a new request's first token before the running requests' next tokens, as vLLM's
    scheduler does, so its time to first token is not spent behind their decode steps: a prefill's turns under the
    compute lock (assembling its cache, choosing its rows) go before a decode step waiting for the lock, and a step
    with prefill passes waiting runs those passes without the decode rows. Either happens at most
    `prefill_priority` times in a row before the decode step runs, so decoding never stalls for longer. 0: turns
    in arrival order and passes run together with the decode rows.
    """

    max_batch: int = 8
    max_waiting: int = 64
    batch_prefills: bool = True
    prefill_priority: int = 8

    def __post_init__(self) -> None:
        _check_int("max_batch", self.max_batch, 1, " (1 turns batching off)")
        _check_int("max_waiting", self.max_waiting, 0, " (0: refuse a request when every place is taken)")
        _check_int("prefill_priority", self.prefill_priority, 0, " (0: prefills and decode steps in arrival order)")
        if not isinstance(self.batch_prefills, bool):
            raise InvalidRequestError(f"batch_prefills must be True or False, got {self.batch_prefills!r}.")


@dataclass(frozen=True)
class PromptConfig:
    """How a request `prefix | chunk_1 ... chunk_m | suffix` is laid out.

    The prefix is the chat template's start, the system prompt and `instruction`; each chunk is a document followed
    by `chunk_separator`; the suffix is `question_template` filled with the query, the template's end and the
    assistant start. `system_prompt=None` keeps the chat template's own default.
    """

    system_prompt: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    chunk_separator: str = "\n\n"
    question_template: str = "Question: {query}"

    def __post_init__(self) -> None:
        for name in ("instruction", "chunk_separator", "question_template"):
            if not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"{name} must be a string, got {getattr(self, name)!r}.")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise InvalidRequestError(f"system_prompt must be a string or None, got {self.system_prompt!r}.")
        if "{query}" not in self.question_template:
            raise InvalidRequestError(
                f"question_template must contain '{{query}}', got {self.question_template!r}."
            )


@dataclass(frozen=True)
class PrefixCacheConfig:
    """The conversation prefix cache (cache/prefix_cache.py): the KV of finished requests, kept in memory on the
    model's device so that a request starting with the same tokens (the next turn of a conversation) computes only
    what follows.

    `max_bytes` bounds the KV kept (0, the default, turns the cache off); the least recently used blocks go first.
    KV is kept in blocks of `block_tokens` tokens, and a lookup finds the longest stored prefix in whole blocks.
    """

    max_bytes: int = 0
    block_tokens: int = 16

    def __post_init__(self) -> None:
        _check_int("max_bytes", self.max_bytes, 0, " (bytes of KV; 0 turns the prefix cache off)")
        _check_int("block_tokens", self.block_tokens, 1, " (tokens per cached block; 16 is a good default)")


STORAGES = ("lossless", "bfloat16", "float8_e4m3")
"""How stored KV is encoded (`StoreConfig.kv_storage`): as computed, or compacted to bf16 or to fp8 (e4m3, one scale
per layer, K/V and head)."""

MODEL_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a model may be loaded in by name (`prophet-rag --dtype`, `ReplicaSpec.dtype`,
`engine.loading.model_dtype`); "auto" is the loader's default, fp32 on a CPU and bf16 on CUDA."""


@dataclass(frozen=True)
class StoreConfig:
    """Where chunk KV caches are kept: a diskcache directory bounded by `size_limit_bytes` (LRU eviction).

    `kv_storage` compacts stored KV: "lossless" (default) keeps it as computed; "bfloat16" halves an fp32 model's
    entries; "float8_e4m3" (fp8 with one scale per layer, K/V and head) halves a bf16/fp16 model's. Compact entries
    have their own keys, so they never mix with lossless ones.

    An authentication key (`auth_key_file`, a file of at least 32 random bytes, or `auth_key_env`, the name of an
    environment variable holding them) makes every entry carry a keyed BLAKE3 MAC, and entries without a valid one
    are never used: required for a store that other machines or users can write. Without a key, entries carry an
    XXH3 checksum, which catches corruption but not forgery (see README, "The store").

    `remote_url` (`redis://host:port/db`, or `rediss://` for TLS) adds a shared tier on a Redis or Valkey server
    behind the disk store (cache/remote.py); it requires an authentication key, since other machines write it. The
    URL holds the scheme, host, port and database number only: every other option is a setting of its own. The
    password is read from the environment variable `remote_password_env` (never written into the config), the ACL
    user is `remote_username`. Over TLS the server's certificate and host name are always verified, against the
    system's CAs or the PEM file `remote_tls_ca_file`. Every operation on the server waits at most `remote_timeout_s`,
    and one request spends at most `remote_request_budget_s` on the server (plus the operation under way when it runs
    out): the rest of its reads and writes there are skipped and recomputed, and the request counts as a failure.
    After `remote_breaker_failures` failures in a row the server is skipped for `remote_breaker_cooldown_s`, then
    probed again. `remote_ttl_s` (None: no expiry) gives entries a lifetime; otherwise the server's `maxmemory` policy
    evicts.
    """

    directory: Path = field(default_factory=lambda: default_store_dir())
    size_limit_bytes: int = 8 * 2**30
    max_entry_bytes: int = 2 * 2**30
    eviction_policy: str = "least-recently-used"
    kv_storage: str = "lossless"
    auth_key_file: Path | None = None
    auth_key_env: str | None = None
    remote_url: str | None = None
    remote_username: str | None = None
    remote_password_env: str | None = None
    remote_tls_ca_file: Path | None = None
    remote_timeout_s: float = 1.0
    remote_request_budget_s: float = 1.0
    remote_namespace: str = "prophet-rag"
    remote_ttl_s: int | None = None
    remote_breaker_failures: int = 3
    remote_breaker_cooldown_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", _store_path("directory", self.directory))
        _check_int("size_limit_bytes", self.size_limit_bytes, 1, " (bytes)")
        _check_int("max_entry_bytes", self.max_entry_bytes, 1, " (bytes)")
        if self.max_entry_bytes > self.size_limit_bytes:
            raise InvalidRequestError(
                f"max_entry_bytes must be in (0, size_limit_bytes={self.size_limit_bytes}], got {self.max_entry_bytes}."
            )
        policies = ("least-recently-used", "least-recently-stored", "least-frequently-used")
        if self.eviction_policy not in policies:
            raise InvalidRequestError(f"eviction_policy must be one of {policies}, got {self.eviction_policy!r}.")
        if self.kv_storage not in STORAGES:
            raise InvalidRequestError(f"kv_storage must be one of {STORAGES}, got {self.kv_storage!r}.")
        if self.auth_key_file is not None and self.auth_key_env is not None:
            raise InvalidRequestError("set one of auth_key_file and auth_key_env, not both.")
        if self.auth_key_file is not None:
            object.__setattr__(self, "auth_key_file", _store_path("auth_key_file", self.auth_key_file))
        if self.auth_key_env is not None and (
            not isinstance(self.auth_key_env, str) or not self.auth_key_env.isidentifier()
        ):
            raise InvalidRequestError(
                f"auth_key_env must name an environment variable (letters, digits, _), got {self.auth_key_env!r}."
            )
        self._check_remote()

    def _check_remote(self) -> None:
        if self.remote_url is not None:
            _check_redis_url(self.remote_url)
            if self.auth_key_file is None and self.auth_key_env is None:
                raise InvalidRequestError(
                    "remote_url needs an authentication key: entries on a shared server are written by other "
                    "machines, so set auth_key_file (or auth_key_env) to the same key on every replica, for example "
                    "`openssl rand -hex 32 > ~/.prophet-rag.key; chmod 600 ~/.prophet-rag.key`."
                )
        if self.remote_username is not None and (
            not isinstance(self.remote_username, str) or not re.fullmatch(r"[^\s:@/]+", self.remote_username)
        ):
            raise InvalidRequestError(
                "remote_username must be a Redis ACL user name (no spaces, ':', '@' or '/'), got "
                f"{self.remote_username!r}."
            )
        if self.remote_tls_ca_file is not None:
            if not str(self.remote_url or "").startswith("rediss://"):
                raise InvalidRequestError(
                    "remote_tls_ca_file names the CA of a TLS server: use it with a rediss:// remote_url."
                )
            object.__setattr__(self, "remote_tls_ca_file", _store_path("remote_tls_ca_file", self.remote_tls_ca_file))
        if self.remote_password_env is not None and (
            not isinstance(self.remote_password_env, str) or not self.remote_password_env.isidentifier()
        ):
            raise InvalidRequestError(
                "remote_password_env must name an environment variable holding the password (letters, digits, _), "
                f"got {self.remote_password_env!r}."
            )
        if not _is_number(self.remote_timeout_s) or not 0 < self.remote_timeout_s <= 60:
            raise InvalidRequestError(
                f"remote_timeout_s must be a number of seconds in (0, 60], got {self.remote_timeout_s!r}; every "
                "request may wait this long for the server before it recomputes."
            )
        if not _is_number(self.remote_request_budget_s) or not 0 < self.remote_request_budget_s <= 600:
            raise InvalidRequestError(
                f"remote_request_budget_s must be a number of seconds in (0, 600], got "
                f"{self.remote_request_budget_s!r}; set it near what recomputing a request's chunks costs, since a "
                "request that spends it on the server recomputes the rest."
            )
        if not isinstance(self.remote_namespace, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}",
                                                                          self.remote_namespace):
            raise InvalidRequestError(
                f"remote_namespace must be 1-64 letters, digits, '.', '_' or '-', got {self.remote_namespace!r}."
            )
        if self.remote_ttl_s is not None:
            _check_int("remote_ttl_s", self.remote_ttl_s, 1, " (seconds, or None for no expiry)")
        _check_int("remote_breaker_failures", self.remote_breaker_failures, 1, "")
        if not _is_number(self.remote_breaker_cooldown_s) or self.remote_breaker_cooldown_s <= 0:
            raise InvalidRequestError(
                f"remote_breaker_cooldown_s must be a number of seconds > 0, got {self.remote_breaker_cooldown_s!r}."
            )


# What redis-py would take from a URL's query string, and the setting that says it instead. redis-py lets the query
# override the client's arguments, so an option there could lift the timeout, turn off certificate checks or carry
# a password.
_ALWAYS_VERIFIED = "none, TLS verification is always on"
_URL_OPTIONS = {
    "password": "remote_password_env", "username": "remote_username", "db": "the URL's path (/0)",
    "socket_timeout": "remote_timeout_s", "socket_connect_timeout": "remote_timeout_s",
    "ssl_ca_certs": "remote_tls_ca_file", "ssl_ca_path": "remote_tls_ca_file", "ssl_ca_data": "remote_tls_ca_file",
    "ssl_cert_reqs": _ALWAYS_VERIFIED, "ssl_check_hostname": _ALWAYS_VERIFIED,
}
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")


def _check_redis_url(url: object) -> None:
    """Refuse a remote_url that is not `redis[s]://host[:port][/db]`. A refusal never echoes the URL or its parts,
    which may hold a password."""
    usage = "use redis://host:6379/0, or rediss://host:6380/0 for TLS"
    if not isinstance(url, str):
        raise InvalidRequestError(f"remote_url must be a string; {usage}; got {type(url).__name__}.")
    if not url.isascii() or not url.isprintable() or any(ch.isspace() for ch in url):
        # urlsplit drops tabs and newlines where redis-py's parser may not: one reading of the URL only.
        raise InvalidRequestError(f"remote_url holds spaces, control or non-ASCII characters; {usage}.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidRequestError(f"remote_url is not a valid URL (a malformed host or port); {usage}.") from None
    if parts.scheme not in ("redis", "rediss"):
        raise InvalidRequestError(f"remote_url has scheme {parts.scheme!r}; {usage}.")
    if parts.password is not None:
        raise InvalidRequestError(
            "remote_url carries a password, which would show in the config and in logs; remove it from the URL and "
            "put it in an environment variable named by remote_password_env."
        )
    if parts.username is not None:
        raise InvalidRequestError(f"remote_url names a user: set remote_username instead; {usage}.")
    if "?" in url:
        names = sorted({name for name, _ in parse_qsl(parts.query, keep_blank_values=True) if name in _URL_OPTIONS})
        instead = "; ".join(f"{name}: {_URL_OPTIONS[name]}" for name in names)
        raise InvalidRequestError(
            "remote_url carries options after '?', which would override the engine's own settings or hold a secret; "
            f"the URL holds only scheme, host, port and database number ({usage}), every other option is a "
            f"StoreConfig setting{f' ({instead})' if instead else ''}."
        )
    if "#" in url:
        raise InvalidRequestError(f"remote_url has a '#' fragment; {usage}.")
    host = parts.hostname
    if not host or not (_HOST_NAME.fullmatch(host) or _is_ip_address(host)):
        raise InvalidRequestError(f"remote_url names no host, or not a plain host name or IP address; {usage}.")
    if port == 0:
        raise InvalidRequestError(f"remote_url has port 0; {usage}.")
    if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,5}", parts.path):
        raise InvalidRequestError(f"remote_url has a path that is not a database number; {usage}.")


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _store_path(name: str, value: object) -> Path:
    """`value` as an absolute path, with `~` expanded; a malformed one raises naming the fix."""
    if not isinstance(value, (str, Path)):
        raise InvalidRequestError(f"{name} must be a path (str or Path), got {type(value).__name__}.")
    text = str(value)
    if not text or "\x00" in text:
        raise InvalidRequestError(f"{name} {text!r} is empty or holds a NUL byte; pass a folder path.")
    path = Path(os.path.expanduser(text))  # Path.expanduser raises a bare RuntimeError for an unknown user
    if str(path).startswith("~"):
        raise InvalidRequestError(
            f"{name} {text!r} starts with '~' but names no known user's home; use an absolute path."
        )
    return path.absolute()


def cache_home() -> Path:
    """Root of prophet-rag's local caches: `$PROPHET_RAG_HOME` (when set and not empty), else `~/.cache/prophet_rag`.
    A `~user` that names no user is left as is, for `StoreConfig` to refuse with the fix."""
    return Path(os.path.expanduser(os.environ.get("PROPHET_RAG_HOME") or "~/.cache/prophet_rag"))


def default_store_dir() -> Path:
    return cache_home() / "kv"
