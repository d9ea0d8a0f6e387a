"""Stage I of ProphetKV and the InfoFlow score: how much the query attends to each context token, for one layer.

With `A[h, s, t] = softmax_t(q[s, h] . k[t, h] * scale)` over the context keys only:
- ProphetKV: `prophet[t] += sum_{h, s} A[h, s, t]`;
- InfoFlow attention norm: `norm[t] += || mean_h A[h, :, t] ||_2` (L2 over the query tokens).
Both accumulate across layers in place, in fp32. Query heads map to KV heads GQA-style (head h uses KV head
h // (q_heads // kv_heads)).
"""

from __future__ import annotations

import torch

from .triton_util import LOG2E, cdiv, lazy_jit, next_pow2, num_sms

tl = None  # triton.language, bound by lazy_jit at the first launch (see triton_util)


def query_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    prophet_out: torch.Tensor | None,
    norm_out: torch.Tensor | None,
) -> None:
    """Accumulate one layer's scores.

    q: `[query_tokens, q_heads, head_dim]` post-RoPE queries of the question tokens.
    k: `[context_tokens, kv_heads, head_dim]` post-RoPE context keys.
    prophet_out, norm_out: `[context_tokens]` fp32 accumulators, or None to skip that score.
    """
    s, hq, d = q.shape
    hk = k.shape[1]
    qg = q.to(torch.float32).reshape(s, hk, hq // hk, d)
    logits = torch.einsum("skgd,tkd->kgst", qg, k.to(torch.float32)) * scale
    attn = torch.softmax(logits, dim=-1)
    if prophet_out is not None:
        prophet_out += attn.sum(dim=(0, 1, 2))
    if norm_out is not None:
        norm_out += attn.mean(dim=(0, 1)).norm(dim=0)


def _stats_kernel(
    q,
    k,
    lse,
    queries,
    context,
    tokens_per_split,
    stride_qs,
    stride_qh,
    stride_kn,
    stride_kh,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 1: log-sum-exp of the logits of `BLOCK_S` queries of one head over one split of the context.

    q `[S, Hq, D]`, k `[N, Hkv, D]`; writes lse `[splits, Hq, S]` (natural log). Grid `(cdiv(S, BLOCK_S), Hq, splits)`.
    """
    pid_s, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    qt = tl.load(
        q + offs_s[:, None] * stride_qs + head * stride_qh + offs_d[None, :],
        mask=(offs_s < queries)[:, None] & d_mask[None, :],
        other=0.0,
    )
    k_head = k + (head // GROUP) * stride_kh

    # Online max and sum in base 2 over this split's keys (every split holds at least one key, so m stays finite).
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_S], tl.float32)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, context)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        kt = tl.load(
            k_head + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0
        )
        logits = tl.dot(qt, kt, input_precision="ieee") * scale_log2
        logits = tl.where(n_mask[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        row_sum = row_sum * tl.exp2(m - m_new) + tl.sum(tl.exp2(logits - m_new[:, None]), 1)
        m = m_new

    ln2: tl.constexpr = 0.6931471805599453
    dst = lse + (split * tl.num_programs(1) + head) * queries + offs_s
    tl.store(dst, (m + tl.log2(row_sum)) * ln2, mask=offs_s < queries)


def _scores_kernel(
    q,
    k,
    lse,
    prophet_out,
    norm_out,
    queries,
    context,
    q_heads,
    stride_qs,
    stride_qh,
    stride_kn,
    stride_kh,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_PROPHET: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 2: both scores of `BLOCK_N` context tokens, from recomputed logits and the final lse `[Hq, S]`.

    One program owns its tokens across all heads and queries, so the head mean is complete before it is squared and
    the accumulation into prophet_out / norm_out `[N]` needs no atomics. Grid `(cdiv(N, BLOCK_N),)`.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask, d_mask = offs_n < context, offs_d < HEAD_DIM
    log2e: tl.constexpr = 1.4426950408889634
    prophet = tl.zeros([BLOCK_N], tl.float32)
    norm_sq = tl.zeros([BLOCK_N], tl.float32)

    for s0 in range(0, queries, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < queries
        head_sum = tl.zeros([BLOCK_S, BLOCK_N], tl.float32)
        # K tile loaded once per KV head and reused by its GROUP query heads. A runtime loop over the group: unrolled,
        # the software pipeliner keeps every head's Q tile in shared memory at once (~160 KiB at D=128, GROUP=4).
        for kv_head in range(0, q_heads // GROUP):
            kt = tl.load(
                k + kv_head * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None],
                mask=n_mask[None, :] & d_mask[:, None],
                other=0.0,
            )
            for g in range(GROUP):
                head = kv_head * GROUP + g
                qt = tl.load(
                    q + offs_s[:, None] * stride_qs + head * stride_qh + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                # Padded query rows get lse = +inf, hence probability 0.
                row_lse = tl.load(lse + head * queries + offs_s, mask=s_mask, other=float("inf")) * log2e
                logits = tl.dot(qt, kt, input_precision="ieee") * scale_log2
                head_sum += tl.exp2(logits - row_lse[:, None])
        prophet += tl.sum(head_sum, 0)
        norm_sq += tl.sum(head_sum * head_sum, 0)

    # Accumulate in place: this program is the only writer of its tokens.
    if HAS_PROPHET:
        tl.store(prophet_out + offs_n, tl.load(prophet_out + offs_n, mask=n_mask) + prophet, mask=n_mask)
    if HAS_NORM:
        norm = tl.sqrt(norm_sq) / q_heads
        tl.store(norm_out + offs_n, tl.load(norm_out + offs_n, mask=n_mask) + norm, mask=n_mask)


def query_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    prophet_out: torch.Tensor | None,
    norm_out: torch.Tensor | None,
) -> None:
    """Triton version of `query_scores_ref`, same contract; `[H, S, N]` is never materialised."""
    (queries, q_heads, dim), (context, kv_heads) = q.shape, k.shape[:2]
    if (prophet_out is None and norm_out is None) or queries == 0 or context == 0:
        return
    for out in (prophet_out, norm_out):
        if out is not None and (out.dtype != torch.float32 or out.stride(0) != 1):
            raise ValueError("query_scores accumulators must be contiguous fp32 `[context_tokens]` tensors.")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    block_s, block_n, block_d = 64, 64, max(16, next_pow2(dim))
    # Pass 1 splits the context so that (query blocks x heads x splits) fills the GPU about twice over.
    row_programs = cdiv(queries, block_s) * q_heads
    key_blocks = cdiv(context, block_n)
    splits = max(1, min(key_blocks, cdiv(2 * num_sms(q.device), row_programs)))
    tokens_per_split = cdiv(key_blocks, splits) * block_n
    splits = cdiv(context, tokens_per_split)

    common = dict(GROUP=q_heads // kv_heads, HEAD_DIM=dim, BLOCK_S=block_s, BLOCK_N=block_n, BLOCK_D=block_d)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    scale_log2 = scale * LOG2E
    lse = torch.empty(splits, q_heads, queries, device=q.device, dtype=torch.float32)
    lazy_jit(_stats_kernel)[(cdiv(queries, block_s), q_heads, splits)](
        q, k, lse, queries, context, tokens_per_split, *strides, scale_log2, **common, num_warps=4, num_stages=3
    )
    # Merge the per-split lse (a few KiB): one small op instead of a third kernel.
    lse = torch.logsumexp(lse, dim=0) if splits > 1 else lse[0]
    dummy = lse  # stands in for an absent output; never dereferenced (HAS_* is False)
    lazy_jit(_scores_kernel)[(key_blocks,)](
        q,
        k,
        lse,
        dummy if prophet_out is None else prophet_out,
        dummy if norm_out is None else norm_out,
        queries,
        context,
        q_heads,
        *strides,
        scale_log2,
        HAS_PROPHET=prophet_out is not None,
        HAS_NORM=norm_out is not None,
        **common,
        num_warps=4,
        num_stages=3,
    )
