"""query_scores_triton against query_scores_ref: GQA ratios, query/context lengths off the tile sizes, both scores."""

from __future__ import annotations

import importlib

import pytest
import torch

from prophet_rag.kernels import query_scores, use_backend
from prophet_rag.kernels.query_scores import query_scores_ref, query_scores_triton

CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes run only on CUDA (slow interpreter)")
# The interpreter multiplies bf16 operands of tl.dot as raw uint16 bits (triton 3.9), so bf16 is checked on CUDA only.
BF16_CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="interpreter tl.dot mishandles bf16")

SHAPES = [  # (query tokens, q heads, kv heads, context tokens, head dim); tiles are 64 queries x 64 keys
    pytest.param(10, 1, 1, 500, 64, id="S10-Hq1-G1-N500-D64"),  # 8 context splits, merged
    pytest.param(7, 3, 1, 63, 16, id="S7-Hq3-G3-N63-D16"),
    pytest.param(33, 4, 1, 200, 128, id="S33-Hq4-G4-N200-D128"),
    pytest.param(70, 8, 2, 130, 16, id="S70-Hq8-G4-N130-D16"),  # two query blocks
    pytest.param(64, 32, 8, 16384, 128, id="S64-Hq32-G4-N16K-D128", marks=CUDA_ONLY),
    pytest.param(300, 28, 4, 5000, 128, id="S300-Hq28-G7-N5000-D128", marks=CUDA_ONLY),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=BF16_CUDA_ONLY),
]


def make_inputs(queries, q_heads, kv_heads, context, dim, dtype, device, seed=0, sharpness=1.0):
    """q `[S, Hq, D]` and k `[N, Hkv, D]`, k as the key half of a `[N, 2, Hkv, D]` tensor (a non-trivial stride)."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(queries, q_heads, dim, generator=gen) * sharpness).to(device=device, dtype=dtype)
    kv = torch.randn(context, 2, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)
    return q, kv[:, 0]


def run_both(q, k, scale, which=("prophet", "norm")):
    """Run reference and kernel from the same non-zero accumulators; return {score: (kernel increment, ref increment)}.

    Starting from non-zero values checks that the kernel adds rather than overwrites; the increments are compared
    (not the sums) so that a small error in one layer's score is not hidden under the starting value.
    """
    gen = torch.Generator().manual_seed(1)
    start = {name: (torch.rand(k.shape[0], generator=gen) + 0.5).to(k.device) for name in which}
    ref = {name: t.clone() for name, t in start.items()}
    out = {name: t.clone() for name, t in start.items()}
    query_scores_ref(q, k, scale, ref.get("prophet"), ref.get("norm"))
    query_scores_triton(q, k, scale, out.get("prophet"), out.get("norm"))
    return {name: (out[name] - start[name], ref[name] - start[name]) for name in which}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("queries,q_heads,kv_heads,context,dim", SHAPES)
def test_matches_reference(queries, q_heads, kv_heads, context, dim, dtype, device, nan_empty, assert_close):
    q, k = make_inputs(queries, q_heads, kv_heads, context, dim, dtype, device)
    # Products are exact in fp32 for fp16/bf16 inputs, so every dtype is held to fp32 bounds (x10: summation order).
    for name, (got, expected) in run_both(q, k, dim**-0.5).items():
        assert_close(got, expected, torch.float32, scale=10.0, what=name)


@pytest.mark.parametrize("which", ["prophet", "norm"])
def test_single_score(which, device, nan_empty, assert_close):
    """One accumulator None: the other is still right (and the absent one is never dereferenced)."""
    q, k = make_inputs(9, 4, 2, 150, 64, torch.float16, device, seed=3)
    got, expected = run_both(q, k, 0.125, which=(which,))[which]
    assert_close(got, expected, torch.float32, scale=10.0)


def test_peaked_softmax(device, nan_empty, assert_close):
    """Logits spanning hundreds of units: the two-pass log-sum-exp must not overflow or lose the peak."""
    q, k = make_inputs(12, 4, 4, 300, 64, torch.float32, device, seed=4, sharpness=12.0)
    for name, (got, expected) in run_both(q, k, 64**-0.5).items():
        assert_close(got, expected, torch.float32, scale=10.0, what=name)


def test_dispatch_runs_triton_when_forced(device, monkeypatch, assert_close):
    module = importlib.import_module("prophet_rag.kernels.query_scores")  # package attribute = dispatch function
    calls = []
    monkeypatch.setattr(module, "query_scores_triton", lambda *a: calls.append(1) or query_scores_triton(*a))
    q, k = make_inputs(5, 2, 1, 100, 32, torch.float32, device, seed=5)
    prophet_ref, norm_ref = torch.zeros(100, device=device), torch.zeros(100, device=device)
    prophet, norm = prophet_ref.clone(), norm_ref.clone()
    query_scores_ref(q, k, 0.2, prophet_ref, norm_ref)
    with use_backend("triton"):
        query_scores(q, k, 0.2, prophet, norm)
    assert calls == [1]
    assert_close(prophet, prophet_ref, torch.float32, scale=10.0)
    assert_close(norm, norm_ref, torch.float32, scale=10.0)
