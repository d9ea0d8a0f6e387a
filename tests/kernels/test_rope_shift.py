"""rope_shift_triton against rope_shift_ref: layouts, dtypes, strided KV-cache views, head counts, ragged deltas."""

from __future__ import annotations

import importlib

import pytest
import torch

from prophet_rag.kernels import rope_shift, use_backend
from prophet_rag.kernels.rope_shift import rope_shift_ref, rope_shift_triton

CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes run only on CUDA (slow interpreter)")


def inv_freq(head_dim: int, base: float = 500000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def ragged_delta(chunk_lengths: list[int], generator: torch.Generator) -> torch.Tensor:
    """One shift per chunk, repeated over its tokens: chunks move by up to +-30K positions, like stitched documents."""
    shifts = torch.randint(-30000, 30000, (len(chunk_lengths),), generator=generator)
    return torch.repeat_interleave(shifts, torch.tensor(chunk_lengths))


def make_keys(layout: str, tokens: int, heads: int, dim: int, dtype: torch.dtype, device, generator):
    """(base tensor, keys view into it). The view is what gets rotated; the rest of `base` must stay untouched."""
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    if layout == "contiguous":
        base = randn(tokens, heads, dim)
        return base, base
    if layout == "kv-view":  # keys of a [layers, 2, T, H, D] cache: kv[:, 0]
        base = randn(3, 2, tokens, heads, dim)
        return base, base[:, 0]
    if layout == "hf-transposed":  # a transformers cache [batch, heads, T, D] seen as [batch, T, heads, D]
        base = randn(2, heads, tokens, dim)
        return base, base.transpose(1, 2)
    if layout == "unmergeable":  # two leading dims that share no stride: one launch per outer index
        base = randn(2, 4, tokens, heads, dim)
        return base, base[:, :2]
    raise ValueError(layout)


def make_keys_like(other: torch.Tensor, base: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The view of `other` that `keys` is of `base` (same offset, sizes and strides)."""
    return other.as_strided(keys.shape, keys.stride(), keys.storage_offset() - base.storage_offset())


SHAPES = [  # (layout, chunk lengths, kv heads, head dim)
    pytest.param("contiguous", [63], 3, 128, id="T63-H3-D128"),
    pytest.param("kv-view", [17, 1, 45], 8, 64, id="kvview-T63ragged-H8-D64"),
    pytest.param("contiguous", [200, 300], 1, 16, id="T500ragged-H1-D16"),
    pytest.param("hf-transposed", [5, 32], 4, 64, id="hf-T37-H4-D64"),
    pytest.param("unmergeable", [20], 2, 16, id="unmergeable-T20-H2-D16"),
    pytest.param("kv-view", [1024, 3000, 96], 8, 128, id="kvview-T4120-H8-D128", marks=CUDA_ONLY),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
INTERLEAVED = [pytest.param(False, id="half"), pytest.param(True, id="interleaved")]


@pytest.mark.parametrize("interleaved", INTERLEAVED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,chunks,heads,dim", SHAPES)
def test_matches_reference(layout, chunks, heads, dim, dtype, interleaved, device, assert_close):
    gen = torch.Generator().manual_seed(0)
    base, keys = make_keys(layout, sum(chunks), heads, dim, dtype, device, gen)
    delta, freq = ragged_delta(chunks, gen).to(device), inv_freq(dim).to(device)
    expected_base = base.clone()
    rope_shift_ref(make_keys_like(expected_base, base, keys), delta, freq, interleaved)

    rope_shift_triton(keys, delta, freq, interleaved)

    # The whole base is compared: rotated rows must match, and rows outside the view must be bit-identical.
    outside = torch.ones_like(base, dtype=torch.bool)
    make_keys_like(outside, base, keys).fill_(False)
    assert torch.equal(base[outside], expected_base[outside])
    assert_close(keys, make_keys_like(expected_base, base, keys), dtype)


@pytest.mark.parametrize("interleaved", INTERLEAVED)
def test_dispatch_runs_triton_when_forced(interleaved, device, assert_close, monkeypatch):
    module = importlib.import_module("prophet_rag.kernels.rope_shift")  # package attribute = dispatch function
    calls = []
    monkeypatch.setattr(module, "rope_shift_triton", lambda *a: calls.append(1) or rope_shift_triton(*a))
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(63, 4, 64, generator=gen).to(device)
    delta, freq = ragged_delta([30, 33], gen).to(device), inv_freq(64).to(device)
    expected = keys.clone()
    rope_shift_ref(expected, delta, freq, interleaved)
    with use_backend("triton"):
        rope_shift(keys, delta, freq, interleaved)
    assert calls == [1]
    assert_close(keys, expected, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", INTERLEAVED)
def test_round_trip_restores_keys(backend, dtype, interleaved, device, assert_close):
    """Shifting by +delta then -delta is the identity (up to two roundings to the storage dtype)."""
    gen = torch.Generator().manual_seed(2)
    original = torch.randn(2, 63, 2, 64, generator=gen).to(device=device, dtype=dtype)
    delta, freq = ragged_delta([40, 23], gen).to(device), inv_freq(64).to(device)
    keys = original.clone()
    with use_backend(backend):
        rope_shift(keys, delta, freq, interleaved)
        assert not torch.equal(keys, original)
        rope_shift(keys, -delta, freq, interleaved)
    assert_close(keys, original, dtype, scale=2.0)


def rotate_pairs_naive(keys: torch.Tensor, delta: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE shift written as 2x2 rotations of each adjacent channel pair, in fp64 from the fp32 angle
    (the rotation is specified in fp32: the angle of a 30K-position shift is itself only fp32-exact)."""
    x = keys.double().unflatten(-1, (-1, 2))
    angle = (delta.float()[:, None] * freq.float()[None, :]).double()
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    a, b = x[..., 0], x[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("layout", ["contiguous", "kv-view", "hf-transposed", "unmergeable"])
def test_interleaved_fp32_reference_is_a_rotation_of_each_pair(layout):
    """The fp32 interleaved reference (complex multiplication in place when the view allows it) meets the
    definition on every layout, and leaves the rest of the base tensor alone."""
    gen = torch.Generator().manual_seed(7)
    base, keys = make_keys(layout, 37, 2, 16, torch.float32, "cpu", gen)
    delta = ragged_delta([20, 17], gen)
    freq = inv_freq(16)
    expected = rotate_pairs_naive(keys, delta, freq)
    untouched = base.clone()
    rope_shift_ref(keys, delta, freq, interleaved=True)
    torch.testing.assert_close(keys.double(), expected, atol=1e-4, rtol=1e-5)
    mask = torch.ones_like(base, dtype=torch.bool)
    make_keys_like(mask, base, keys).fill_(False)
    assert torch.equal(base[mask], untouched[mask])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "kv-view", "hf-transposed", "unmergeable"])
def test_interleaved_half_reference_rotates_in_fp32_and_rounds_once(layout, dtype):
    """bf16/fp16 interleaved keys are rotated in fp32 and rounded once: within one rounding of the exact rotation
    of the stored values, and the rest of the base tensor is left alone."""
    gen = torch.Generator().manual_seed(11)
    base, keys = make_keys(layout, 37, 2, 16, dtype, "cpu", gen)
    delta = ragged_delta([20, 17], gen)
    freq = inv_freq(16)
    expected = rotate_pairs_naive(keys.double(), delta, freq)
    untouched = base.clone()
    rope_shift_ref(keys, delta, freq, interleaved=True)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # half a unit in the last place, relative
    torch.testing.assert_close(keys.double(), expected, atol=1e-3, rtol=2 * ulp)
    mask = torch.ones_like(base, dtype=torch.bool)
    make_keys_like(mask, base, keys).fill_(False)
    assert torch.equal(base[mask], untouched[mask])


def test_interleaved_fp32_keys_the_complex_view_cannot_take_leave_the_source_unchanged():
    """fp32 keys at an odd offset and odd strides (no complex view) with a contiguous fp32 source: the rotation
    works on a copy, so the source is read only."""
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(20, 2, 17, generator=gen)
    keys = base[..., 1:]
    source = torch.randn(keys.shape, generator=gen)
    kept = source.clone()
    delta, freq = ragged_delta([20], gen), inv_freq(16)
    rope_shift_ref(keys, delta, freq, interleaved=True, source=source)
    assert torch.equal(source, kept)
    torch.testing.assert_close(keys.double(), rotate_pairs_naive(source.double(), delta, freq), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", INTERLEAVED)
def test_source_writes_the_rotated_source(backend, dtype, interleaved, device, assert_close):
    """With `source`, the keys become the source rotated (rotate-then-copy in one call); the source is unchanged
    and the keys' old values play no part."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 2, 63, 2, 64, generator=gen).to(device=device, dtype=dtype)  # a [L, 2, T, H, D] cache
    source = torch.randn(3, 63, 2, 64, generator=gen).to(device=device, dtype=dtype)
    delta, freq = ragged_delta([40, 23], gen).to(device), inv_freq(64).to(device)
    expected = source.clone()
    rope_shift_ref(expected, delta, freq, interleaved)
    untouched, kept = base[:, 1].clone(), source.clone()

    with use_backend(backend):
        rope_shift(base[:, 0], delta, freq, interleaved, source=source)

    assert torch.equal(source, kept) and torch.equal(base[:, 1], untouched)
    if backend == "torch":
        assert torch.equal(base[:, 0], expected)  # the same arithmetic as rotating in place
    else:
        assert_close(base[:, 0], expected, dtype)
