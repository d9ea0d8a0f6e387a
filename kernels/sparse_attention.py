"""Attention for a set of query rows at arbitrary positions over the whole stitched K/V, with the exact mask.

A query at position p sees exactly the keys at positions <= p, never later ones, whatever the row order. (CacheBlend
and LMCache use a bottom-right aligned causal mask here, which lets recomputed tokens see later tokens.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .triton_util import LOG2E, lazy_jit, next_pow2

tl = None  # triton.language, bound by lazy_jit at the first launch (see triton_util)


_QUERY_BLOCK = 256
"""Rows per attention call of the torch path when blocks are fixed (off the CPU flash kernel, or `block_rows` given).
256 was fastest on a 2-core CPU for ProphetKV's rows at 4K tokens (0.18 s against 0.26 s at 64)."""


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
"""SDPA's CPU flash kernel, which also returns each row's log-sum-exp (torch >= 2.3; None where a build lacks it: the
torch path then masks every block whole)."""


_FLASH_SPLITS = ((768, 256, 1.0), (192, 64, 1.3), (0, 32, 1.7))
"""The CPU flash kernel's query split for a call of at least this many (head-folded) rows, and the relative cost of
one split row against one key per thread there: it runs `kv_heads x ceil(rows / split)` tasks over the threads, and a
larger split reads every key for more rows. Measured on a 2-core CPU, fp32, head_dim 64 (2.03, 2.65 and 3.45 ns)."""
_MASKED = 1.15
"""Cost of a key under an additive mask against one without (10.3 against 9.3 ns a row-key at 512 rows)."""
_CALL = 10_000.0
_MERGE = 30.0
"""Fixed cost of one flash call, and of merging two calls' outputs by log-sum-exp per head-folded row per KV head,
in the units of `_FLASH_SPLITS` (20 us; 0.28 ms for 768 rows and 3 KV heads)."""
_BLOCK = 30_000.0
"""Fixed cost of a block: gathering its rows' queries, scattering their outputs, the Python between (60 us)."""


@dataclass(frozen=True)
class _Block:
    rows: slice | torch.Tensor
    """The block's rows: a slice when the rows are already in position order, else their indices."""
    keys: int
    """The block attends over keys `[:keys]`."""
    shared: int
    """Keys `[:shared]` are visible to every row of the block: attended without a mask (0 when keys are not in
    position order, off the CPU, or when one call over all keys costs less)."""
    mask: torch.Tensor | None
    """Additive `[group * rows, keys - shared]` mask of keys `[shared:keys]` (0 where visible, -inf where not), or
    None when every row sees all of them."""


@dataclass(frozen=True)
class AttentionPlan:
    """How `sparse_attention_torch` attends a fixed set of rows over fixed keys.

    Positions do not change between layers, so the blocks, their key ranges and their masks are worked out once per
    forward pass and reused by every layer.
    """

    causal: bool
    """Rows are every key, in order at positions `0..N-1`: one plain causal attention."""
    group: int = 1
    """Query heads per KV head that the masks were laid out for."""
    blocks: tuple[_Block, ...] = ()


def plan_attention(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype, group: int = 1,
                   kv_heads: int = 1, block_rows: int | None = None) -> AttentionPlan:
    """The plan for rows at `q_pos` `[rows]` over keys at `k_pos` `[keys]`, masks in `dtype` (the queries'),
    for `group` query heads per each of `kv_heads` KV heads: blocks of `block_rows` rows when given, else the
    partition `_partition` estimates cheapest (fixed blocks of `_QUERY_BLOCK` off the CPU flash kernel)."""
    rows, keys = q_pos.numel(), k_pos.numel()
    if rows == keys and torch.equal(q_pos, k_pos) and torch.equal(k_pos, torch.arange(keys, device=k_pos.device)):
        return AttentionPlan(causal=True, group=group)
    keys_sorted = keys < 2 or bool((k_pos[1:] >= k_pos[:-1]).all())
    rows_sorted = rows < 2 or bool((q_pos[1:] >= q_pos[:-1]).all())
    order = None if rows_sorted else torch.argsort(q_pos, stable=True)
    sorted_pos = q_pos if order is None else q_pos[order]
    # The split into shared keys and a masked rest needs the CPU flash kernel's log-sum-exp.
    split = keys_sorted and q_pos.device.type == "cpu" and _CPU_FLASH is not None
    if block_rows is None and split:
        bounds = _partition(sorted_pos.tolist(), k_pos, group, kv_heads)
    else:
        step = block_rows or _QUERY_BLOCK
        bounds = [(start, min(start + step, rows), split) for start in range(0, rows, step)]
    blocks = []
    for start, end, split_block in bounds:
        selection = slice(start, end) if order is None else order[start:end]
        pos = sorted_pos[start:end]
        # With keys sorted by position, a block of rows only needs the keys up to its last position, and every row
        # sees the keys before its first one: all but the last of them can be shared, so that each row also sees a
        # key of the masked rest (a row that saw none would have no log-sum-exp to merge).
        n = int(torch.searchsorted(k_pos, pos[-1], right=True)) if keys_sorted else keys
        # (split blocks have sorted keys: the first row misses a key only if the last one is after it)
        needs_mask = split_block and n > 0 and bool(pos[0] < k_pos[n - 1])
        shared = max(int(torch.searchsorted(k_pos, pos[0], right=False)) - 1, 0) if needs_mask else 0
        visible = k_pos[None, shared:n] <= pos[:, None]
        mask = None
        if not bool(visible.all()):
            mask = torch.zeros(visible.shape, dtype=dtype, device=q_pos.device).masked_fill_(~visible, float("-inf"))
            mask = mask.repeat(group, 1)  # the rows of every query head of a group (see sparse_attention_torch)
        blocks.append(_Block(selection, n, shared, mask))
    return AttentionPlan(causal=False, group=group, blocks=tuple(blocks))


def _partition(pos: list[int], k_pos: torch.Tensor, group: int, kv_heads: int,
               max_rows: int = 1536) -> list[tuple[int, int, bool]]:
    """`(start, end, split)` blocks of the rows at sorted positions `pos` (keys sorted too) that minimise the flash
    kernel's estimated cost (`_FLASH_SPLITS`): each block attends the keys up to its last row, split or not into
    shared keys and a masked rest. Blocks start at multiples of a quantum of rows (at most ~97 candidates, so the
    search takes about 10 ms of Python once per pass, at 866 rows as at 3,300).

    Rows spread over the context want small blocks (a block's masked rest spans from its first row to its last);
    rows crowded near the question want large ones, sized so that the kernel's tasks fill its threads. On
    ProphetKV's rows at 4K tokens: 45.8 -> 40.6 ms a layer against fixed blocks of 256 (benchmarks/RESULTS.md,
    "Attention blocks chosen by estimated cost").
    """
    rows = len(pos)
    quantum = max(8, -(-rows // 96))
    if rows <= quantum:  # one block, nothing to search (a decode step's row): split only where a mask is needed
        return [(0, rows, True)] if rows else []
    threads = max(torch.get_num_threads(), 1)
    at = torch.tensor(pos, dtype=k_pos.dtype, device=k_pos.device)
    before = torch.searchsorted(k_pos, at, right=False).tolist()
    upto = torch.searchsorted(k_pos, at, right=True)
    # The position of the last key a block ending at each row attends: its first row needs a mask if it is earlier.
    last_key = k_pos[(upto - 1).clamp(min=0)].tolist()
    upto = upto.tolist()
    marks = [*range(0, rows, quantum), rows]
    best: list[float] = [0.0] + [math.inf] * (len(marks) - 1)
    choice: list[tuple[int, bool]] = [(0, False)] * len(marks)
    for b in range(1, len(marks)):
        end = marks[b]
        for a in range(b - 1, -1, -1):
            start = marks[a]
            if end - start > max_rows:
                break
            folded, n = (end - start) * group, upto[end - 1]
            masked = n > 0 and pos[start] < last_key[end - 1]
            cost, split = _call_cost(folded, n, kv_heads, threads, masked), False
            shared = before[start] - 1
            if masked and shared > 0:
                halves = (_call_cost(folded, shared, kv_heads, threads, False)
                          + _call_cost(folded, n - shared, kv_heads, threads, True) + _MERGE * folded * kv_heads)
                cost, split = min((cost, False), (halves, True))
            if best[a] + _BLOCK + cost < best[b]:
                best[b], choice[b] = best[a] + _BLOCK + cost, (a, split)
    bounds = []
    b = len(marks) - 1
    while b:
        a, split = choice[b]
        bounds.append((marks[a], marks[b], split))
        b = a
    return bounds[::-1]


def _call_cost(folded: int, keys: int, kv_heads: int, threads: int, masked: bool) -> float:
    """Estimated cost of one flash call of `folded` rows over `keys` keys (see `_FLASH_SPLITS`)."""
    split, unit = next((split, unit) for least, split, unit in _FLASH_SPLITS if folded >= least)
    tasks = kv_heads * -(-folded // split)
    return -(-tasks // threads) * min(split, folded) * keys * unit * (_MASKED if masked else 1.0) + _CALL


def sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Masked attention output, the definition: every row over every key it may see (k_pos <= q_pos), one call.

    q: `[rows, q_heads, head_dim]`; k, v: `[keys, kv_heads, head_dim]`; q_pos: `[rows]`; k_pos: `[keys]` (integers).
    Returns `[rows, q_heads, head_dim]` in q's dtype. Every row must see at least one key.
    """
    group = q.shape[1] // k.shape[1]
    visible = k_pos[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(group, dim=1).transpose(0, 1),
                                         v.repeat_interleave(group, dim=1).transpose(0, 1), attn_mask=visible,
                                         scale=scale)
    return out.transpose(0, 1).contiguous()


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """`sparse_attention_ref`'s contract in blocks of rows (`plan`, made here when not given:
    `plan_attention(q_pos, k_pos, q.dtype, group, kv_heads)`).

    A block attends only over the keys up to its last row's position. On the CPU, the keys before its first row's
    position, which every row sees, are attended without a mask and the rest with one, the two merged by their
    log-sum-exp: a selective forward's rows crowd near the question, so most of a block's keys are shared, and a mask
    made one call 14% slower (10.5 against 9.2 ms). ProphetKV's 866 rows over 4,291 keys, SmolLM2's heads, 2-core
    CPU: 50.1 -> 46.9 ms a layer (benchmarks/RESULTS.md, "The prefill's last layer for one row").
    """
    rows, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    plan = plan or plan_attention(q_pos, k_pos, q.dtype, group, kv_heads)
    assert plan.group == group, f"plan made for {plan.group} query heads per KV head, attention has {group}"
    # [1, heads, tokens, head_dim] views: SDPA reads them strided, with the same result bit for bit as from a
    # head-major copy, and the copy is what a few rows over many keys pay for (one decode row over 4K keys: 2.1 ms
    # with it, 0.29 ms without; benchmarks/RESULTS.md, "Worker processes").
    kt, vt = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if plan.causal:
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kt, vt, is_causal=True, scale=scale,
                                             enable_gqa=True)
        return out[0].transpose(0, 1).contiguous()
    out = torch.empty_like(q)
    for block in plan.blocks:
        # The query heads sharing a KV head become rows of one head (head h = kv * group + g, as transformers'
        # repeat_kv), so every key is read once per KV head: ~20% faster than SDPA's enable_gqa on CPU.
        qb = q[block.rows].unflatten(1, (kv_heads, group)).permute(1, 2, 0, 3).reshape(1, kv_heads, -1, dim)
        rest_k, rest_v = kt[:, :, block.shared : block.keys], vt[:, :, block.shared : block.keys]
        if block.shared == 0:
            ob = F.scaled_dot_product_attention(qb, rest_k, rest_v, attn_mask=block.mask, scale=scale)
        else:
            ob = _merged(_flash(qb, kt[:, :, : block.shared], vt[:, :, : block.shared], None, scale),
                         _flash(qb, rest_k, rest_v, block.mask, scale)).to(q.dtype)
        out[block.rows] = ob.view(kv_heads, group, -1, dim).permute(2, 0, 1, 3).reshape(-1, q_heads, dim)
    return out


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The output `[1, H, R, D]` and each row's log-sum-exp of its logits `[1, H, R]` fp32 (`_CPU_FLASH`)."""
    out, lse = _CPU_FLASH(q, k, v, attn_mask=mask, scale=scale)
    return out, lse


def _merged(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention output over two disjoint key sets, from each set's output and log-sum-exp (fp32)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a.float() * torch.exp(lse_a - lse)[..., None] + out_b.float() * torch.exp(lse_b - lse)[..., None]


def _sparse_attention_kernel(
    q,
    k,
    v,
    out,
    q_pos,
    k_pos,
    order,
    key_end,
    rows,
    stride_qr,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_or,
    stride_oh,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Flash-attention forward for `BLOCK_M` rows (taken in position order) of one query head, mask k_pos <= q_pos.

    q, out `[R, Hq, D]`; k, v `[N, Hkv, D]`; order `[R]` row indices sorted by position; key_end `[cdiv(R, BLOCK_M)]`
    keys each row block must scan. Grid `(cdiv(R, BLOCK_M), Hq)`.
    """
    # Latest positions (the longest key ranges) first, so the short blocks fill the tail of the launch.
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask, d_mask = offs_m < rows, offs_d < HEAD_DIM

    # Gather this block's rows through the permutation. Padded rows alias row 0 (zero queries, never stored).
    idx = tl.load(order + offs_m, mask=m_mask, other=0)
    pos = tl.load(q_pos + idx)
    qt = tl.load(
        q + idx[:, None] * stride_qr + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    k_head = k + (head // GROUP) * stride_kh
    v_head = v + (head // GROUP) * stride_vh

    # Online softmax in fp32, base 2. m starts finite so that a block with no visible key for a row (possible when
    # k_pos is unsorted) gives p = 0 and alpha = 1 instead of NaN.
    m = tl.full([BLOCK_M], -1.0e38, tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.load(key_end + block)
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        kt = tl.load(
            k_head + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0
        )
        vt = tl.load(
            v_head + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
        )
        kp = tl.load(k_pos + offs_n, mask=n_mask, other=0)
        # The exact mask, always applied: sortedness only shortens `end`, it is never assumed inside a block.
        visible = (kp[None, :] <= pos[:, None]) & n_mask[None, :]
        logits = tl.where(visible, tl.dot(qt, kt, input_precision="ieee") * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(logits - m_new[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        m = m_new

    # A row with no visible key at all divides 0 by 0 and reads NaN, as the reference does.
    tl.store(
        out + idx[:, None] * stride_or + head * stride_oh + offs_d[None, :],
        (acc / row_sum[:, None]).to(out.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton version of `sparse_attention_ref`, same contract; no host synchronisation."""
    (rows, q_heads, dim), (keys, kv_heads) = q.shape, k.shape[:2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    k_pos = k_pos.contiguous()
    # Two warpgroups on 128 rows when there are enough rows; one on 64 otherwise. Both fit sm_90 without spills at
    # D=128 (checked with ptxas), and two stages keep shared memory under 100 KiB.
    block_m = 128 if rows > 64 else 64
    block_n, block_d = 64, max(16, next_pow2(dim))

    # Rows in position order: each block then has a tight maximum position. With k_pos ascending (the usual stitched
    # layout) a block scans only the keys up to searchsorted(k_pos, its max position); otherwise all keys. Decided on
    # the device, without a sync.
    q_pos = q_pos.to(k_pos.dtype).contiguous()
    order = torch.argsort(q_pos, stable=True)
    last_row = torch.arange(block_m - 1, rows + block_m - 1, block_m, device=q.device).clamp_(max=rows - 1)
    block_max = q_pos[order[last_row]]
    key_end = torch.searchsorted(k_pos, block_max, right=True)
    if keys > 1:
        key_end = torch.where((k_pos[1:] >= k_pos[:-1]).all(), key_end, keys)
    key_end = key_end.to(torch.int32)

    lazy_jit(_sparse_attention_kernel)[(len(last_row), q_heads)](
        q,
        k,
        v,
        out,
        q_pos,
        k_pos,
        order,
        key_end,
        rows,
        *q.stride()[:2],
        *k.stride()[:2],
        *v.stride()[:2],
        *out.stride()[:2],
        scale * LOG2E,
        GROUP=q_heads // kv_heads,
        HEAD_DIM=dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=block_m // 16,
        num_stages=2,
    )
    return out
