"""The shared tier: chunk KV on a Redis or Valkey server, behind the local tiers, for replicas on several machines.

One entry is a header value and one value per layer, under names that share a hash tag (so a Redis Cluster keeps
an entry in one slot):

    {namespace}:2:{model_fp[:16]}:{<store key>}:h     the codec header (codec.py): fingerprints, shape, token and
                                                      sink ids, one tag per layer, the header's own MAC
    {namespace}:2:{model_fp[:16]}:{<store key>}:<l>   layer l: K [T, H_kv, D] then V, exactly a disk entry's region

so a value is one layer, never the whole entry, and an entry is read layer by layer into the request's cache. The
namespace carries the format version and the model's fingerprint: models, formats and deployments sharing a server
never see each other's entries, and `SCAN MATCH namespace:2:<fp>:*` finds one model's.

Entries are sealed and checked exactly as the disk store's (the same codec and `Sealer`): a shared tier requires
the keyed BLAKE3 MAC, the header must hash to the key it is stored under (token ids, sink ids hence positions,
fingerprints, shape, dtype, storage), every value must have the size the header announces and match its layer's tag.
An entry that fails is counted, deleted and recomputed; nothing unauthenticated is used.

A writer sends the layers, then the header, in one MULTI/EXEC transaction: the server applies all of it or, when the
writer dies or its connection drops before EXEC, none of it, so a half-written entry is never seen. The server owns
eviction: `remote_ttl_s` gives every value a lifetime, and a `maxmemory` policy (`allkeys-lru` is the one to use)
may drop any value, a layer without its header included: a read that finds a layer missing counts it as `partial`,
deletes what is left and recomputes.

Failure means recompute. Every operation waits at most `remote_timeout_s` (connect and each read or write, no
retries); a failed one is a miss or a skipped put, counted in `failures`. A server that answers, but slowly, would
pass every timeout while a request waits for dozens of round trips, so time on the server is also budgeted per
request (`remote_request_budget_s`, a request being the calls `chunk_cache` makes for one layout,
`tier.one_request`): the round trip that spends the budget ends the request's use of the server (the rest of its
gets are misses and its puts are skipped, counted in `over_budget_skips`) and counts as one failure (`over_budget`).
After `remote_breaker_failures` failures in a row the circuit breaker opens: for `remote_breaker_cooldown_s` the
server is not asked at all (`breaker_skips`), then one operation probes it, and its success within the budget closes
the breaker. A value of the wrong type (a list where a layer should be: planted or clobbered) is a bad entry,
deleted and counted as `corrupt`, never a server failure. Nothing raises out of `get`, `put` or `contains`. The
budget and the breaker are remote_guard.py's.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, fields

import torch

from prophet_rag.cache import codec
from prophet_rag.cache.codec import EntryMeta, Header, Sealer
from prophet_rag.cache.keys import FORMAT_VERSION, chunk_key
from prophet_rag.cache.remote_guard import CircuitBreaker, OverBudget, RequestBudget
from prophet_rag.cache.tier import ChunkRef, one_request, refusal_counter, request_state
from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.config import StoreConfig
from prophet_rag.errors import CacheCorruptionError, IncompatibleCacheError, InvalidRequestError, StoreError

logger = logging.getLogger(__name__)

# Values arrive as immutable bytes and are only ever read (hashed, then copied into the cache), so torch's warning
# about tensors over read-only buffers does not apply. torch warns once per process: spend that once here, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)

_FIRST_READ = 2**16
"""Bytes of the header asked for first: the whole header of any chunk up to ~8K tokens, in one round trip."""
_READ_SIZE = 2**20
"""Bytes the client asks the socket for at a time: redis-py's 32 KiB default costs a recv per 32 KiB of a layer."""
_BATCH_BYTES = 64 * 2**20
"""Layers asked for in one pipelined round trip, at most this many bytes together (bounds the bytes in flight)."""


@dataclass(frozen=True)
class RemoteStats:
    """Counters since the tier was opened (this process).

    Every `get` counts exactly one of hits, misses, corrupt, incompatible, unauthenticated, partial (a layer missing
    under its header: the server evicted or expired it), failures (the server down, slow, refusing), breaker_skips
    (not asked: the breaker was open) and over_budget_skips (not asked or abandoned: its request had spent
    `remote_request_budget_s` on the server). `skipped` counts puts that stored nothing (not storable, too large,
    failed or not asked: those also count in failures, breaker_skips or over_budget_skips). `over_budget` counts
    requests that spent their budget (each also a failure for the breaker). `breaker_opens` counts how often the
    breaker opened; `breaker_open` is its state.
    """

    hits: int
    misses: int
    corrupt: int
    incompatible: int
    unauthenticated: int
    partial: int
    failures: int
    breaker_skips: int
    over_budget_skips: int
    over_budget: int
    skipped: int
    breaker_opens: int
    bytes_read: int
    bytes_written: int
    breaker_open: bool


_COUNTERS = tuple(f.name for f in fields(RemoteStats) if f.name not in ("breaker_opens", "breaker_open"))


class _Evicted(Exception):
    """A layer value is gone while its header is there (server eviction or expiry)."""


def _redis():
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise StoreError(
            "StoreConfig.remote_url needs the redis client: pip install 'prophet-rag[remote]' (or `pip install redis`)."
        ) from None
    return redis, Retry(NoBackoff(), 0)


def _readable(path, setting: str) -> str:
    """`path` as a string once it is a readable file: a CA file that cannot be read would fail every connection,
    which the breaker would only count."""
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise StoreError(f"{setting} {str(path)!r} cannot be read ({error.strerror}); name a PEM file of CA "
                         "certificates.") from None
    return str(path)


def _wrong_type(error: Exception) -> bool:
    """A reply saying a value is not a string. Alone it starts with WRONGTYPE; inside a pipeline redis-py words it
    "Command # 2 (GETRANGE ...) of pipeline caused error: WRONGTYPE ..."."""
    return "WRONGTYPE Operation against a key holding the wrong kind of value" in str(error)


class RedisTier:
    """Chunk KV on a Redis/Valkey server (`StoreConfig.remote_url`), for the chunks of the model `model_fp` names.
    A `tier.KVTier`; safe to share between threads and to use from forked processes."""

    name = "remote"

    def __init__(self, config: StoreConfig, model_fp: str) -> None:
        if config.remote_url is None:
            raise InvalidRequestError("RedisTier needs StoreConfig.remote_url (redis://host:port/db).")
        key = codec.load_key(config)
        if key is None:  # StoreConfig refuses this too; a shared tier never runs on unkeyed checksums
            raise StoreError("a shared tier requires an authentication key: set auth_key_file or auth_key_env.")
        password = None
        if config.remote_password_env is not None:
            password = os.environ.get(config.remote_password_env)
            if not password:
                raise StoreError(
                    f"the environment variable {config.remote_password_env} (remote_password_env) is unset or "
                    "empty; export the Redis password in it, or unset remote_password_env for a server without one."
                )
        redis, no_retry = _redis()
        self.config = config
        self._model_fp = model_fp
        self._prefix = f"{config.remote_namespace}:{FORMAT_VERSION}:{model_fp[:16]}:"
        self._sealer = Sealer(key)
        timeout = config.remote_timeout_s
        # No retries: one attempt per operation, so a request waits at most one timeout per operation and the
        # breaker sees every failure. from_url connects lazily: a server that is down does not stop the engine.
        # lib_name/lib_version None: no CLIENT SETINFO, two round trips fewer per new connection (each one paid
        # in full on a slow server, before any budget check can stop it).
        options = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=no_retry,
                       health_check_interval=0, client_name="prophet-rag", password=password,
                       socket_read_size=_READ_SIZE, lib_name=None, lib_version=None)
        if config.remote_username is not None:
            options["username"] = config.remote_username
        if config.remote_url.startswith("rediss://"):
            # Spelled out: redis-py 5 did not check the host name by default.
            options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
            if config.remote_tls_ca_file is not None:
                options["ssl_ca_certs"] = _readable(config.remote_tls_ca_file, "remote_tls_ca_file")
        self._client = redis.Redis.from_url(config.remote_url, **options)
        self._server_errors = (redis.RedisError, OSError)
        self._breaker = CircuitBreaker(config.remote_breaker_failures, config.remote_breaker_cooldown_s)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)

    def names(self, key: str, num_layers: int) -> tuple[str, list[str]]:
        """The server names of `key`'s header and of its `num_layers` layer values."""
        base = f"{self._prefix}{{{key}}}:"
        return base + "h", [f"{base}{layer}" for layer in range(num_layers)]

    # ---- the KVTier protocol -----------------------------------------------------------------------------------

    def get(self, ref: ChunkRef, meta: EntryMeta, out: torch.Tensor | None = None) -> ChunkKV | None:
        """The chunk `ref` names, checked against `ref.key`, `meta` and its MAC, or None. With `out`
        (`[L, 2, T, H_kv, D]` in `meta.kv_dtype`) the KV is written into it, else into a new CPU tensor."""
        self._check_model(meta)
        with one_request():
            return self._get(ref, meta, out)

    def _get(self, ref: ChunkRef, meta: EntryMeta, out: torch.Tensor | None) -> ChunkKV | None:
        budget = self._budget()
        if not self._may_ask(budget):
            return None
        head, layers = self.names(ref.key, meta.num_layers)
        budget.begin()
        try:
            header = self._read_header(head, ref, meta, budget)
            if header is None:
                self._answered(budget, misses=1)
                return None
            kv = out if out is not None else torch.empty(header.shape, dtype=meta.kv_dtype)
            if tuple(kv.shape) != header.shape or kv.dtype != meta.kv_dtype:
                raise InvalidRequestError(f"out must be {meta.kv_dtype} {header.shape}, got {kv.dtype} "
                                          f"{tuple(kv.shape)}.")
            self._read_layers(layers, header, kv, budget)
        except OverBudget:
            # `out` may hold some layers: the caller recomputes the whole chunk into it.
            self._answered(budget, over_budget_skips=1)
            return None
        except _Evicted:
            self._drop(budget, ref.key, head, layers, "partial", "a layer value is missing (evicted or expired)")
            return None
        except (CacheCorruptionError, IncompatibleCacheError) as error:
            # The key names the model, tokenizer, layout and tokens, so an entry that disagrees or fails its MAC
            # is a bad entry, not another replica's valid one: it goes, so the recomputed chunk can be stored.
            self._drop(budget, ref.key, head, layers, refusal_counter(error), str(error))
            return None
        except self._server_errors as error:
            if _wrong_type(error):  # a value that is not a string: planted or clobbered, not a server failure
                self._drop(budget, ref.key, head, layers, "corrupt", str(error))
            else:
                self._failed(budget, "get", error)
            return None
        self._answered(budget, hits=1, bytes_read=header.size + header.num_layers * header.layer_bytes)
        return ChunkKV(header.token_ids, header.positions, kv)

    def put(self, ref: ChunkRef, chunk: ChunkKV, meta: EntryMeta) -> bool:
        """Store `chunk` under `ref.key` unless its header is there; True when the server now holds the entry."""
        self._check_model(meta)
        if chunk_key(meta.model_fp, meta.tokenizer_fp, meta.kv_spec, chunk.token_ids, ref.sink_ids) != ref.key:
            raise InvalidRequestError(f"ref.key {ref.key} is not the key of this chunk under this EntryMeta.")
        with one_request():
            return self._put(ref, chunk, meta)

    def _put(self, ref: ChunkRef, chunk: ChunkKV, meta: EntryMeta) -> bool:
        budget = self._budget()
        if not self._may_ask(budget, skipped=1):
            return False
        head, layers = self.names(ref.key, meta.num_layers)
        budget.begin()
        try:
            # Content-addressed: an entry under the key is this chunk; checking first saves encoding and sending.
            # A header of another type is no entry ("none" when there is none): the transaction below replaces it.
            if self._client.type(head) == b"string":
                self._answered(budget)
                return True
            budget.check()
            try:
                encoded = codec.encode(chunk, ref.sink_ids, meta, self._sealer)
            except ValueError as error:
                self._answered(budget)
                return self._skip("not storable", error)
            if encoded.size > self.config.max_entry_bytes:
                self._answered(budget)
                return self._skip(f"{encoded.size} bytes over max_entry_bytes={self.config.max_entry_bytes}", None)
            _, header_size, _ = codec.read_frame(encoded.header)
            ttl = self.config.remote_ttl_s
            with self._client.pipeline(transaction=True) as pipe:
                for name, buffers in zip(layers, encoded.layers, strict=True):
                    pipe.set(name, b"".join(buffers), ex=ttl)
                pipe.set(head, encoded.header[:header_size], ex=ttl)  # last, inside MULTI: all or nothing
                pipe.execute()
        except OverBudget:
            self._answered(budget, over_budget_skips=1, skipped=1)
            return False
        except self._server_errors as error:
            self._failed(budget, "put", error)
            self._count(skipped=1)
            return False
        self._answered(budget,
                       bytes_written=header_size + sum(b.nbytes for buffers in encoded.layers for b in buffers))
        return True

    def contains(self, key: str) -> bool:
        """Whether the server holds `key`'s header (not read: `get` may still refuse the entry); False when the
        server cannot say."""
        with one_request():
            return self._contains(key)

    def _contains(self, key: str) -> bool:
        budget = self._budget()
        if not self._may_ask(budget):
            return False
        budget.begin()
        try:
            found = bool(self._client.exists(self.names(key, 0)[0]))
        except self._server_errors as error:
            self._failed(budget, "contains", error)
            return False
        self._answered(budget)
        return found

    def delete(self, key: str, num_layers: int) -> bool:
        """Remove `key`'s entry (header and `num_layers` layers); True when its header was there."""
        head, layers = self.names(key, num_layers)
        budget = RequestBudget(self.config.remote_request_budget_s, self._breaker)  # administrative: never in a request
        budget.begin()
        try:
            found = self._client.exists(head)
            self._client.unlink(head, *layers)
        except self._server_errors as error:
            self._failed(budget, "delete", error)
            return False
        self._answered(budget)
        budget.finish()
        return bool(found)

    def stats(self) -> RemoteStats:
        with self._lock:
            counts = dict(self._counts)
        return RemoteStats(**counts, breaker_opens=self._breaker.opens, breaker_open=self._breaker.is_open)

    def close(self) -> None:
        self._client.close()

    # ---- internals ---------------------------------------------------------------------------------------------

    def _check_model(self, meta: EntryMeta) -> None:
        if meta.model_fp != self._model_fp:
            raise InvalidRequestError("this RedisTier was built for another model's namespace; build one per model.")

    def _budget(self) -> RequestBudget:
        return request_state(self, lambda: RequestBudget(self.config.remote_request_budget_s, self._breaker))

    def _may_ask(self, budget: RequestBudget, **counts: int) -> bool:
        """Whether an operation may go to the server; when not, why is counted (with `counts`)."""
        if budget.spent:
            self._count(over_budget_skips=1, **counts)
            return False
        if not self._breaker.allow():
            self._count(breaker_skips=1, **counts)
            return False
        return True

    def _read_header(self, head: str, ref: ChunkRef, meta: EntryMeta, budget: RequestBudget) -> Header | None:
        """The header stored under `head`, checked (its MAC, then against `meta` and `ref.key`), or None."""
        data = self._client.getrange(head, 0, _FIRST_READ - 1)
        if not data:
            return None
        _, size, _ = codec.read_frame(data)
        budget.check()
        if len(data) < size <= codec.MAX_HEADER_BYTES:
            data += self._client.getrange(head, len(data), size)  # one byte past the end: a longer value shows
        if len(data) != size:
            raise CacheCorruptionError(f"header value is {len(data)} bytes or more, its frame announces {size}.")
        header = codec.parse_header(data, self._sealer)
        header.check(meta, ref.key)
        if header.size + header.num_layers * header.layer_bytes > self.config.max_entry_bytes:
            raise CacheCorruptionError("entry is over max_entry_bytes; not read.")
        return header

    def _read_layers(self, names: list[str], header: Header, kv: torch.Tensor, budget: RequestBudget) -> None:
        """Read every layer into `kv`, a pipelined round trip per `_BATCH_BYTES`, checking each against its tag
        before it is written into the cache."""
        size = header.layer_bytes
        step = max(1, _BATCH_BYTES // size)
        for start in range(0, header.num_layers, step):
            budget.check()
            with self._client.pipeline(transaction=False) as pipe:
                for name in names[start : start + step]:
                    pipe.getrange(name, 0, size)  # inclusive end: one byte more than a layer shows a longer value
                values = pipe.execute()
            for layer, value in enumerate(values, start):
                if not value:
                    raise _Evicted
                if len(value) != size:
                    raise CacheCorruptionError(f"layer {layer} value is {len(value)} bytes or more, expected {size}.")
                # With the key, the MAC proves a keyed writer made the entry, and writers refuse non-finite KV
                # (codec.encode): the disk store's rule, which skips the finiteness pass for keyed entries.
                self._sealer.verify(self._sealer.tag(value), header.layer_tags[layer], f"layer {layer}")
                region = torch.frombuffer(value, dtype=torch.uint8)
                codec.dequantize(region.to(kv.device, non_blocking=False), header, kv[layer])

    def _drop(self, budget: RequestBudget, key: str, head: str, layers: list[str], counter: str, reason: str) -> None:
        logger.warning("dropping %s remote KV entry %s: %s", counter, key, reason)
        try:
            self._client.unlink(head, *layers)
        except self._server_errors as error:
            logger.warning("could not delete remote KV entry %s (%s); the next read retries", key, error)
        self._answered(budget, **{counter: 1})

    def _answered(self, budget: RequestBudget, **counts: int) -> None:
        """The server answered: `counts` are added; the breaker closes when the request ends within its budget, and
        an answer that spent the budget is a failure."""
        budget.end()
        self._count(**counts)
        budget.answered = True
        if budget.left > 0:
            self._breaker.answered()
        elif not budget.spent:
            budget.spent = True
            self._count(over_budget=1)
            self._trip("request", f"it spent remote_request_budget_s={self.config.remote_request_budget_s} s "
                                  "on the server")

    def _failed(self, budget: RequestBudget, action: str, error: Exception) -> None:
        budget.end()
        budget.spent = budget.left <= 0  # one failure, counted here: the rest of the request is skipped
        self._count(failures=1)
        self._trip(action, error)

    def _trip(self, action: str, error: Exception | str) -> None:
        if self._breaker.failed():
            logger.warning("remote KV tier %s failed (%s); skipping the server for %.1f s, then probing it",
                           action, error, self.config.remote_breaker_cooldown_s)
        else:
            logger.info("remote KV tier %s failed (%s); the chunk is recomputed", action, error)

    def _skip(self, reason: str, error: Exception | None) -> bool:
        logger.warning("remote KV put skipped: %s%s", reason, f" ({error})" if error else "")
        self._count(skipped=1)
        return False

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta
