"""stage1_attention_triton against its definition: sparse_attention_ref for the output, query_scores_ref for the scores.

Covers GQA groups 1/2/4/7, head dims 16/64/128, 1 to 70 rows, up to 600 keys, context_end from 0 to all keys, gapped
and shuffled positions, rows that see only part of the keys, and the device-side bounds used for graph replay.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from prophet_rag.kernels import stage1_attention, use_backend
from prophet_rag.kernels.query_scores import query_scores_ref, query_scores_triton
from prophet_rag.kernels.sparse_attention import sparse_attention_ref, sparse_attention_triton
from prophet_rag.kernels.stage1_attention import stage1_attention_ref, stage1_attention_torch, stage1_attention_triton

CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes run only on CUDA (slow interpreter)")
# The interpreter multiplies bf16 operands of tl.dot as raw uint16 bits (triton 3.9), so bf16 is checked on CUDA only.
BF16_CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="interpreter tl.dot mishandles bf16")
# The interpreter evaluates masked-off lanes too (log2(0) for an empty split, 0 / 0 for padding rows), and numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def positions(layout: str, rows: int, keys: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos `[rows]`, k_pos `[keys]`).

    stage1: keys are three chunks at ascending positions with gaps, then the question; the rows are the last `rows`
    keys (the question), in order. scattered: the rows are a random, unsorted subset of the keys, so each sees only
    part of them. unsorted-keys: scattered with the keys shuffled.
    """
    lengths = torch.tensor([keys // 3, keys // 2, keys - keys // 3 - keys // 2])
    gaps = torch.tensor([3, 7, 100])
    starts = torch.cumsum(lengths + gaps, 0) - lengths
    k_pos = torch.cat([torch.arange(int(s), int(s + n)) for s, n in zip(starts, lengths, strict=True)])
    if layout == "stage1":
        return k_pos[keys - rows :], k_pos
    q_pos = k_pos[torch.randperm(keys, generator=gen)[:rows]]
    if layout == "unsorted-keys":
        k_pos = k_pos[torch.randperm(keys, generator=gen)]
    return q_pos, k_pos


SHAPES = [  # (layout, rows, q heads, kv heads, keys, context_end, head dim)
    pytest.param("stage1", 10, 2, 2, 500, 490, 64, id="stage1-S10-G1-N500-C490-D64"),
    pytest.param("stage1", 1, 7, 1, 63, 62, 16, id="stage1-S1-G7-N63-C62-D16"),
    pytest.param("stage1", 33, 4, 1, 200, 200, 128, id="stage1-S33-G4-N200-Call-D128"),
    pytest.param("stage1", 70, 8, 2, 600, 530, 16, id="stage1-S70-G4-N600-C530-D16"),
    pytest.param("stage1", 5, 4, 2, 40, 0, 16, id="stage1-S5-G2-N40-C0-D16"),
    pytest.param("scattered", 37, 4, 2, 300, 150, 64, id="scattered-S37-G2-N300-C150-D64"),
    pytest.param("unsorted-keys", 20, 14, 2, 130, 100, 16, id="unsortedk-S20-G7-N130-C100-D16"),
    pytest.param("stage1", 21, 32, 8, 16405, 16384, 128, id="stage1-S21-G4-N16K-D128", marks=CUDA_ONLY),
    pytest.param("stage1", 64, 28, 4, 8256, 8192, 128, id="stage1-S64-G7-N8K-D128", marks=CUDA_ONLY),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=BF16_CUDA_ONLY),
]


def make_inputs(layout, rows, q_heads, kv_heads, keys, dim, dtype, device, seed=0):
    """q `[S, Hq, D]`; k, v `[N, Hkv, D]` as halves of one `[N, 2, Hkv, D]` tensor (like a cache slice); positions."""
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = positions(layout, rows, keys, gen)
    q = torch.randn(rows, q_heads, dim, generator=gen).to(device=device, dtype=dtype)
    kv = torch.randn(keys, 2, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)
    return q, kv[:, 0], kv[:, 1], q_pos.to(device), k_pos.to(device)


def start_scores(context: int, device, which=("prophet", "norm")) -> dict[str, torch.Tensor]:
    """Non-zero starting accumulators: the kernel must add to them, not overwrite them."""
    gen = torch.Generator().manual_seed(1)
    return {name: (torch.rand(context, generator=gen) + 0.5).to(device) for name in which}


def check_scores(got, expected, start, assert_close):
    """Compare the increments, so that a small error in one layer is not hidden under the starting value."""
    for name in start:
        # Products are exact in fp32 for fp16/bf16 inputs, so every dtype is held to fp32 bounds (x10: summation order).
        assert_close(got[name] - start[name], expected[name] - start[name], torch.float32, scale=10.0, what=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,rows,q_heads,kv_heads,keys,context,dim", SHAPES)
def test_matches_definition(layout, rows, q_heads, kv_heads, keys, context, dim, dtype, device, nan_empty,
                            assert_close):
    q, k, v, q_pos, k_pos = make_inputs(layout, rows, q_heads, kv_heads, keys, dim, dtype, device)
    scale = dim**-0.5
    start = start_scores(context, device)
    expected = {name: t.clone() for name, t in start.items()}
    expected_out = sparse_attention_ref(q, k, v, q_pos, k_pos, scale)
    query_scores_ref(q, k[:context], scale, expected["prophet"], expected["norm"])

    got = {name: t.clone() for name, t in start.items()}
    out = stage1_attention_triton(q, k, v, q_pos, k_pos, scale, context, got["prophet"], got["norm"])

    assert out.dtype == q.dtype
    assert_close(out, expected_out, dtype, what="output")
    check_scores(got, expected, start, assert_close)
    # The reference is that definition, exactly.
    ref = {name: t.clone() for name, t in start.items()}
    ref_out = stage1_attention_ref(q, k, v, q_pos, k_pos, scale, context, ref["prophet"], ref["norm"])
    assert torch.equal(ref_out, expected_out)
    assert all(torch.equal(ref[name], expected[name]) for name in start)


def test_equals_the_kernels_it_replaces(device, nan_empty, assert_close):
    """One fused call == sparse_attention_triton + query_scores_triton on the same inputs."""
    q, k, v, q_pos, k_pos = make_inputs("stage1", 24, 8, 2, 400, 64, torch.float32, device, seed=6)
    context = 376
    start = start_scores(context, device)
    separate = {name: t.clone() for name, t in start.items()}
    separate_out = sparse_attention_triton(q, k, v, q_pos, k_pos, 0.125)
    query_scores_triton(q, k[:context], 0.125, separate["prophet"], separate["norm"])
    fused = {name: t.clone() for name, t in start.items()}
    fused_out = stage1_attention_triton(q, k, v, q_pos, k_pos, 0.125, context, fused["prophet"], fused["norm"])
    assert_close(fused_out, separate_out, torch.float32)
    check_scores(fused, separate, start, assert_close)


@pytest.mark.parametrize("which", [("prophet",), ("norm",), ()], ids=["prophet", "norm", "none"])
def test_some_scores_absent(which, device, nan_empty, assert_close):
    """An absent accumulator is never dereferenced, and the output does not depend on which scores are wanted."""
    q, k, v, q_pos, k_pos = make_inputs("stage1", 9, 4, 2, 150, 64, torch.float16, device, seed=3)
    start = start_scores(140, device, which)
    expected = {name: t.clone() for name, t in start.items()}
    query_scores_ref(q, k[:140], 0.125, expected.get("prophet"), expected.get("norm"))
    got = {name: t.clone() for name, t in start.items()}
    out = stage1_attention_triton(q, k, v, q_pos, k_pos, 0.125, 140, got.get("prophet"), got.get("norm"))
    assert_close(out, sparse_attention_ref(q, k, v, q_pos, k_pos, 0.125), torch.float16)
    check_scores(got, expected, start, assert_close)


@pytest.mark.parametrize("implementation", [stage1_attention_torch, stage1_attention_triton], ids=["torch", "triton"])
def test_peaked_logits_on_question_keys(implementation, device, nan_empty, assert_close):
    """Rows attend almost only to question keys (logits hundreds of units above the context's): the context softmax
    has its own maximum; measured from the question keys' one, its sums would underflow to 0 in fp32."""
    q, k, v, q_pos, k_pos = make_inputs("stage1", 12, 4, 4, 300, 64, torch.float32, device, seed=4)
    context = 288
    q = q + 20.0 * k[context:]  # row i aligned with question key i, in every head
    start = start_scores(context, device)
    expected = {name: t.clone() for name, t in start.items()}
    query_scores_ref(q, k[:context], 0.125, expected["prophet"], expected["norm"])
    got = {name: t.clone() for name, t in start.items()}
    out = implementation(q, k, v, q_pos, k_pos, 0.125, context, got["prophet"], got["norm"])
    assert_close(out, sparse_attention_ref(q, k, v, q_pos, k_pos, 0.125), torch.float32)
    check_scores(got, expected, start, assert_close)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bounds_make_bucketed_shapes_exact(backend, device, nan_empty, assert_close):
    """Graph replay with bucketed shapes: 13 question rows padded to 16 by repeating the last row, 213 keys padded to
    256 with NaN K/V, accumulators padded past context_end. With bounds = (13, context_end, 213) the real rows, the
    scores and the accumulators' padding come out as in the unpadded call."""
    rows, keys, context = 13, 213, 200
    q, k, v, q_pos, k_pos = make_inputs("stage1", rows, 8, 2, keys, 32, torch.float32, device, seed=5)
    start = start_scores(context, device)
    expected = {name: t.clone() for name, t in start.items()}
    expected_out = stage1_attention_ref(q, k, v, q_pos, k_pos, 0.2, context, expected["prophet"], expected["norm"])

    pad_rows = torch.cat([torch.arange(rows), torch.full((3,), rows - 1)]).to(device)
    kv = torch.full((256, 2, 2, 32), float("nan"), device=device)
    kv[:keys, 0], kv[:keys, 1] = k, v
    k_pos_padded = torch.cat([k_pos, int(k_pos[-1]) + 1 + torch.arange(256 - keys, device=device)])
    padded = {name: torch.cat([t, torch.full((56,), 7.0, device=device)]) for name, t in start.items()}
    bounds = torch.tensor([rows, context, keys], dtype=torch.int32, device=device)
    with use_backend(backend):
        out = stage1_attention(q[pad_rows], kv[:, 0], kv[:, 1], q_pos[pad_rows], k_pos_padded, 0.2, 256,
                               padded["prophet"], padded["norm"], bounds)

    assert_close(out, expected_out[pad_rows], torch.float32)
    check_scores({name: t[:context] for name, t in padded.items()}, expected, start, assert_close)
    assert all(torch.equal(t[context:], torch.full((56,), 7.0, device=device)) for t in padded.values())


def test_no_rows(device):
    q, k, v, _, k_pos = make_inputs("stage1", 0, 2, 1, 30, 16, torch.float16, device)
    prophet = torch.zeros(30, device=device)
    out = stage1_attention_triton(q, k, v, k_pos[:0], k_pos, 0.25, 30, prophet, None)
    assert out.shape == (0, 2, 16)
    assert not prophet.any()


def test_rejects_a_short_accumulator(device):
    q, k, v, q_pos, k_pos = make_inputs("stage1", 3, 2, 1, 30, 16, torch.float32, device)
    with pytest.raises(ValueError, match="accumulators"):
        stage1_attention_triton(q, k, v, q_pos, k_pos, 0.25, 27, torch.zeros(20, device=device), None)


def test_dispatch_runs_triton_when_forced(device, monkeypatch, assert_close):
    module = importlib.import_module("prophet_rag.kernels.stage1_attention")  # package attribute = dispatch function
    calls = []
    monkeypatch.setattr(module, "stage1_attention_triton", lambda *a: calls.append(1) or stage1_attention_triton(*a))
    q, k, v, q_pos, k_pos = make_inputs("stage1", 6, 4, 2, 90, 32, torch.float32, device, seed=7)
    prophet_ref, prophet = torch.zeros(84, device=device), torch.zeros(84, device=device)
    expected = stage1_attention_ref(q, k, v, q_pos, k_pos, 0.2, 84, prophet_ref, None)
    with use_backend("triton"):
        out = stage1_attention(q, k, v, q_pos, k_pos, 0.2, 84, prophet, None)
    assert calls == [1]
    assert_close(out, expected, torch.float32)
    assert_close(prophet, prophet_ref, torch.float32, scale=10.0)


TORCH_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("layout,rows,q_heads,kv_heads,keys,context,dim", SHAPES)
def test_torch_path_matches_definition(layout, rows, q_heads, kv_heads, keys, context, dim, dtype, device,
                                       assert_close):
    """stage1_attention_torch (one logits tensor for both softmaxes) against the two reference ops."""
    q, k, v, q_pos, k_pos = make_inputs(layout, rows, q_heads, kv_heads, keys, dim, dtype, device)
    scale = dim**-0.5
    start = start_scores(context, device)
    expected = {name: t.clone() for name, t in start.items()}
    expected_out = stage1_attention_ref(q, k, v, q_pos, k_pos, scale, context, expected["prophet"], expected["norm"])
    got = {name: t.clone() for name, t in start.items()}
    out = stage1_attention_torch(q, k, v, q_pos, k_pos, scale, context, got["prophet"], got["norm"])
    assert out.dtype == q.dtype
    assert_close(out, expected_out, dtype, what="output")
    check_scores(got, expected, start, assert_close)


@pytest.mark.parametrize("which", [("prophet",), ("norm",)])
def test_torch_path_adds_only_the_scores_asked_for(which, device, assert_close):
    q, k, v, q_pos, k_pos = make_inputs("scattered", 17, 6, 2, 120, 16, torch.float32, device, seed=8)
    start = start_scores(90, device, which)
    expected = {name: t.clone() for name, t in start.items()}
    stage1_attention_ref(q, k, v, q_pos, k_pos, 0.3, 90, expected.get("prophet"), expected.get("norm"))
    got = {name: t.clone() for name, t in start.items()}
    stage1_attention_torch(q, k, v, q_pos, k_pos, 0.3, 90, got.get("prophet"), got.get("norm"))
    check_scores(got, expected, start, assert_close)


def test_torch_path_runs_the_reference_past_its_logits_limit(device, monkeypatch):
    """Calls whose logits would exceed _FUSED_LOGITS_BYTES take sparse_attention_torch and the reference scores: the
    scores exactly the reference's, the output to fp32 rounding (blocks merged by their log-sum-exp)."""
    module = importlib.import_module("prophet_rag.kernels.stage1_attention")
    monkeypatch.setattr(module, "_FUSED_LOGITS_BYTES", 0)
    q, k, v, q_pos, k_pos = make_inputs("stage1", 9, 4, 2, 80, 16, torch.float32, device, seed=9)
    expected, got = torch.zeros(70, device=device), torch.zeros(70, device=device)
    expected_out = stage1_attention_ref(q, k, v, q_pos, k_pos, 0.25, 70, expected, None)
    out = stage1_attention_torch(q, k, v, q_pos, k_pos, 0.25, 70, got, None)
    assert torch.equal(got, expected)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-5)


def test_torch_path_where_a_row_misses_a_context_key(device, assert_close):
    """A row placed before some context keys: the scores still cover every context key (no position mask), the
    output only the keys the row sees; the path that exponentiates the context once is not taken."""
    q, k, v, q_pos, k_pos = make_inputs("stage1", 8, 4, 2, 120, 16, torch.float32, device, seed=10)
    q_pos = q_pos.clone()
    q_pos[0] = k_pos[50]  # row 0 sees context keys 0..50 only
    start = start_scores(110, device)
    expected = {name: t.clone() for name, t in start.items()}
    expected_out = stage1_attention_ref(q, k, v, q_pos, k_pos, 0.25, 110, expected["prophet"], expected["norm"])
    got = {name: t.clone() for name, t in start.items()}
    out = stage1_attention_torch(q, k, v, q_pos, k_pos, 0.25, 110, got["prophet"], got["norm"])
    assert_close(out, expected_out, torch.float32)
    check_scores(got, expected, start, assert_close)
