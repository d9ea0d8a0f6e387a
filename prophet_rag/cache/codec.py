"""The bytes of one stored chunk KV: a tagged header, then one tensor region per layer. No pickle, no `torch.load`.

Layout of a value file (format version 2; integers little-endian)::

    offset              size     field
    0                   4        magic b"PRKV"
    4                   4        u32 format version (keys.FORMAT_VERSION)
    8                   4        u32 header size N: bytes [0, N) are the header, its own tag included
    12                  4        u32 tag kind: 1 = XXH3-128 checksum (16-byte tags), 2 = keyed BLAKE3 MAC (32 bytes)
    16                  4        u32 JSON size J
    20                  J        JSON {model_fp, tokenizer_fp, kv_dtype, storage, num_layers, num_kv_heads,
                                 head_dim, num_tokens, sink_tokens}
    20+J                8*T      the chunk's token ids, int64
    ...                 8*S      its sink ids (the tokens it was computed behind), int64
    ...                 t*L      the tag of each layer region
    N-t                 t        the header's tag, over bytes [0, N-t)
    N                   ...      zeros up to data_offset = N rounded up to 4096
    data_offset + l*B   B        layer l: K [T, H_kv, D] then V [T, H_kv, D] in the storage dtype; fp8 storage
                                 appends the K and V scales [H_kv] float32
    file size = data_offset + L*B exactly

The header is small and checked first (its tag, then every field against the model and the row's key); the tensor
bytes form one aligned region per layer that is read straight into the request's cache and checked against its
layer tag, so a loader can verify layer l while it computes layer l-1. Positions are not stored: a chunk computed
behind S sink tokens sits at positions S..S+T-1, so the sink ids, which the key covers, fix them.

Without a key the tags are XXH3-128: they catch corruption (bit rot, truncation, torn or zeroed writes) at memory
speed, not forgery. With a key they are keyed BLAKE3, and the header's MAC binds the layer tags, the token ids and
the fingerprints together: an entry written without the key, with another one, or altered, is refused.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import stat
import struct
from dataclasses import dataclass
from functools import cached_property

import blake3
import numpy as np
import torch
import xxhash

from prophet_rag.cache.keys import FORMAT_VERSION, chunk_key, kv_spec, model_fingerprint, tokenizer_fingerprint
from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.config import StoreConfig
from prophet_rag.errors import (
    CacheCorruptionError,
    IncompatibleCacheError,
    InvalidRequestError,
    StoreError,
    UnauthenticatedEntryError,
)

logger = logging.getLogger(__name__)

MAGIC = b"PRKV"
_FRAME = struct.Struct("<4sIIII")
"""magic, format version, header size, tag kind, JSON size."""
ALIGN = 4096
MAX_HEADER_BYTES = 64 * 2**20
"""A header holds 8 bytes per token id: 64 MiB is millions of tokens, far beyond any context window."""
CHECKSUM, MAC = 1, 2
_TAG_SIZE = {CHECKSUM: 16, MAC: 32}
_MAC_CONTEXT = "prophet-rag kv-store entry MAC, format 2"
_FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""

_KV_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float8_e4m3": torch.float8_e4m3fn}
_FIELDS = {
    "model_fp": str, "tokenizer_fp": str, "kv_dtype": str, "storage": str,
    "num_layers": int, "num_kv_heads": int, "head_dim": int, "num_tokens": int, "sink_tokens": int,
}


@dataclass(frozen=True)
class EntryMeta:
    """What a chunk's entry must have been written for: the fingerprints its key covers and the model's KV shape."""

    model_fp: str
    tokenizer_fp: str
    kv_dtype: torch.dtype
    """The dtype the engine computes and reads KV in (the stitched cache's)."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    storage: str = "lossless"
    """How the store encodes it (`config.STORAGES`)."""

    @cached_property
    def kv_spec(self) -> str:
        return kv_spec(self.kv_dtype, (self.num_layers, self.num_kv_heads, self.head_dim), self.storage)

    @classmethod
    def for_model(cls, model, tokenizer, spec, kv_dtype: torch.dtype, storage: str = "lossless") -> EntryMeta:
        """The metadata of `model`'s chunks: fingerprints (keys.py) and the shape from its `model_adapter.ModelSpec`."""
        return cls(model_fingerprint(model), tokenizer_fingerprint(tokenizer), kv_dtype, spec.num_layers,
                   spec.num_kv_heads, spec.head_dim, storage)


def derive_key(material: bytes) -> bytes:
    """The 32-byte MAC key derived from a store's key material (a file's bytes or an environment variable)."""
    return blake3.blake3(material, derive_key_context=_MAC_CONTEXT).digest()


def load_key(config: StoreConfig) -> bytes | None:
    """The derived MAC key named by `config`, or None (every tier that seals entries uses it); a missing or short
    key raises StoreError with the fix."""
    if config.auth_key_env is not None:
        text = os.environ.get(config.auth_key_env, "")
        material, source = text.encode(), f"environment variable {config.auth_key_env}"
    elif config.auth_key_file is not None:
        path, source = config.auth_key_file, f"key file {config.auth_key_file}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as file:
                info = os.fstat(file.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise StoreError(f"the {source} is not a regular file; point auth_key_file at one.")
                material = file.read(4096).strip()
        except OSError as error:
            raise StoreError(f"cannot read the {source}: {error.strerror}; see README, The store.") from None
        if info.st_mode & 0o077:
            logger.warning("the %s is readable by other users; run `chmod 600 %s`", source, path)
    else:
        return None
    if len(material) < 32:
        raise StoreError(
            f"the {source} holds {len(material)} bytes; an authentication key needs at least 32 "
            "(for example the output of `openssl rand -hex 32`)."
        )
    return derive_key(material)


class Sealer:
    """Makes and checks tags: XXH3-128 without a key, keyed BLAKE3-256 with one (`derive_key`'s output)."""

    def __init__(self, key: bytes | None) -> None:
        assert key is None or len(key) == 32, "derive_key gives 32-byte keys"
        self._key = key
        self.kind = CHECKSUM if key is None else MAC
        self.tag_size = _TAG_SIZE[self.kind]

    def hasher(self):
        """A fresh streaming hasher (`update(buffer)`, `digest()`); both release the GIL on large buffers."""
        if self._key is None:
            return xxhash.xxh3_128()
        return blake3.blake3(key=self._key, max_threads=blake3.blake3.AUTO)

    def tag(self, *buffers) -> bytes:
        hasher = self.hasher()
        for buffer in buffers:
            hasher.update(buffer)
        return hasher.digest()

    def check_kind(self, kind: int) -> None:
        """Refuse an entry sealed the other way: unkeyed in a keyed store (it may be forged), keyed in a store
        without the key (it cannot be checked)."""
        if kind == self.kind:
            return
        if kind == CHECKSUM:
            raise UnauthenticatedEntryError("entry carries no MAC but this store requires one (it has a key).")
        if kind == MAC:
            raise IncompatibleCacheError(
                "entry carries a MAC and this store has no key to check it; configure the store's auth key."
            )
        raise CacheCorruptionError(f"entry has tag kind {kind}, expected {CHECKSUM} or {MAC}.")

    def verify(self, tag: bytes, expected: bytes, what: str) -> None:
        if not hmac.compare_digest(tag, expected):
            if self.kind == MAC:
                raise UnauthenticatedEntryError(f"{what} failed its MAC (another key, or altered).")
            raise CacheCorruptionError(f"{what} failed its XXH3 checksum (bit rot, truncation or a torn write).")


@dataclass(frozen=True)
class Header:
    """A parsed, tag-checked header: everything about an entry but its tensor bytes."""

    size: int
    """N, the header's bytes, tag included."""
    model_fp: str
    tokenizer_fp: str
    kv_dtype: torch.dtype
    storage: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    token_ids: torch.Tensor
    """`[T]` int64."""
    sink_ids: torch.Tensor
    """`[S]` int64."""
    layer_tags: tuple[bytes, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def kv_spec(self) -> str:
        return kv_spec(self.kv_dtype, (self.num_layers, self.num_kv_heads, self.head_dim), self.storage)

    @property
    def storage_dtype(self) -> torch.dtype:
        return _STORAGE_DTYPES.get(self.storage, self.kv_dtype)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_tokens, self.num_kv_heads, self.head_dim)

    @cached_property
    def block_bytes(self) -> int:
        """Bytes of one K or V block `[T, H_kv, D]` in the storage dtype."""
        return self.num_tokens * self.num_kv_heads * self.head_dim * self.storage_dtype.itemsize

    @cached_property
    def layer_bytes(self) -> int:
        """B: one layer region, K and V blocks plus fp8 scales."""
        scales = 2 * self.num_kv_heads * 4 if self.storage == "float8_e4m3" else 0
        return 2 * self.block_bytes + scales

    @cached_property
    def data_offset(self) -> int:
        return -(-self.size // ALIGN) * ALIGN

    @property
    def file_size(self) -> int:
        return self.data_offset + self.num_layers * self.layer_bytes

    @property
    def positions(self) -> torch.Tensor:
        start = int(self.sink_ids.numel())
        return torch.arange(start, start + self.num_tokens)

    def key(self) -> str:
        """The store key of the chunk this header describes (`keys.chunk_key` of its own fields)."""
        return chunk_key(self.model_fp, self.tokenizer_fp, self.kv_spec, self.token_ids, self.sink_ids)

    def check(self, meta: EntryMeta, key: str) -> None:
        """Refuse an entry whose fields do not hash to the row `key` (CacheCorruptionError), then one that was not
        written for `meta`'s model, tokenizer, shape, dtype and storage (IncompatibleCacheError)."""
        self.check_key(key)
        expected = {"model_fp": meta.model_fp, "tokenizer_fp": meta.tokenizer_fp, "kv_spec": meta.kv_spec}
        for name, value in expected.items():
            if getattr(self, name) != value:
                raise IncompatibleCacheError(
                    f"entry was written for {name}={getattr(self, name)!r}, expected {value!r}."
                )

    def check_key(self, key: str) -> None:
        """One check for token ids, sink ids (hence positions), fingerprints, shape, dtype and storage: the key is
        SHA-256 of them all."""
        if self.key() != key:
            raise CacheCorruptionError(
                "entry's token ids, sink ids, fingerprints or KV shape do not hash to its key: it is not the chunk "
                "its key names."
            )


@dataclass(frozen=True)
class Encoded:
    """An entry ready to write: `header` (padded to the data offset), then each layer's buffers in order."""

    header: bytes
    layers: list[list[memoryview]]
    size: int


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())


def finite_sums(block: torch.Tensor) -> list[torch.Tensor]:
    """0-d sums of `block` that are all finite only if every value of it is: one reduction pass, checked later
    with `all_finite` (one sync for many blocks on a GPU).

    A sum is finite only when every term is (a NaN or an infinity makes it NaN or infinite). An overflowing sum of
    finite values reads as not finite, which only costs a recompute. fp16 sums in fp32 (its own range would
    overflow), in pieces because one large fp16-to-fp32 reduction takes a slow path in torch on the CPU.
    """
    if block.dtype != torch.float16:
        return [block.sum()]
    flat = block.reshape(-1)
    step = 2**22
    return [flat[i : i + step].sum(dtype=torch.float32) for i in range(0, flat.numel(), step)]


def all_finite(sums: list[torch.Tensor]) -> bool:
    return not sums or bool(torch.stack([s.float() for s in sums]).isfinite().all())


def _storage_blocks(layer: torch.Tensor, storage: str) -> list[torch.Tensor]:
    """The CPU tensors of one layer region, in file order, for `layer` `[2, T, H_kv, D]`."""
    if storage == "float8_e4m3":
        x = layer.float()
        amax = x.abs().amax(dim=(1, 3))  # [2, H_kv]
        scales = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
        quantized = (x / scales[:, None, :, None]).to(torch.float8_e4m3fn)
        return [quantized[0], quantized[1], scales[0], scales[1]]
    if storage == "bfloat16":
        layer = layer.to(torch.bfloat16)
    return [layer[0], layer[1]]


def encode(chunk: ChunkKV, sink_ids: torch.Tensor, meta: EntryMeta, sealer: Sealer) -> Encoded:
    """The file of `chunk` (computed behind `sink_ids`), encoded as `meta.storage` says and sealed by `sealer`.

    Raises InvalidRequestError when the chunk does not match `meta` (a programming error) and ValueError when its
    KV holds a non-finite value (such an entry would be refused on read; it is not stored).
    """
    kv = chunk.kv.detach()
    expected = (meta.num_layers, 2, chunk.num_tokens, meta.num_kv_heads, meta.head_dim)
    if kv.dtype != meta.kv_dtype or tuple(kv.shape) != expected:
        raise InvalidRequestError(
            f"chunk kv is {kv.dtype} {tuple(kv.shape)} but its EntryMeta says {meta.kv_dtype} {expected}; build the "
            "EntryMeta with EntryMeta.for_model for the model and KV dtype that computed the chunk."
        )
    if not all_finite([s for layer in kv for block in layer for s in finite_sums(block)]):
        raise ValueError("chunk KV holds NaN or infinite values.")
    kv = kv.cpu()
    layers = [[_as_bytes(t) for t in _storage_blocks(kv[layer], meta.storage)] for layer in range(kv.shape[0])]
    layer_tags = b"".join(sealer.tag(*buffers) for buffers in layers)
    fields = {
        "model_fp": meta.model_fp, "tokenizer_fp": meta.tokenizer_fp, "kv_dtype": str(meta.kv_dtype)[6:],
        "storage": meta.storage, "num_layers": meta.num_layers, "num_kv_heads": meta.num_kv_heads,
        "head_dim": meta.head_dim, "num_tokens": chunk.num_tokens, "sink_tokens": int(sink_ids.numel()),
    }
    text = json.dumps(fields, sort_keys=True).encode()
    ids = [_as_bytes(torch.as_tensor(i).to("cpu", torch.int64)) for i in (chunk.token_ids, sink_ids)]
    size = _FRAME.size + len(text) + sum(i.nbytes for i in ids) + len(layer_tags) + sealer.tag_size
    head = _FRAME.pack(MAGIC, FORMAT_VERSION, size, sealer.kind, len(text)) + text + b"".join(ids) + layer_tags
    header = head + sealer.tag(head)
    padded = header + bytes(-len(header) % ALIGN)
    return Encoded(padded, layers, len(padded) + sum(b.nbytes for buffers in layers for b in buffers))


def read_frame(prefix: bytes) -> tuple[int, int, int]:
    """`(version, header size, tag kind)` from an entry's first bytes. Version 1 entries (another frame) raise
    IncompatibleCacheError; later versions share this frame, so their tag is checked before their version."""
    if len(prefix) < _FRAME.size:
        raise CacheCorruptionError(f"value is {len(prefix)} bytes, shorter than the {_FRAME.size}-byte frame.")
    magic, version, size, kind, _ = _FRAME.unpack_from(prefix)
    if magic != MAGIC:
        raise CacheCorruptionError(f"value starts with {magic!r}, expected the magic {MAGIC!r}.")
    if version == 1:  # its frame differs past the version: nothing more is read
        raise IncompatibleCacheError(f"entry has format version 1; this prophet-rag reads {FORMAT_VERSION}.")
    if version == 0:
        raise CacheCorruptionError("entry has format version 0 (zeroed or damaged).")
    return version, size, kind


def parse_header(data: bytes, sealer: Sealer) -> Header:
    """The header in `data` (its first N bytes, N from the frame), after checking its tag with `sealer`.

    Raises CacheCorruptionError (UnauthenticatedEntryError for a MAC) for a damaged or malformed header and
    IncompatibleCacheError for another format version or an entry this store cannot check.
    """
    version, size, kind = read_frame(data)
    sealer.check_kind(kind)
    largest = min(len(data), MAX_HEADER_BYTES)
    if not _FRAME.size + sealer.tag_size <= size <= largest:
        raise CacheCorruptionError(f"header size {size} is outside [{_FRAME.size + sealer.tag_size}, {largest}].")
    view = memoryview(data)[:size]
    end = size - sealer.tag_size
    sealer.verify(sealer.tag(view[:end]), bytes(view[end:]), "entry header")
    # Past the tag: another version's header is intact but not ours to parse.
    if version != FORMAT_VERSION:
        raise IncompatibleCacheError(f"entry has format version {version}; this prophet-rag reads {FORMAT_VERSION}.")
    (json_size,) = struct.unpack_from("<I", view, 16)
    start = _FRAME.size + json_size
    fields = _fields(bytes(view[_FRAME.size : start]))
    counts = (fields["num_tokens"], fields["sink_tokens"])
    tags_start = start + 8 * sum(counts)
    if tags_start + fields["num_layers"] * sealer.tag_size != end:
        raise CacheCorruptionError(
            f"header is {size} bytes, its fields announce {tags_start + fields['num_layers'] * sealer.tag_size} "
            "before the tag."
        )
    ids = []
    for count in counts:
        ids.append(torch.from_numpy(np.frombuffer(view[start : start + 8 * count], dtype="<i8").astype(np.int64)))
        start += 8 * count
    step = sealer.tag_size
    return Header(
        size=size, model_fp=fields["model_fp"], tokenizer_fp=fields["tokenizer_fp"],
        kv_dtype=_KV_DTYPES[fields["kv_dtype"]], storage=fields["storage"], num_layers=fields["num_layers"],
        num_kv_heads=fields["num_kv_heads"], head_dim=fields["head_dim"], token_ids=ids[0], sink_ids=ids[1],
        layer_tags=tuple(bytes(view[i : i + step]) for i in range(tags_start, end, step)),
    )


def _fields(text: bytes) -> dict:
    try:
        fields = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheCorruptionError(f"entry header is not valid JSON: {error}.") from None
    if not isinstance(fields, dict) or set(fields) != set(_FIELDS):
        got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
        raise CacheCorruptionError(f"entry header has fields {got}, expected {sorted(_FIELDS)}.")
    for name, kind in _FIELDS.items():
        value = fields[name]
        least = 1 if name in ("num_layers", "num_kv_heads", "head_dim") else 0
        if type(value) is not kind or (kind is int and not least <= value < 2**40):
            raise CacheCorruptionError(f"entry header field {name}={value!r} is not a valid {kind.__name__}.")
    if fields["kv_dtype"] not in _KV_DTYPES or fields["storage"] not in ("lossless", *_STORAGE_DTYPES):
        raise CacheCorruptionError(
            f"entry header names kv_dtype {fields['kv_dtype']!r} and storage {fields['storage']!r}."
        )
    return fields


def dequantize(region: torch.Tensor, header: Header, out: torch.Tensor) -> None:
    """Write one layer region (`[B]` uint8, on `out`'s device) into `out` `[2, T, H_kv, D]`, converting to its dtype."""
    block = header.block_bytes
    shape = header.shape[2:]
    for index in range(2):
        stored = region[index * block : (index + 1) * block].view(header.storage_dtype).view(shape)
        out[index].copy_(stored)
    if header.storage == "float8_e4m3":
        scales = region[2 * block :].view(torch.float32).view(2, 1, header.num_kv_heads, 1)
        out.mul_(scales.to(out.dtype))
