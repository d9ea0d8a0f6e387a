"""Bytes of one stored chunk KV: a checksummed frame around a safetensors body. No pickle, no `torch.load`.

Layout of a value (all integers little-endian)::

    offset  size  field
    0       4     magic b"PRKV"
    4       4     u32 format version (keys.FORMAT_VERSION)
    8       8     u64 body length N
    16      N     body: safetensors bytes of `kv` [L, 2, T, H_kv, D], `positions` [T] int64, `token_ids` [T] int64,
                  with `__metadata__` {format_version, model_fp, tokenizer_fp, kv_spec, num_tokens}
    16+N    32    BLAKE2b-256 of bytes [0, 16+N)

The frame is the same for every format version, so the digest is checked before the version is read: a flipped
byte anywhere (version included), a truncated or zero-filled value (diskcache does not fsync) all fail the
digest. Only a digest-clean value is parsed, and only then are its metadata compared with what the caller
expects. The digest detects corruption, not forgery: whoever can write the cache directory can write valid
entries (see `prophet_rag.store` for that trust boundary).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch

from prophet_rag.chunk_kv import ChunkKV
from prophet_rag.errors import CacheCorruptionError, IncompatibleCacheError, InvalidRequestError
from prophet_rag.keys import FORMAT_VERSION, kv_spec

MAGIC = b"PRKV"
_HEAD = struct.Struct("<4sIQ")
_DIGEST_SIZE = 32
_META_FIELDS = ("format_version", "model_fp", "tokenizer_fp", "kv_spec", "num_tokens")
_TENSORS = {"kv", "positions", "token_ids"}


@dataclass(frozen=True)
class EntryMeta:
    """What an entry must have been written for; the same three strings go into its key."""

    model_fp: str
    tokenizer_fp: str
    kv_spec: str


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE).digest()


def encode(chunk: ChunkKV, meta: EntryMeta) -> bytes:
    """The stored bytes of `chunk` (tensors are copied to the CPU)."""
    if kv_spec(chunk.kv.dtype) != meta.kv_spec:
        raise InvalidRequestError(
            f"chunk kv has dtype {chunk.kv.dtype}, which does not match meta.kv_spec {meta.kv_spec!r}; "
            f"build EntryMeta with keys.kv_spec({chunk.kv.dtype})."
        )
    tensors = {
        "kv": chunk.kv.detach().cpu().contiguous(),
        "positions": chunk.positions.detach().to("cpu", torch.int64).contiguous(),
        "token_ids": chunk.token_ids.detach().to("cpu", torch.int64).contiguous(),
    }
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "model_fp": meta.model_fp,
        "tokenizer_fp": meta.tokenizer_fp,
        "kv_spec": meta.kv_spec,
        "num_tokens": str(chunk.num_tokens),
    }
    body = safetensors.torch.save(tensors, metadata=metadata)
    framed = _HEAD.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    return framed + _digest(framed)


def _body(data: bytes) -> memoryview:
    """The safetensors body of a value whose frame and digest are intact and whose version is ours."""
    if not isinstance(data, (bytes, bytearray)):
        raise CacheCorruptionError(f"a stored value must be bytes, got {type(data).__name__}.")
    if len(data) < _HEAD.size + _DIGEST_SIZE:
        raise CacheCorruptionError(
            f"value is {len(data)} bytes, shorter than the {_HEAD.size + _DIGEST_SIZE}-byte frame (truncated)."
        )
    magic, version, body_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CacheCorruptionError(f"value starts with {magic!r}, expected the magic {MAGIC!r}.")
    if len(data) != _HEAD.size + body_len + _DIGEST_SIZE:
        raise CacheCorruptionError(
            f"value is {len(data)} bytes but its header announces {_HEAD.size + body_len + _DIGEST_SIZE} "
            "(truncated or overwritten)."
        )
    view = memoryview(data)
    end = _HEAD.size + body_len
    if not hmac.compare_digest(_digest(view[:end]), bytes(view[end:])):
        raise CacheCorruptionError("value failed its BLAKE2b checksum (bit rot, truncation or a torn write).")
    if version != FORMAT_VERSION:
        raise IncompatibleCacheError(
            f"entry has format version {version}, this prophet-rag reads version {FORMAT_VERSION}; it is recomputed."
        )
    return view[_HEAD.size : end]


def _header(body: memoryview) -> dict:
    """The safetensors JSON header of `body` (8-byte length, then JSON), parsed without touching tensor data."""
    if len(body) < 8:
        raise CacheCorruptionError("safetensors body is shorter than its 8-byte header length.")
    (size,) = struct.unpack_from("<Q", body)
    if size > len(body) - 8:
        raise CacheCorruptionError(f"safetensors header claims {size} bytes, the body holds {len(body) - 8}.")
    try:
        header = json.loads(bytes(body[8 : 8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheCorruptionError(f"safetensors header is not valid JSON: {error}.") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CacheCorruptionError("safetensors header has no __metadata__ map.")
    return header


def _checked_meta(body: memoryview) -> dict[str, str]:
    metadata = _header(body)["__metadata__"]
    missing = [name for name in _META_FIELDS if not isinstance(metadata.get(name), str)]
    if missing:
        raise CacheCorruptionError(f"entry metadata lacks {missing}.")
    if metadata["format_version"] != str(FORMAT_VERSION):
        raise CacheCorruptionError(
            f"entry metadata says format version {metadata['format_version']}, its frame says {FORMAT_VERSION}."
        )
    return {name: metadata[name] for name in _META_FIELDS}


def read_meta(data: bytes) -> dict[str, str]:
    """The metadata of a stored value, checked for integrity (digest, version, required fields) but not
    compared with any expected model: `{format_version, model_fp, tokenizer_fp, kv_spec, num_tokens}`."""
    return _checked_meta(_body(data))


def decode(data: bytes, meta: EntryMeta, token_ids: torch.Tensor | None = None) -> ChunkKV:
    """The chunk stored in `data`, on the CPU.

    Raises `CacheCorruptionError` when the value is damaged or malformed (checksum, frame, header, tensor names,
    dtypes or shapes) and `IncompatibleCacheError` when it is intact but was written for another model,
    tokenizer, KV spec or format version, or for token ids other than `token_ids` (when given).
    """
    body = _body(data)
    stored = _checked_meta(body)
    expected = {"model_fp": meta.model_fp, "tokenizer_fp": meta.tokenizer_fp, "kv_spec": meta.kv_spec}
    for name, value in expected.items():
        if stored[name] != value:
            raise IncompatibleCacheError(f"entry was written for {name}={stored[name]!r}, expected {value!r}.")
    try:
        # safetensors.torch.load takes `bytes` only, hence one copy of the body.
        tensors = safetensors.torch.load(bytes(body))
    except safetensors.SafetensorError as error:
        raise CacheCorruptionError(f"safetensors body does not parse: {error}.") from None
    if set(tensors) != _TENSORS:
        raise CacheCorruptionError(f"entry holds tensors {sorted(tensors)}, expected {sorted(_TENSORS)}.")
    kv, positions, ids = tensors["kv"], tensors["positions"], tensors["token_ids"]
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise CacheCorruptionError(f"kv must be [L, 2, T, H_kv, D], got shape {tuple(kv.shape)}.")
    num_tokens = kv.shape[2]
    if stored["num_tokens"] != str(num_tokens) or ids.shape != (num_tokens,) or positions.shape != (num_tokens,):
        raise CacheCorruptionError(
            f"kv has T={num_tokens}, token_ids {tuple(ids.shape)}, positions {tuple(positions.shape)}, metadata "
            f"num_tokens={stored['num_tokens']}; all must agree."
        )
    if ids.dtype != torch.int64 or positions.dtype != torch.int64 or not kv.dtype.is_floating_point:
        raise CacheCorruptionError(
            f"token_ids/positions must be int64 and kv floating point, got {ids.dtype}, {positions.dtype}, {kv.dtype}."
        )
    if kv_spec(kv.dtype) != stored["kv_spec"]:
        raise CacheCorruptionError(f"kv has dtype {kv.dtype}, its metadata says {stored['kv_spec']!r}.")
    if token_ids is not None:
        wanted = torch.as_tensor(token_ids).detach().to("cpu", torch.int64).reshape(-1)
        if not torch.equal(wanted, ids):
            raise IncompatibleCacheError(
                f"entry holds {num_tokens} token ids that differ from the {wanted.numel()} requested; "
                "the key does not belong to this chunk."
            )
    return ChunkKV(token_ids=ids, positions=positions, kv=kv)
