"""codec.py: bitwise round trips, every damaged byte detected before parsing, metadata and shape checks."""

import pickle

import pytest
import safetensors.torch
import torch

from kvstore_helpers import assert_same_chunk, frame, make_chunk, meta_for
from prophet_rag.codec import EntryMeta, decode, encode, read_meta
from prophet_rag.errors import CacheCorruptionError, IncompatibleCacheError, InvalidRequestError
from prophet_rag.keys import FORMAT_VERSION, kv_spec


def _body(tensors: dict, **metadata) -> bytes:
    num_tokens = tensors["kv"].shape[2] if tensors.get("kv") is not None and tensors["kv"].dim() > 2 else 0
    fields = dict(
        format_version=str(FORMAT_VERSION),
        model_fp="a" * 64,
        tokenizer_fp="b" * 64,
        kv_spec=kv_spec(torch.float32),
        num_tokens=str(num_tokens),
    )
    merged = {name: value for name, value in {**fields, **metadata}.items() if value is not None}
    return safetensors.torch.save(tensors, metadata=merged)


def _tensors(num_tokens=3):
    chunk = make_chunk(num_tokens=num_tokens)
    return {"kv": chunk.kv, "positions": chunk.positions, "token_ids": chunk.token_ids}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_round_trip_is_bitwise(dtype, num_tokens):
    chunk = make_chunk(num_tokens=num_tokens, layers=3, heads=2, head_dim=8, dtype=dtype)
    meta = meta_for(chunk)
    got = decode(encode(chunk, meta), meta, token_ids=chunk.token_ids)
    assert_same_chunk(got, chunk)


def test_round_trip_keeps_nan_inf_and_noncontiguous_kv():
    kv = torch.randn(2, 4, 2, 2, 3).transpose(1, 2)[:, :2]  # [2, 2, 4, 2, 3], not contiguous
    kv[0, 0, 0, 0, 0], kv[1, 1, 3, 1, 2] = float("nan"), float("-inf")
    chunk = make_chunk(num_tokens=4)
    chunk = type(chunk)(token_ids=chunk.token_ids, positions=chunk.positions, kv=kv)
    meta = meta_for(chunk)
    assert not kv.is_contiguous()
    assert_same_chunk(decode(encode(chunk, meta), meta), chunk)


def test_round_trip_needs_no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle/torch.load must not be used")

    for target, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)
    chunk = make_chunk()
    meta = meta_for(chunk)
    assert_same_chunk(decode(encode(chunk, meta), meta), chunk)


def test_read_meta_returns_the_written_fields():
    chunk = make_chunk(num_tokens=6, dtype=torch.float16)
    meta = meta_for(chunk, model_fp="m1", tokenizer_fp="t1")
    assert read_meta(encode(chunk, meta)) == {
        "format_version": str(FORMAT_VERSION),
        "model_fp": "m1",
        "tokenizer_fp": "t1",
        "kv_spec": kv_spec(torch.float16),
        "num_tokens": "6",
    }


def test_every_flipped_byte_is_detected():
    chunk = make_chunk(num_tokens=1, layers=1, heads=1, head_dim=2)
    meta = meta_for(chunk)
    data = encode(chunk, meta)
    for index in range(len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 0x01
        with pytest.raises(CacheCorruptionError):
            decode(bytes(damaged), meta)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],
        lambda d: d[:-1],
        lambda d: d[:10],
        lambda d: b"",
        lambda d: bytes(len(d)),
        lambda d: d + b"\x00",
        lambda d: d[:16] + bytes(len(d) - 16),
    ],
    ids=["half", "last-byte", "inside-header", "empty", "zero-filled", "appended", "zeroed-after-header"],
)
def test_truncated_zeroed_or_extended_values_are_corrupt(damage):
    chunk = make_chunk()
    meta = meta_for(chunk)
    with pytest.raises(CacheCorruptionError):
        decode(damage(encode(chunk, meta)), meta)


@pytest.mark.parametrize("field", ["model_fp", "tokenizer_fp", "kv_spec"])
def test_metadata_mismatch_is_incompatible(field):
    chunk = make_chunk()
    meta = meta_for(chunk)
    other = EntryMeta(**{**meta.__dict__, field: "something else"})
    with pytest.raises(IncompatibleCacheError, match=field):
        decode(encode(chunk, meta), other)


def test_other_format_version_is_incompatible_not_corrupt():
    data = frame(_body(_tensors(), format_version=str(FORMAT_VERSION + 1)), version=FORMAT_VERSION + 1)
    with pytest.raises(IncompatibleCacheError, match="format version"):
        read_meta(data)


@pytest.mark.parametrize(
    "wanted",
    [lambda ids: ids.flip(0), lambda ids: ids[:-1], lambda ids: torch.cat([ids, ids[:1]]), lambda ids: ids + 1],
    ids=["reordered", "shorter", "longer", "shifted"],
)
def test_other_token_ids_are_incompatible(wanted):
    chunk = make_chunk(num_tokens=4)
    meta = meta_for(chunk)
    with pytest.raises(IncompatibleCacheError, match="token ids"):
        decode(encode(chunk, meta), meta, token_ids=wanted(chunk.token_ids))


def test_token_ids_may_be_any_integer_tensor_or_list():
    chunk = make_chunk(num_tokens=4)
    meta = meta_for(chunk)
    data = encode(chunk, meta)
    assert_same_chunk(decode(data, meta, token_ids=chunk.token_ids.to(torch.int32)), chunk)
    assert_same_chunk(decode(data, meta, token_ids=chunk.token_ids.tolist()), chunk)


def _replace(tensors, **changes):
    out = {**tensors, **changes}
    return {name: value for name, value in out.items() if value is not None}


@pytest.mark.parametrize(
    "make_body, match",
    [
        (lambda t: _body(_replace(t, positions=None)), "expected"),
        (lambda t: _body(_replace(t, extra=torch.zeros(1))), "expected"),
        (lambda t: _body(_replace(t, kv=t["kv"][0])), r"\[L, 2, T, H_kv, D\]"),
        (lambda t: _body(_replace(t, kv=t["kv"].repeat(1, 2, 1, 1, 1))), r"\[L, 2, T, H_kv, D\]"),
        (lambda t: _body(_replace(t, positions=t["positions"][:-1])), "must agree"),
        (lambda t: _body(t, num_tokens="2"), "must agree"),
        (lambda t: _body(_replace(t, token_ids=t["token_ids"].int())), "int64"),
        (lambda t: _body(_replace(t, kv=t["kv"].half())), "dtype"),
        (lambda t: _body(t, model_fp=None), "lacks"),
        (lambda t: _body(t, format_version="7"), "frame says"),
        (lambda t: b"\x04\x00\x00\x00\x00\x00\x00\x00null", "__metadata__"),
        (lambda t: b"\x01\x00\x00\x00\x00\x00\x00\x00{", "not valid JSON"),
        (lambda t: b"\xff\x00\x00\x00\x00\x00\x00\x00{}", "header claims"),
    ],
    ids=[
        "missing-tensor",
        "extra-tensor",
        "kv-4d",
        "kv-not-2",
        "positions-short",
        "num-tokens",
        "ids-int32",
        "kv-dtype-vs-spec",
        "missing-field",
        "version-field",
        "null-header",
        "bad-json",
        "header-overrun",
    ],
)
def test_malformed_body_with_valid_checksum_is_corrupt(make_body, match):
    data = frame(make_body(_tensors()), FORMAT_VERSION)
    meta = EntryMeta("a" * 64, "b" * 64, kv_spec(torch.float32))
    with pytest.raises(CacheCorruptionError, match=match):
        decode(data, meta)


def test_encode_rejects_meta_for_another_dtype():
    chunk = make_chunk(dtype=torch.float16)
    with pytest.raises(InvalidRequestError, match="kv_spec"):
        encode(chunk, EntryMeta("a", "b", kv_spec(torch.float32)))
