"""codec.py: bitwise round trips, every damaged byte detected, malformed headers refused, compact storage bounded."""

import json
import pickle
import struct

import numpy as np
import pytest
import torch

from kvstore_helpers import SINK, make_chunk, meta_for
from prophet_rag.cache import codec
from prophet_rag.cache.codec import EntryMeta, Sealer, encode, parse_header
from prophet_rag.cache.keys import FORMAT_VERSION, chunk_key
from prophet_rag.errors import (
    CacheCorruptionError,
    IncompatibleCacheError,
    InvalidRequestError,
    UnauthenticatedEntryError,
)

KEYLESS = Sealer(None)
KEYED = Sealer(codec.derive_key(b"k" * 32))


def _bytes(encoded: codec.Encoded) -> bytes:
    return encoded.header + b"".join(bytes(b) for layer in encoded.layers for b in layer)


def decode(data: bytes, meta: EntryMeta, sealer: Sealer = KEYLESS) -> torch.Tensor:
    """What the store does with a value file, from bytes: header, then every layer checked and converted."""
    header = parse_header(data, sealer)
    assert len(data) == header.file_size
    out = torch.empty(header.shape, dtype=meta.kv_dtype)
    for layer in range(header.num_layers):
        start = header.data_offset + layer * header.layer_bytes
        region = data[start : start + header.layer_bytes]
        sealer.verify(sealer.tag(region), header.layer_tags[layer], f"layer {layer}")
        codec.dequantize(torch.from_numpy(np.frombuffer(bytearray(region), dtype=np.uint8)), header, out[layer])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [0, 1, 7])
@pytest.mark.parametrize("sealer", [KEYLESS, KEYED], ids=["xxh3", "mac"])
def test_lossless_round_trip_is_bitwise(dtype, num_tokens, sealer):
    meta = meta_for(dtype, layers=3, head_dim=8)
    ref, chunk = make_chunk(num_tokens, meta)
    data = _bytes(encode(chunk, SINK, meta, sealer))
    header = parse_header(data, sealer)
    assert torch.equal(decode(data, meta, sealer).view(torch.uint8), chunk.kv.view(torch.uint8))
    assert torch.equal(header.token_ids, chunk.token_ids) and torch.equal(header.sink_ids, SINK)
    assert torch.equal(header.positions, torch.arange(3, 3 + num_tokens))
    assert header.key() == ref.key and header.kv_spec == meta.kv_spec


def test_layout_is_aligned_and_exact():
    meta = meta_for(layers=3, head_dim=8)
    _, chunk = make_chunk(9, meta)
    encoded = encode(chunk, SINK, meta, KEYLESS)
    header = parse_header(_bytes(encoded), KEYLESS)
    assert len(encoded.header) == header.data_offset and header.data_offset % 4096 == 0
    assert header.layer_bytes == 2 * 9 * meta.num_kv_heads * meta.head_dim * 4
    assert encoded.size == header.file_size == header.data_offset + 3 * header.layer_bytes


def test_round_trip_needs_no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle/torch.load must not be used")

    for target, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)
    meta = meta_for()
    _, chunk = make_chunk(4, meta)
    assert torch.equal(decode(_bytes(encode(chunk, SINK, meta, KEYLESS)), meta), chunk.kv)


@pytest.mark.parametrize("sealer", [KEYLESS, KEYED], ids=["xxh3", "mac"])
def test_every_flipped_byte_is_detected(sealer):
    meta = meta_for(layers=1, heads=1, head_dim=2)
    _, chunk = make_chunk(1, meta)
    data = _bytes(encode(chunk, SINK, meta, sealer))
    header = parse_header(data, sealer)
    meaningful = [*range(header.size), *range(header.data_offset, len(data))]  # padding is never read
    for index in meaningful:
        damaged = bytearray(data)
        damaged[index] ^= 0x01
        with pytest.raises(CacheCorruptionError):
            decode(bytes(damaged), meta, sealer)


@pytest.mark.parametrize(
    "damage",
    [lambda d: d[:10], lambda d: b"", lambda d: bytes(len(d)), lambda d: d[:100]],
    ids=["inside-frame", "empty", "zero-filled", "inside-header"],
)
def test_truncated_or_zeroed_headers_are_corrupt(damage):
    meta = meta_for()
    _, chunk = make_chunk(4, meta)
    with pytest.raises(CacheCorruptionError):
        parse_header(damage(_bytes(encode(chunk, SINK, meta, KEYLESS))), KEYLESS)


def test_sealing_kinds_do_not_mix():
    meta = meta_for()
    _, chunk = make_chunk(4, meta)
    unkeyed = _bytes(encode(chunk, SINK, meta, KEYLESS))
    keyed = _bytes(encode(chunk, SINK, meta, KEYED))
    with pytest.raises(UnauthenticatedEntryError, match="no MAC"):
        parse_header(unkeyed, KEYED)
    with pytest.raises(IncompatibleCacheError, match="no key"):
        parse_header(keyed, KEYLESS)
    with pytest.raises(UnauthenticatedEntryError, match="MAC"):
        parse_header(keyed, Sealer(codec.derive_key(b"another key of 32 bytes or more.")))


def _sealed_header(sealer=KEYLESS, version=FORMAT_VERSION, fields=None, ids=b"", tags=None, json_text=None):
    """A header with a valid tag around arbitrary content, to reach the checks past the tag."""
    fields = {**dict(model_fp="a", tokenizer_fp="b", kv_dtype="float32", storage="lossless", num_layers=1,
                     num_kv_heads=1, head_dim=2, num_tokens=0, sink_tokens=0), **(fields or {})}
    text = json_text if json_text is not None else json.dumps(fields).encode()
    tags = bytes(sealer.tag_size) if tags is None else tags
    size = 20 + len(text) + len(ids) + len(tags) + sealer.tag_size
    head = struct.pack("<4sIIII", b"PRKV", version, size, sealer.kind, len(text)) + text + ids + tags
    return head + sealer.tag(head)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: _sealed_header(fields={"num_layers": 2}), CacheCorruptionError, "before the tag"),
        (lambda: _sealed_header(fields={"num_tokens": 3}), CacheCorruptionError, "before the tag"),
        (lambda: _sealed_header(fields={"extra": 1}), CacheCorruptionError, "fields"),
        (lambda: _sealed_header(fields={"head_dim": "2"}), CacheCorruptionError, "head_dim"),
        (lambda: _sealed_header(fields={"num_kv_heads": 0}), CacheCorruptionError, "num_kv_heads"),
        (lambda: _sealed_header(fields={"num_tokens": -1}), CacheCorruptionError, "num_tokens"),
        (lambda: _sealed_header(fields={"num_layers": True}), CacheCorruptionError, "num_layers"),
        (lambda: _sealed_header(fields={"kv_dtype": "int8"}), CacheCorruptionError, "kv_dtype"),
        (lambda: _sealed_header(fields={"storage": "zip"}), CacheCorruptionError, "storage"),
        (lambda: _sealed_header(json_text=b"[1, 2]"), CacheCorruptionError, "fields"),
        (lambda: _sealed_header(json_text=b"{"), CacheCorruptionError, "not valid JSON"),
        (lambda: _sealed_header(version=FORMAT_VERSION + 1), IncompatibleCacheError, "format version"),
        (lambda: _sealed_header(version=1), IncompatibleCacheError, "format version"),
        (lambda: _sealed_header(version=0), CacheCorruptionError, "format version 0"),
    ],
    ids=["layers-vs-tags", "tokens-vs-ids", "extra-field", "str-int", "zero-heads", "negative", "bool-int",
         "int-dtype", "unknown-storage", "json-list", "bad-json", "newer-version", "version-1", "version-0"],
)
def test_malformed_header_with_a_valid_tag_is_refused(make, error, match):
    with pytest.raises(error, match=match):
        parse_header(make(), KEYLESS)


def test_header_check_compares_model_shape_and_key():
    meta = meta_for()
    ref, chunk = make_chunk(4, meta)
    header = parse_header(_bytes(encode(chunk, SINK, meta, KEYLESS)), KEYLESS)
    header.check(meta, ref.key)
    with pytest.raises(IncompatibleCacheError, match="model_fp"):
        header.check(meta_for(model_fp="other"), ref.key)
    with pytest.raises(IncompatibleCacheError, match="kv_spec"):
        header.check(meta_for(torch.float16), ref.key)
    with pytest.raises(IncompatibleCacheError, match="kv_spec.*shape=2,4,4"):
        header.check(meta_for(heads=4), ref.key)
    with pytest.raises(CacheCorruptionError, match="do not hash to its key"):
        header.check(meta, chunk_key(meta.model_fp, meta.tokenizer_fp, meta.kv_spec, chunk.token_ids, [9]))


def test_bf16_storage_of_fp32_kv_is_within_bf16_rounding():
    meta = meta_for(storage="bfloat16", layers=3, head_dim=8)
    _, chunk = make_chunk(16, meta)
    encoded = encode(chunk, SINK, meta, KEYLESS)
    assert encoded.size - len(encoded.header) == chunk.nbytes // 2
    got = decode(_bytes(encoded), meta)
    assert got.dtype == torch.float32
    assert torch.equal(got, chunk.kv.to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_storage_error_is_bounded_per_head(dtype):
    meta = meta_for(dtype, storage="float8_e4m3", layers=2, heads=3, head_dim=16)
    _, chunk = make_chunk(32, meta)
    kv = chunk.kv.clone()
    kv[1, 0, :, 2] *= 50  # one loud head must not cost the others their precision
    chunk = type(chunk)(chunk.token_ids, chunk.positions, kv)
    encoded = encode(chunk, SINK, meta, KEYLESS)
    assert encoded.size - len(encoded.header) == chunk.nbytes // dtype.itemsize + 2 * 2 * 3 * 4
    got = decode(_bytes(encoded), meta)
    assert got.dtype == dtype
    x = kv.float()
    scale = x.abs().amax(dim=(2, 4), keepdim=True) / 448
    bound = x.abs() * 2**-4 + scale * 2**-9 + x.abs() * (2**-8 if dtype == torch.bfloat16 else 0)
    assert ((got.float() - x).abs() <= bound * 1.01).all()
    quiet = (got.float() - x)[1, 0, :, 0].abs().max()
    assert quiet < 0.2, "the quiet heads keep their own scale"


def test_zero_blocks_survive_fp8():
    meta = meta_for(storage="float8_e4m3")
    _, chunk = make_chunk(4, meta)
    chunk = type(chunk)(chunk.token_ids, chunk.positions, torch.zeros_like(chunk.kv))
    assert torch.equal(decode(_bytes(encode(chunk, SINK, meta, KEYLESS)), meta), chunk.kv)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_kv_is_not_encoded(value, dtype):
    meta = meta_for(dtype)
    _, chunk = make_chunk(4, meta)
    chunk.kv[1, 1, 3, 1, 2] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode(chunk, SINK, meta, KEYLESS)


def test_finite_sums_never_pass_a_non_finite_block():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        block = torch.full((3, 2, 4), 60000.0 if dtype == torch.float16 else 1e30, dtype=dtype)
        assert codec.all_finite(codec.finite_sums(block)), "large finite fp16 values must not overflow the check"
        for value in (float("nan"), float("inf")):
            bad = block.clone()
            bad[2, 1, 3] = value
            assert not codec.all_finite(codec.finite_sums(bad))


def test_encode_refuses_a_chunk_that_does_not_match_its_meta():
    meta = meta_for()
    _, chunk = make_chunk(4, meta)
    for other in (meta_for(torch.float16), meta_for(layers=3), meta_for(heads=1)):
        with pytest.raises(InvalidRequestError, match="EntryMeta"):
            encode(chunk, SINK, other, KEYLESS)


def test_entry_meta_names_storage_in_its_spec():
    specs = {meta_for(storage=s).kv_spec for s in ("lossless", "bfloat16", "float8_e4m3")}
    assert len(specs) == 3
    # Compacting bf16 KV to bf16 is lossless: one key for one content.
    assert meta_for(torch.bfloat16, "bfloat16").kv_spec == meta_for(torch.bfloat16).kv_spec
