"""Re-position cached keys: rotate K in place from the positions it was computed at to new positions.

RoPE rotates each pair of channels by `position * inv_freq`, so moving a key from position p to p + delta is one more
rotation by `delta * inv_freq`, done in fp32 whatever the storage dtype. Layouts: `half` pairs channel i with
i + D/2 (Llama, Mistral, Qwen in transformers); `interleaved` pairs 2i with 2i + 1 (GPT-J style).
"""

from __future__ import annotations

import torch

from .triton_util import lazy_jit, next_pow2

tl = None  # triton.language, bound by lazy_jit at the first launch (see triton_util)


def _complex_view_ok(keys: torch.Tensor) -> bool:
    """Whether `torch.view_as_complex` can view `keys`' channel pairs (pairs contiguous, every stride even)."""
    return keys.stride(-1) == 1 and keys.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in keys.stride()[:-1])


def rope_shift_ref(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool = False,
                   source: torch.Tensor | None = None) -> None:
    """Rotate `keys` in place by `delta` positions; with `source`, write `source` rotated into `keys` instead.

    keys: `[..., tokens, kv_heads, head_dim]`, any float dtype, any strides.
    delta: `[tokens]` integer, new position minus stored position.
    inv_freq: `[head_dim // 2]` fp32, the model's RoPE inverse frequencies (after any scaling).
    source: None, or a tensor of `keys`' shape and dtype not overlapping it: the keys to rotate, so that moving
    keys and re-positioning them is one pass over their bytes (`keys`' own values are not read).
    """
    src = keys if source is None else source
    assert src.shape == keys.shape and src.dtype == keys.dtype, "source must match keys' shape and dtype"
    half = keys.shape[-1] // 2
    angle = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    if interleaved:
        # Each channel pair is a complex number, rotated by multiplying with e^(i * angle).
        phase = torch.polar(torch.ones_like(angle), angle)[:, None, :]
        if keys.dtype == torch.float32 and _complex_view_ok(keys) and _complex_view_ok(src):
            out = torch.view_as_complex(keys.unflatten(-1, (half, 2)))  # one pass, in place
            if source is None:
                out.mul_(phase)
            else:
                torch.mul(torch.view_as_complex(src.unflatten(-1, (half, 2))), phase, out=out)
            return
        # Other dtypes and layouts: in a contiguous fp32 copy, written back in one cast. The pairs as strided
        # halves cost 3x more on a 2-core CPU (bf16 SmolLM2, 4,291 tokens, every layer: 0.149 -> 0.046 s,
        # `bench_ttft.py --dtype bf16`'s re-rotation).
        k = torch.empty(src.shape, dtype=torch.float32, device=src.device).copy_(src)
        torch.view_as_complex(k.unflatten(-1, (half, 2))).mul_(phase)
        keys.copy_(k)
        return
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    k = src.to(torch.float32)
    x1, x2 = k[..., :half], k[..., half:]
    keys.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def _rope_shift_kernel(
    keys,
    delta,
    inv_freq,
    tokens,
    heads,
    stride_b,
    stride_t,
    stride_h,
    stride_d,
    HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate one `[BLOCK_T, heads, head_dim]` tile of `keys[b]` (`[lead, tokens, heads, head_dim]`), in place.

    Grid `(cdiv(tokens, BLOCK_T), lead)`; delta `[tokens]` integer; inv_freq `[HALF]` fp32.
    """
    pid_t, pid_b = tl.program_id(0), tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    t_mask, i_mask = offs_t < tokens, offs_i < HALF

    # Angles once per (token, pair), shared by every head of the tile: the trigonometry is amortised over the heads
    # and the kernel stays memory bound. Same fp32 product as the reference; tl.cos/tl.sin are the accurate libdevice
    # functions (range-reduced), which matters for angles of tens of thousands of radians.
    d = tl.load(delta + offs_t, mask=t_mask, other=0).to(tl.float32)
    f = tl.load(inv_freq + offs_i, mask=i_mask, other=0.0)
    angle = d[:, None] * f[None, :]
    cos, sin = tl.cos(angle)[:, None, :], tl.sin(angle)[:, None, :]

    row = keys + pid_b.to(tl.int64) * stride_b + offs_t[:, None, None] * stride_t + offs_h[None, :, None] * stride_h
    th_mask = t_mask[:, None, None] & (offs_h < heads)[None, :, None]
    out_ty = keys.dtype.element_ty
    # Rotate in fp32 and store in the storage dtype (round to nearest even, like the reference's copy_). The int64
    # leading offset above: a whole `[L, 2, T, H, D]` cache can exceed 2**31 elements.
    if INTERLEAVED:
        # Pairs (2i, 2i + 1): load whole rows (vectorised), pair the channels in registers.
        offs_c = tl.arange(0, 2 * BLOCK_HALF)
        ptrs, mask = row + offs_c[None, None, :] * stride_d, th_mask & (offs_c < 2 * HALF)[None, None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, BLOCK_HALF, 2]))
        r = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        tl.store(ptrs, tl.reshape(r, [BLOCK_T, BLOCK_H, 2 * BLOCK_HALF]).to(out_ty), mask=mask)
    else:
        # Pairs (i, i + D/2): two contiguous half rows.
        p1, p2 = row + offs_i[None, None, :] * stride_d, row + (offs_i + HALF)[None, None, :] * stride_d
        mask = th_mask & i_mask[None, None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
        tl.store(p2, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


def rope_shift_triton(
    keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool = False,
    source: torch.Tensor | None = None,
) -> None:
    """Triton version of `rope_shift_ref`, same contract (keys `[..., tokens, kv_heads, head_dim]`, any strides).
    With `source` the keys are copied in first and rotated in place: two passes, where the reference makes one."""
    if source is not None:
        keys.copy_(source)
    if keys.dim() > 4:
        try:
            keys = keys.view(-1, *keys.shape[-3:])
        except RuntimeError:  # Leading dims with no common stride (a slice of an inner one): one launch per index.
            for sub in keys.unbind(0):
                rope_shift_triton(sub, delta, inv_freq, interleaved)
            return
    k4 = keys if keys.dim() == 4 else keys.unsqueeze(0)
    lead, tokens, heads, dim = k4.shape
    if k4.numel() == 0:
        return
    block_half, block_h = next_pow2(dim // 2), next_pow2(heads)
    # About 2K pairs (8 KiB of fp16 keys) per 4-warp program: ~115 registers and no spills on sm_90 (ptxas), so
    # four programs per SM keep ~32 KiB of loads in flight.
    block_t = max(1, min(next_pow2(tokens), 2048 // (block_h * block_half)))
    lazy_jit(_rope_shift_kernel)[(-(-tokens // block_t), lead)](
        k4,
        delta.contiguous(),
        inv_freq.to(torch.float32).contiguous(),
        tokens,
        heads,
        *k4.stride(),
        HALF=dim // 2,
        INTERLEAVED=interleaved,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=4,
    )
