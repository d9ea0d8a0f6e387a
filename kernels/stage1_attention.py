"""ProphetKV's Stage I for one layer in one op: the question rows' attention output and their token scores.

Stage I runs the suffix (question) rows over the reused cache. Each layer needs two things from the same logits
`q . k * scale`:
- the rows' attention output over every key they can see (exact position mask, key position <= row position), the
  `sparse_attention` contract;
- ProphetKV's and InfoFlow's scores of the context keys (slots `[0, context_end)`), from a softmax over the context
  keys only, without any position mask (the `query_scores` contract: in Stage I every context key precedes every
  question row anyway).

`stage1_attention_ref` is that definition, the two reference ops one after the other. The Triton version does it in
two launches and never materialises `[H, S, N]`:
1. split-K attention (grid: row blocks x KV heads x key splits). A program stacks the GROUP query heads of one KV
   head as extra rows (K/V tiles are loaded once per KV head), and from each logits tile keeps two online softmaxes:
   the masked one over all keys (for the output, with P.V) and the unmasked one over context keys (only its
   log-sum-exp, for the scores). Writes per-split partial outputs and both partial log-sum-exps.
2. one grid with two kinds of program. Score programs own `BLOCK_N` context keys across all heads and rows, merge
   the context log-sum-exp of the splits, recompute the logits and turn them into probabilities, so the head mean
   is complete in registers before InfoFlow squares it and each key has a single writer (no atomics). Combine
   programs merge the split outputs of one head's rows.
Compared with `sparse_attention` + `query_scores` this saves query_scores' statistics pass (one Q.K^T over the
context), its log-sum-exp merge and the host-side set-up ops of sparse_attention (argsort, searchsorted).

For CUDA-graph replay with bucketed shapes, `bounds` (int32 `[3]` on the device: rows to score, context_end, keys)
makes the counts device-side: the tensors are then sized to the bucket maxima, the padding rows (after the scored
rows) still get an output but add nothing to the scores, and the keys past the count are never read.
"""

from __future__ import annotations

from functools import partial

import torch

from .query_scores import query_scores_ref
from .sparse_attention import AttentionPlan, sparse_attention_ref, sparse_attention_torch
from .triton_util import LOG2E, cdiv, lazy_jit, next_pow2, num_sms

tl = None  # triton.language, bound by lazy_jit at the first launch (see triton_util)


def stage1_attention_ref(
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
) -> torch.Tensor:
    """Attention output of the rows; adds one layer's scores of the context keys into the accumulators.

    q: `[rows, q_heads, head_dim]` post-RoPE; k, v: `[keys, kv_heads, head_dim]`, the context keys first
    (slots `[0, context_end)`); q_pos `[rows]`, k_pos `[keys]` integer positions. prophet_out, norm_out:
    `[>= context_end]` fp32 accumulators or None (see `query_scores_ref`). bounds: None, or int32 `[3]` on q's
    device (rows, context_end, keys): only the first `rows` rows are scored (all get an output), context_end
    replaces the argument, and only the first `keys` keys are attended.
    Returns `[rows, q_heads, head_dim]` in q's dtype, as `sparse_attention_ref` does.
    """
    return _attention_and_scores(sparse_attention_ref, q, k, v, q_pos, k_pos, scale, context_end, prophet_out,
                                 norm_out, bounds)


def _attention_and_scores(attend, q, k, v, q_pos, k_pos, scale, context_end, prophet_out, norm_out, bounds):
    """`attend(q, k, v, q_pos, k_pos, scale)` over the first `keys` keys, then `query_scores_ref` (see
    `stage1_attention_ref`)."""
    scored, context, keys = (q.shape[0], context_end, k.shape[0]) if bounds is None else bounds.tolist()
    out = attend(q, k[:keys], v[:keys], q_pos, k_pos[:keys], scale)
    if context > 0 and (prophet_out is not None or norm_out is not None):
        prophet = None if prophet_out is None else prophet_out[:context]
        norm = None if norm_out is None else norm_out[:context]
        query_scores_ref(q[:scored], k[:context], scale, prophet, norm)
    return out


_FUSED_LOGITS_BYTES = 64 * 2**20
"""Largest fp32 logits tensor `stage1_attention_torch` materialises; larger calls attend in blocks
(`sparse_attention_torch`) and score with the reference."""


def stage1_attention_torch(
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
    """`stage1_attention_ref`'s contract in plain torch ops, the logits computed once for both uses.

    The reference reads every key twice (SDPA for the output, a second Q.K^T for the scores) and copies K and V to a
    head-major layout for SDPA; here one batched matmul per KV head gives the fp32 logits `[kv_heads, group * rows,
    keys]` that both uses read. Stage I has few rows (the question's), so the logits are small: 20 to 35% less time
    per layer than the reference on a 2-core CPU at 4K tokens (benchmarks/bench_stage1.py). When every row sees every
    context key (Stage I's layout), one exponential of the context logits serves both the scores' softmax and the
    output, whose few other keys (the question's own, masked by position) are merged in by their maximum and sum:
    2.7 -> 1.9 ms a layer against two softmaxes and a mask over all keys (21 rows, SmolLM2's heads, 4,246 keys).
    Larger calls than `_FUSED_LOGITS_BYTES` of logits run `sparse_attention_torch` and the reference scores.
    """
    scored, context, keys = (q.shape[0], context_end, k.shape[0]) if bounds is None else bounds.tolist()
    rows, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    if rows * q_heads * keys * 4 > _FUSED_LOGITS_BYTES:
        # `plan` was made for the first `keys` keys.
        return _attention_and_scores(partial(sparse_attention_torch, plan=plan), q, k, v, q_pos, k_pos, scale,
                                     context_end, prophet_out, norm_out, bounds)
    # Row r of query head kv * group + g is row g * rows + r of KV head kv, as in sparse_attention_torch.
    qg = q.float().unflatten(1, (kv_heads, group)).permute(1, 2, 0, 3).reshape(kv_heads, group * rows, dim)
    kt, vt = k[:keys].float().transpose(0, 1), v[:keys].float().transpose(0, 1)  # [kv_heads, keys, dim] views
    if rows and 0 < context and bool(k_pos[:context].max() <= q_pos.min()):
        out = _seen_context(qg, kt, vt, q_pos, k_pos[:keys], scale, context, scored, group, prophet_out, norm_out)
    else:
        out = _masked(qg, kt, vt, q_pos, k_pos[:keys], scale, context, scored, group, prophet_out, norm_out)
    return out.view(kv_heads, group, rows, dim).permute(2, 0, 1, 3).reshape(rows, q_heads, dim).to(q.dtype)


def _seen_context(qg, kt, vt, q_pos, k_pos, scale, context, scored, group, prophet_out, norm_out) -> torch.Tensor:
    """`[kv_heads, group * rows, dim]` output when every row sees the context keys `[0, context)`: their
    exponentials, from the context's own maximum (the scores' softmax has it; see
    test_peaked_logits_on_question_keys), give the scores and the unnormalised output, and the rest of the keys,
    masked by position, are merged in by the larger maximum."""
    kv_heads, folded, _ = qg.shape
    rows = folded // group
    e = torch.bmm(qg, kt[:, :context].transpose(1, 2)).mul_(scale)
    top = e.amax(dim=-1, keepdim=True)
    e.sub_(top).exp_()
    total = e.sum(dim=-1, keepdim=True)  # [kv_heads, group * rows, 1]
    out = torch.bmm(e, vt[:, :context])
    if prophet_out is not None or norm_out is not None:
        # Each scored row's softmax is its exponentials over its sum; the padding rows past `scored` add nothing.
        weight = total.reciprocal().view(kv_heads, group, rows)
        weight[:, :, scored:] = 0
        if prophet_out is not None:
            prophet_out[:context] += torch.bmm(weight.view(kv_heads, 1, folded), e).sum(dim=(0, 1))
        if norm_out is not None:
            attn = e.view(kv_heads, group, rows, context)[:, :, :scored] * weight[:, :, :scored, None]
            norm_out[:context] += attn.mean(dim=(0, 1)).norm(dim=0)
    if kt.shape[1] == context:
        return out / total
    rest = torch.bmm(qg, kt[:, context:].transpose(1, 2)).mul_(scale)
    hidden = k_pos[None, context:] > q_pos[:, None]
    rest = rest.view(kv_heads, group, rows, -1).masked_fill_(hidden, float("-inf")).view(kv_heads, folded, -1)
    peak = torch.maximum(top, rest.amax(dim=-1, keepdim=True))
    shrink = torch.exp(top - peak)
    rest = rest.sub_(peak).exp_()
    return (out.mul_(shrink) + torch.bmm(rest, vt[:, context:])) / (total * shrink + rest.sum(dim=-1, keepdim=True))


def _masked(qg, kt, vt, q_pos, k_pos, scale, context, scored, group, prophet_out, norm_out) -> torch.Tensor:
    """`[kv_heads, group * rows, dim]` output when some row does not see every context key: the scores' softmax
    over the context keys, unmasked, and the output's over every key the row sees."""
    kv_heads, folded, _ = qg.shape
    rows = folded // group
    logits = torch.bmm(qg, kt.transpose(1, 2)).mul_(scale)
    keys = logits.shape[-1]
    if context > 0 and (prophet_out is not None or norm_out is not None):
        # The scores' softmax: the first `scored` rows over the context keys, no position mask (query_scores_ref).
        attn = torch.softmax(logits.view(kv_heads, group, rows, keys)[:, :, :scored, :context], dim=-1)
        if prophet_out is not None:
            prophet_out[:context] += attn.sum(dim=(0, 1, 2))
        if norm_out is not None:
            norm_out[:context] += attn.mean(dim=(0, 1)).norm(dim=0)
    hidden = k_pos[None, :] > q_pos[:, None]
    probs = torch.softmax(logits.view(kv_heads, group, rows, keys).masked_fill_(hidden, float("-inf")), dim=-1)
    return torch.bmm(probs.view(kv_heads, folded, keys), vt)


def _attention_kernel(
    q,
    k,
    v,
    q_pos,
    k_pos,
    part_out,
    part_lse,
    part_lse_ctx,
    bounds,
    rows,
    keys,
    context,
    keys_per_split,
    stride_qs,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    scale_log2,
    Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 1 over one split of the keys, for `BLOCK_M` (row, head) pairs of one KV head.

    q `[S, Hq, D]`, k/v `[N, Hkv, D]`. Writes part_out `[splits, S, Hq, D]` fp32 (normalised within the split, 0
    where the split holds no visible key), part_lse and part_lse_ctx `[splits, Hq, S]` fp32 base-2 log-sum-exps
    (-inf where empty). Grid `(cdiv(S * GROUP, BLOCK_M), Hkv, splits)`.
    """
    pid_m, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if HAS_BOUNDS:
        context = tl.load(bounds + 1)
        keys = tl.load(bounds + 2)
    # Packed index i = row * GROUP + g: the GROUP query heads of this KV head share every K/V tile.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask, d_mask = offs_m < rows * GROUP, offs_d < HEAD_DIM
    row = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    # Padding entries get position -1: they see no key (positions are >= 0) and are never stored.
    pos = tl.load(q_pos + row, mask=m_mask, other=-1)
    qt = tl.load(
        q + row[:, None] * stride_qs + head[:, None] * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    k_head = k + kv_head * stride_kh
    v_head = v + kv_head * stride_vh

    # Two online softmaxes in base 2. The maxima start finite so that a split with no visible (or no context) key
    # for a row gives p = 0 and a rescale of 1 instead of NaN.
    m = tl.full([BLOCK_M], -1.0e38, tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_ctx = tl.full([BLOCK_M], -1.0e38, tl.float32)
    sum_ctx = tl.zeros([BLOCK_M], tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, keys)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        kp = tl.load(k_pos + offs_n, mask=n_mask, other=0)
        kt = tl.load(
            k_head + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0
        )
        vt = tl.load(
            v_head + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
        )
        logits = tl.dot(qt, kt, input_precision="ieee") * scale_log2
        # The scores' softmax: context keys only, no position mask. Tiles past context_end skip it.
        if start < context:
            ctx_logits = tl.where((offs_n < context)[None, :], logits, float("-inf"))
            m_ctx_new = tl.maximum(m_ctx, tl.max(ctx_logits, 1))
            sum_ctx = sum_ctx * tl.exp2(m_ctx - m_ctx_new) + tl.sum(tl.exp2(ctx_logits - m_ctx_new[:, None]), 1)
            m_ctx = m_ctx_new
        visible = (kp[None, :] <= pos[:, None]) & n_mask[None, :]
        masked = tl.where(visible, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(masked, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(masked - m_new[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        m = m_new

    lse_at = (split * Q_HEADS + head) * rows + row
    # log2(0) = -inf: an empty split gets weight 0 in the merges.
    tl.store(part_lse + lse_at, m + tl.log2(row_sum), mask=m_mask)
    tl.store(part_lse_ctx + lse_at, m_ctx + tl.log2(sum_ctx), mask=m_mask)
    out_at = ((split * rows + row) * Q_HEADS + head) * HEAD_DIM
    tl.store(
        part_out + out_at[:, None] + offs_d[None, :],
        acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None],
        mask=m_mask[:, None] & d_mask[None, :],
    )


def _scores_combine_kernel(
    q,
    k,
    part_out,
    part_lse,
    part_lse_ctx,
    out,
    prophet_out,
    norm_out,
    bounds,
    rows,
    scored,
    context,
    splits,
    score_programs,
    stride_qs,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_os,
    stride_oh,
    scale_log2,
    Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,
    HAS_PROPHET: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    """Pass 2: programs `[0, score_programs)` score `BLOCK_N` context keys each; the rest combine the split outputs
    of `BLOCK_S` rows of one head into out `[S, Hq, D]`.

    prophet_out, norm_out `[>= context]` fp32, accumulated in place. Grid
    `(score_programs + cdiv(S, BLOCK_S) * Hq,)`.
    """
    pid = tl.program_id(0)
    if HAS_BOUNDS:
        scored = tl.load(bounds)
        context = tl.load(bounds + 1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_sp = tl.arange(0, BLOCK_SPLITS)
    d_mask, sp_mask = offs_d < HEAD_DIM, offs_sp < splits
    if pid < score_programs:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < context
        prophet = tl.zeros([BLOCK_N], tl.float32)
        norm_sq = tl.zeros([BLOCK_N], tl.float32)
        for s0 in range(0, scored, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_mask = offs_s < scored
            head_sum = tl.zeros([BLOCK_S, BLOCK_N], tl.float32)
            # K tile loaded once per KV head and reused by its GROUP query heads; runtime loops (see query_scores).
            for kv_head in range(0, Q_HEADS // GROUP):
                kt = tl.load(
                    k + kv_head * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None],
                    other=0.0,
                )
                for g in range(GROUP):
                    head = kv_head * GROUP + g
                    # The context log-sum-exp of these rows, merged from all splits at once: one [splits, rows] load
                    # rather than a chain of dependent loads.
                    parts = tl.load(
                        part_lse_ctx + (offs_sp[:, None] * Q_HEADS + head) * rows + offs_s[None, :],
                        mask=sp_mask[:, None] & s_mask[None, :],
                        other=float("-inf"),
                    )
                    m = tl.maximum(tl.max(parts, 0), -1.0e38)
                    total = tl.sum(tl.exp2(parts - m[None, :]), 0)
                    # Rows past the scored ones get lse = +inf, hence probability 0.
                    lse = tl.where(s_mask, m + tl.log2(total), float("inf"))
                    qt = tl.load(
                        q + offs_s[:, None] * stride_qs + head * stride_qh + offs_d[None, :],
                        mask=s_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    )
                    logits = tl.dot(qt, kt, input_precision="ieee") * scale_log2
                    head_sum += tl.exp2(logits - lse[:, None])
            prophet += tl.sum(head_sum, 0)
            norm_sq += tl.sum(head_sum * head_sum, 0)
        # Accumulate in place: this program is the only writer of its keys.
        if HAS_PROPHET:
            tl.store(prophet_out + offs_n, tl.load(prophet_out + offs_n, mask=n_mask) + prophet, mask=n_mask)
        if HAS_NORM:
            norm = tl.sqrt(norm_sq) / Q_HEADS
            tl.store(norm_out + offs_n, tl.load(norm_out + offs_n, mask=n_mask) + norm, mask=n_mask)
    else:
        idx = pid - score_programs
        head = idx % Q_HEADS
        offs_s = (idx // Q_HEADS) * BLOCK_S + tl.arange(0, BLOCK_S)
        s_mask = offs_s < rows
        # Weighted mean of the split outputs, weights exp2(lse_split - lse). The final lse first, from one
        # [splits, rows] load; then the loop's loads do not depend on each other. A split that saw no key has lse
        # -inf (weight 0, output 0); a row that saw no key at all ends 0 / 0 = NaN, as the reference does.
        parts = tl.load(
            part_lse + (offs_sp[:, None] * Q_HEADS + head) * rows + offs_s[None, :],
            mask=sp_mask[:, None] & s_mask[None, :],
            other=float("-inf"),
        )
        m = tl.maximum(tl.max(parts, 0), -1.0e38)
        lse = m + tl.log2(tl.sum(tl.exp2(parts - m[None, :]), 0))
        acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for split in range(0, splits):
            part = tl.load(part_lse + (split * Q_HEADS + head) * rows + offs_s, mask=s_mask, other=float("-inf"))
            o = tl.load(
                part_out + ((split * rows + offs_s[:, None]) * Q_HEADS + head) * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            acc += tl.exp2(part - lse)[:, None] * o
        tl.store(
            out + offs_s[:, None] * stride_os + head * stride_oh + offs_d[None, :],
            acc.to(out.dtype.element_ty),
            mask=s_mask[:, None] & d_mask[None, :],
        )


def stage1_attention_triton(
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
) -> torch.Tensor:
    """Triton version of `stage1_attention_ref`, same contract; two launches, no host synchronisation."""
    (rows, q_heads, dim), (keys, kv_heads) = q.shape, k.shape[:2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    for acc in (prophet_out, norm_out):
        if acc is not None and (acc.dtype != torch.float32 or acc.stride(0) != 1 or acc.shape[0] < context_end):
            raise ValueError("stage1_attention accumulators must be contiguous fp32 `[>= context_end]` tensors.")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    group = q_heads // kv_heads
    block_d = max(16, next_pow2(dim))
    block_m, block_n = min(64, max(16, next_pow2(rows * group))), 64
    block_s = min(64, max(16, next_pow2(rows)))

    # Split the keys so that (row blocks x KV heads x splits) fills the GPU about twice over: Stage I has few rows.
    row_programs = cdiv(rows * group, block_m) * kv_heads
    key_blocks = cdiv(keys, block_n)
    splits = max(1, min(key_blocks, cdiv(2 * num_sms(q.device), row_programs)))
    keys_per_split = cdiv(key_blocks, splits) * block_n
    splits = cdiv(keys, keys_per_split)

    f32 = dict(device=q.device, dtype=torch.float32)
    part_out = torch.empty(splits, rows, q_heads, dim, **f32)
    part_lse = torch.empty(splits, q_heads, rows, **f32)
    part_lse_ctx = torch.empty(splits, q_heads, rows, **f32)
    has_bounds = bounds is not None
    bounds_arg = bounds if has_bounds else part_lse  # never dereferenced when HAS_BOUNDS is False
    scale_log2 = scale * LOG2E
    common = dict(Q_HEADS=q_heads, GROUP=group, HEAD_DIM=dim, HAS_BOUNDS=has_bounds, BLOCK_N=block_n, BLOCK_D=block_d)

    lazy_jit(_attention_kernel)[(cdiv(rows * group, block_m), kv_heads, splits)](
        q,
        k,
        v,
        q_pos,
        k_pos,
        part_out,
        part_lse,
        part_lse_ctx,
        bounds_arg,
        rows,
        keys,
        context_end,
        keys_per_split,
        *q.stride()[:2],
        *k.stride()[:2],
        *v.stride()[:2],
        scale_log2,
        BLOCK_M=block_m,
        **common,
        num_warps=4,
        num_stages=2,
    )
    scoring = context_end > 0 and (prophet_out is not None or norm_out is not None)
    score_programs = cdiv(context_end, block_n) if scoring else 0
    dummy = part_lse  # stands in for an absent accumulator; never dereferenced (HAS_* is False)
    lazy_jit(_scores_combine_kernel)[(score_programs + cdiv(rows, block_s) * q_heads,)](
        q,
        k,
        part_out,
        part_lse,
        part_lse_ctx,
        out,
        dummy if prophet_out is None else prophet_out,
        dummy if norm_out is None else norm_out,
        bounds_arg,
        rows,
        rows,
        context_end,
        splits,
        score_programs,
        *q.stride()[:2],
        *k.stride()[:2],
        *out.stride()[:2],
        scale_log2,
        HAS_PROPHET=prophet_out is not None,
        HAS_NORM=norm_out is not None,
        BLOCK_S=block_s,
        BLOCK_SPLITS=next_pow2(splits),
        **common,
        num_warps=4,
        num_stages=2,
    )
    return out
