"""One dispatch point per query-path op: Triton on CUDA tensors, the pure-torch reference elsewhere.

The backend is decided once per call from capability (tensor device and an importable Triton), never from a
result: a wrong result is a bug, not a reason to fall back. Tests force a backend with `use_backend("triton")`
(under `TRITON_INTERPRET=1` the Triton kernels run on CPU tensors) or with `PROPHET_RAG_KERNELS=torch|triton`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from .query_scores import query_scores_ref
from .rope_shift import rope_shift_ref
from .sparse_attention import AttentionPlan, plan_attention, sparse_attention_torch
from .stage1_attention import stage1_attention_torch

BACKENDS = ("torch", "triton")
_forced: str | None = None


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _env_backend() -> str | None:
    value = os.environ.get("PROPHET_RAG_KERNELS") or None
    if value is not None and value not in BACKENDS:
        raise ValueError(f"PROPHET_RAG_KERNELS must be one of {BACKENDS}, got {value!r}.")
    return value


def backend_for(tensor: torch.Tensor) -> str:
    """The backend that runs an op on `tensor`: a forced one, else Triton for CUDA tensors when Triton imports."""
    forced = _forced or _env_backend()
    if forced is not None:
        return forced
    return "triton" if tensor.is_cuda and triton_available() else "torch"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend inside the block (None restores automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}.")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def rope_shift(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool = False,
               source: torch.Tensor | None = None) -> None:
    """Rotate keys `[..., tokens, kv_heads, head_dim]` in place by `delta` `[tokens]` positions, or write `source`
    rotated into them (see rope_shift_ref)."""
    if backend_for(keys) == "triton":
        from .rope_shift import rope_shift_triton

        return rope_shift_triton(keys, delta, inv_freq, interleaved, source)
    return rope_shift_ref(keys, delta, inv_freq, interleaved, source)


def query_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    prophet_out: torch.Tensor | None,
    norm_out: torch.Tensor | None,
) -> None:
    """Accumulate one layer's ProphetKV and InfoFlow scores into `[context_tokens]` fp32 buffers (query_scores_ref).

    The engine scores inside `stage1_attention`; this stand-alone op stays as the unfused baseline that the fused
    kernel is tested and benchmarked against (tests/kernels, benchmarks/bench_kernels.py)."""
    if backend_for(k) == "triton":
        from .query_scores import query_scores_triton

        return query_scores_triton(q, k, scale, prophet_out, norm_out)
    return query_scores_ref(q, k, scale, prophet_out, norm_out)


def attention_plan(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype, group: int,
                   kv_heads: int) -> AttentionPlan | None:
    """What `sparse_attention` can work out once for rows and keys that stay the same across layers (the torch
    path's blocks and masks), for `group` query heads per each of `kv_heads` KV heads; None when the backend needs
    nothing."""
    if backend_for(q_pos) == "triton":
        return None
    return plan_attention(q_pos, k_pos, dtype, group, kv_heads)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Attention of rows `[R, Hq, D]` at positions `q_pos` over keys `[N, Hkv, D]`, key_pos <= query_pos.
    `plan` is `attention_plan(q_pos, k_pos, q.dtype)`, for callers that attend the same rows in every layer."""
    if backend_for(q) == "triton":
        from .sparse_attention import sparse_attention_triton

        return sparse_attention_triton(q, k, v, q_pos, k_pos, scale)
    return sparse_attention_torch(q, k, v, q_pos, k_pos, scale, plan)


def stage1_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    context_end: int,
    prophet_out: torch.Tensor | None,
    norm_out: torch.Tensor | None,
    bounds: torch.Tensor | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """sparse_attention of the question rows, plus query_scores of the context keys `[0, context_end)` into the
    accumulators, from the same logits (see stage1_attention_ref). `plan` as for `sparse_attention`."""
    if backend_for(q) == "triton":
        from .stage1_attention import stage1_attention_triton

        return stage1_attention_triton(q, k, v, q_pos, k_pos, scale, context_end, prophet_out, norm_out, bounds)
    return stage1_attention_torch(q, k, v, q_pos, k_pos, scale, context_end, prophet_out, norm_out, bounds, plan)
