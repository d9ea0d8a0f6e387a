"""sparse_attention_triton and sparse_attention_torch against sparse_attention_ref: unsorted rows, key orders, GQA,
stitched layouts."""

from __future__ import annotations

import importlib

import pytest
import torch

from prophet_rag.kernels import sparse_attention, use_backend
from prophet_rag.kernels.sparse_attention import (
    plan_attention,
    sparse_attention_ref,
    sparse_attention_torch,
    sparse_attention_triton,
)

CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes run only on CUDA (slow interpreter)")
# The interpreter multiplies bf16 operands of tl.dot as raw uint16 bits (triton 3.9), so bf16 is checked on CUDA only.
BF16_CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="interpreter tl.dot mishandles bf16")


def positions(kind: str, rows: int, keys: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos `[rows]`, k_pos `[keys]`) for a layout.

    stitched: keys are three chunks at ascending positions with gaps; rows are a random, unsorted subset of the keys
    (the recomputed tokens). unsorted-keys: the same but keys shuffled. descending-keys: keys in reverse order and
    rows from the first half (a kernel that assumed ascending keys would cut every row off). prefill: every key is a
    row, in order.
    """
    if kind == "prefill":
        assert rows == keys
        return torch.arange(keys), torch.arange(keys)
    if kind == "descending-keys":
        return torch.randperm(keys // 2, generator=gen)[:rows], torch.arange(keys).flip(0)
    lengths = torch.tensor([keys // 3, keys // 2, keys - keys // 3 - keys // 2])
    gaps = torch.tensor([0, 7, 100])
    starts = torch.cumsum(lengths + gaps, 0) - lengths
    k_pos = torch.cat([torch.arange(int(s), int(s + n)) for s, n in zip(starts, lengths, strict=True)])
    q_pos = k_pos[torch.randperm(keys, generator=gen)[:rows]]
    if kind == "unsorted-keys":
        k_pos = k_pos[torch.randperm(keys, generator=gen)]
    return q_pos, k_pos


SHAPES = [  # (layout, rows, q heads, kv heads, keys, head dim); row tiles are 64 (rows <= 64) or 128
    pytest.param("stitched", 37, 2, 2, 500, 64, id="stitched-R37-G1-N500-D64"),
    pytest.param("unsorted-keys", 10, 3, 1, 63, 16, id="unsortedk-R10-G3-N63-D16"),
    pytest.param("stitched", 130, 4, 1, 200, 128, id="stitched-R130-G4-N200-D128"),
    pytest.param("unsorted-keys", 100, 4, 1, 150, 16, id="unsortedk-R100-G4-N150-D16"),
    pytest.param("descending-keys", 20, 2, 1, 100, 16, id="descendingk-R20-G2-N100-D16"),
    pytest.param("prefill", 63, 3, 1, 63, 64, id="prefill-R63-G3-N63-D64"),
    pytest.param("stitched", 3277, 32, 8, 16384, 128, id="stitched-R3277-G4-N16K-D128", marks=CUDA_ONLY),
    pytest.param("unsorted-keys", 700, 8, 8, 3000, 64, id="unsortedk-R700-G1-N3000-D64", marks=CUDA_ONLY),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=BF16_CUDA_ONLY),
]


def make_inputs(layout, rows, q_heads, kv_heads, keys, dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = positions(layout, rows, keys, gen)
    q = torch.randn(rows, q_heads, dim, generator=gen).to(device=device, dtype=dtype)
    kv = torch.randn(keys, 2, kv_heads, dim, generator=gen).to(device=device, dtype=dtype)
    return q, kv[:, 0], kv[:, 1], q_pos.to(device), k_pos.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,rows,q_heads,kv_heads,keys,dim", SHAPES)
def test_matches_reference(layout, rows, q_heads, kv_heads, keys, dim, dtype, device, nan_empty, assert_close):
    q, k, v, q_pos, k_pos = make_inputs(layout, rows, q_heads, kv_heads, keys, dim, dtype, device)
    expected = sparse_attention_ref(q, k, v, q_pos, k_pos, dim**-0.5)
    out = sparse_attention_triton(q, k, v, q_pos, k_pos, dim**-0.5)
    assert out.dtype == q.dtype
    assert_close(out, expected, dtype)


def test_skips_keys_after_the_last_row(device, nan_empty, assert_close):
    """With ascending k_pos, keys past the latest row position are never read: NaN there must not reach the output."""
    q, k, v, q_pos, k_pos = make_inputs("stitched", 40, 2, 1, 300, 32, torch.float32, device, seed=1)
    q_pos = q_pos.clamp(max=int(k_pos[150]))
    expected = sparse_attention_ref(q, k, v, q_pos, k_pos, 0.2)
    v = v.clone()
    v[151:] = float("nan")
    assert_close(sparse_attention_triton(q, k, v, q_pos, k_pos, 0.2), expected, torch.float32)


def test_duplicate_positions_and_int32(device, nan_empty, assert_close):
    """Rows sharing a position and int32 positions (q_pos int32, k_pos int64) behave like the reference."""
    q, k, v, q_pos, k_pos = make_inputs("stitched", 50, 2, 1, 120, 16, torch.float16, device, seed=2)
    q_pos = q_pos[torch.arange(50) % 7].to(torch.int32)
    expected = sparse_attention_ref(q, k, v, q_pos, k_pos, 0.25)
    assert_close(sparse_attention_triton(q, k, v, q_pos, k_pos, 0.25), expected, torch.float16)


def test_no_rows(device):
    q, k, v, _, k_pos = make_inputs("stitched", 0, 2, 1, 30, 16, torch.float16, device)
    out = sparse_attention_triton(q, k, v, torch.zeros(0, dtype=torch.long, device=device), k_pos, 0.25)
    assert out.shape == (0, 2, 16)


def test_dispatch_runs_triton_when_forced(device, monkeypatch, assert_close):
    module = importlib.import_module("prophet_rag.kernels.sparse_attention")  # package attribute = dispatch function
    calls = []
    monkeypatch.setattr(module, "sparse_attention_triton", lambda *a: calls.append(1) or sparse_attention_triton(*a))
    q, k, v, q_pos, k_pos = make_inputs("stitched", 20, 4, 2, 90, 32, torch.float32, device, seed=3)
    expected = sparse_attention_ref(q, k, v, q_pos, k_pos, 0.2)
    with use_backend("triton"):
        out = sparse_attention(q, k, v, q_pos, k_pos, 0.2)
    assert calls == [1]
    assert_close(out, expected, torch.float32)


def naive_attention(q, k, v, q_pos, k_pos, scale):
    """Masked softmax attention spelled out in fp32: the definition the reference must meet."""
    group = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("rhd,nhd->hrn", q.float(), kf) * scale
    logits = logits.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hrn,nhd->rhd", logits.softmax(dim=-1), vf).to(q.dtype)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 256])
@pytest.mark.parametrize("layout", ["stitched", "unsorted-keys", "descending-keys", "sorted-rows"])
def test_reference_and_torch_path_meet_the_definition_for_any_block_size(layout, block_rows):
    gen = torch.Generator().manual_seed(4)
    q_pos, k_pos = positions("stitched" if layout == "sorted-rows" else layout, 45, 120, gen)
    if layout == "sorted-rows":
        q_pos = q_pos.sort().values
    q = torch.randn(45, 4, 16, generator=gen)
    k, v = torch.randn(120, 2, 16, generator=gen), torch.randn(120, 2, 16, generator=gen)
    plan = plan_attention(q_pos, k_pos, q.dtype, group=2, block_rows=block_rows)
    expected = naive_attention(q, k, v, q_pos, k_pos, 0.25)
    torch.testing.assert_close(sparse_attention_ref(q, k, v, q_pos, k_pos, 0.25), expected, atol=1e-5, rtol=1e-5)
    out = sparse_attention_torch(q, k, v, q_pos, k_pos, 0.25, plan)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_plan_is_reused_across_layers():
    """The plan depends on positions only: one plan serves every layer's different q/k/v."""
    gen = torch.Generator().manual_seed(5)
    q_pos, k_pos = positions("stitched", 30, 90, gen)
    plan = plan_attention(q_pos, k_pos, torch.float32, group=2, block_rows=8)
    for _ in range(3):
        q, k, v = torch.randn(30, 2, 8, generator=gen), torch.randn(90, 1, 8, generator=gen), torch.randn(90, 1, 8)
        torch.testing.assert_close(sparse_attention_torch(q, k, v, q_pos, k_pos, 0.3, plan),
                                   naive_attention(q, k, v, q_pos, k_pos, 0.3), atol=1e-5, rtol=1e-5)


def test_prefill_rows_use_one_causal_call():
    assert plan_attention(torch.arange(10), torch.arange(10), torch.float32).causal
    assert not plan_attention(torch.arange(1, 11), torch.arange(1, 11), torch.float32).causal


def test_blocks_that_see_every_key_carry_no_mask():
    plan = plan_attention(torch.tensor([20, 21]), torch.arange(20), torch.float32)
    assert [b.mask for b in plan.blocks] == [None]
    plan = plan_attention(torch.tensor([5, 19]), torch.arange(20), torch.float32)
    assert plan.blocks[0].keys == 20 and plan.blocks[0].mask is not None


def test_a_block_masks_only_the_keys_past_its_first_row():
    """Keys before a block's first row are shared by all its rows (but one, kept so that every row sees a masked
    key); the mask covers the rest only, for each query head of a group."""
    plan = plan_attention(torch.tensor([50, 52, 60]), torch.arange(100), torch.float32, group=2, block_rows=3)
    (block,) = plan.blocks
    assert (block.shared, block.keys) == (49, 61)
    assert block.mask.shape == (2 * 3, 61 - 49)
    assert bool((block.mask[:, : 50 - 49 + 1] == 0).all()) and bool(torch.isinf(block.mask[0, 50 - 49 + 1 :]).all())


def test_unsorted_keys_share_nothing():
    plan = plan_attention(torch.tensor([50, 60]), torch.arange(100).flip(0), torch.float32)
    assert [b.shared for b in plan.blocks] == [0]


CPU_DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, id="bf16"),
]


@pytest.mark.parametrize("dtype,tol", CPU_DTYPES)
@pytest.mark.parametrize("block_rows", [16, 256])
@pytest.mark.parametrize("layout,rows,q_heads,kv_heads,keys,dim", [
    ("stitched", 37, 2, 2, 500, 64), ("stitched", 130, 4, 1, 200, 128), ("stitched", 300, 9, 3, 700, 64),
    ("unsorted-keys", 100, 4, 1, 150, 16), ("descending-keys", 20, 2, 1, 100, 16),
])
def test_torch_path_matches_the_reference_on_the_cpu(layout, rows, q_heads, kv_heads, keys, dim, block_rows, dtype,
                                                      tol):
    q, k, v, q_pos, k_pos = make_inputs(layout, rows, q_heads, kv_heads, keys, dim, dtype, "cpu", seed=6)
    if layout == "stitched":
        q_pos = q_pos.sort().values  # the engine's rows are sorted slots: blocks share their leading keys
    plan = plan_attention(q_pos, k_pos, dtype, q_heads // kv_heads, kv_heads, block_rows)
    assert layout != "stitched" or block_rows > 16 or any(b.shared > 0 for b in plan.blocks)
    out = sparse_attention_torch(q, k, v, q_pos, k_pos, dim**-0.5, plan)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), sparse_attention_ref(q, k, v, q_pos, k_pos, dim**-0.5).float(), atol=tol,
                               rtol=tol)


def test_rows_between_key_positions_still_merge():
    """A row whose position holds no key (keys with gaps) sees the shared keys and the one kept in the masked rest."""
    k_pos = torch.cat([torch.arange(0, 40), torch.arange(60, 100)])
    q_pos = torch.tensor([50, 55, 59, 70, 99])
    gen = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(5, 4, 16, generator=gen), torch.randn(80, 2, 16, generator=gen), torch.randn(80, 2, 16)
    out = sparse_attention_torch(q, k, v, q_pos, k_pos, 0.25)
    torch.testing.assert_close(out, naive_attention(q, k, v, q_pos, k_pos, 0.25), atol=1e-5, rtol=1e-5)


def test_without_the_cpu_flash_kernel_blocks_are_masked_whole(monkeypatch):
    module = importlib.import_module("prophet_rag.kernels.sparse_attention")
    monkeypatch.setattr(module, "_CPU_FLASH", None)
    q, k, v, q_pos, k_pos = make_inputs("stitched", 60, 4, 2, 200, 16, torch.float32, "cpu", seed=8)
    q_pos = q_pos.sort().values
    plan = plan_attention(q_pos, k_pos, q.dtype, 2, block_rows=16)
    assert [b.shared for b in plan.blocks] == [0] * len(plan.blocks)
    torch.testing.assert_close(sparse_attention_torch(q, k, v, q_pos, k_pos, 0.25, plan),
                               naive_attention(q, k, v, q_pos, k_pos, 0.25), atol=1e-5, rtol=1e-5)


def crowded_rows(keys: int, spread: int, crowded: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted row positions as ProphetKV picks them: `spread` rows over the context, `crowded` rows at its end."""
    early = torch.randperm(keys - crowded, generator=gen)[:spread]
    return torch.cat([early.sort().values, torch.arange(keys - crowded, keys)])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("q_heads,kv_heads", [(9, 3), (14, 2), (4, 4)])
def test_the_estimated_partition_meets_the_reference(q_heads, kv_heads, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the partition fills the kernel's threads
    gen = torch.Generator().manual_seed(9)
    q_pos, k_pos = crowded_rows(900, 40, 200, gen), torch.arange(900)
    q = torch.randn(q_pos.numel(), q_heads, 32, generator=gen)
    k, v = torch.randn(900, kv_heads, 32, generator=gen), torch.randn(900, kv_heads, 32, generator=gen)
    plan = plan_attention(q_pos, k_pos, q.dtype, q_heads // kv_heads, kv_heads)
    covered = torch.cat([torch.arange(q_pos.numel())[b.rows] for b in plan.blocks])
    assert torch.equal(covered, torch.arange(q_pos.numel()))
    torch.testing.assert_close(sparse_attention_torch(q, k, v, q_pos, k_pos, 0.2, plan),
                               naive_attention(q, k, v, q_pos, k_pos, 0.2), atol=1e-5, rtol=1e-5)


def test_spread_rows_get_smaller_blocks_than_crowded_ones():
    """A block's masked rest spans from its first row to its last: rows spread from the context's start are cut
    finer than rows crowded at its end, which share almost all their keys and go in large, split calls (on these
    rows 31.7 ms against 35.8 for fixed blocks of 256, `bench_sparse_attention.py --keys 4000`)."""
    gen = torch.Generator().manual_seed(10)
    q_pos = crowded_rows(4000, 120, 600, gen)
    plan = plan_attention(q_pos, torch.arange(4000), torch.float32, group=3, kv_heads=3)
    sizes = [b.rows.stop - b.rows.start for b in plan.blocks]
    assert plan.blocks[0].rows.start == 0 and 4 * sizes[0] <= max(sizes)
    last = plan.blocks[-1]
    assert last.rows.stop == 720 and last.shared > 3000 and last.mask is not None


def test_a_row_that_sees_every_key_is_one_unmasked_call():
    plan = plan_attention(torch.tensor([4000]), torch.arange(4001), torch.float32, group=3, kv_heads=3)
    assert [(b.shared, b.keys, b.mask) for b in plan.blocks] == [(0, 4001, None)]


def test_unsorted_rows_are_partitioned_in_position_order():
    gen = torch.Generator().manual_seed(11)
    q_pos = crowded_rows(600, 30, 150, gen)
    shuffled = q_pos[torch.randperm(q_pos.numel(), generator=gen)]
    plan = plan_attention(shuffled, torch.arange(600), torch.float32, group=2, kv_heads=2)
    for block in plan.blocks:
        assert isinstance(block.rows, torch.Tensor)
        assert bool((shuffled[block.rows][1:] >= shuffled[block.rows][:-1]).all())
    q, k, v = torch.randn(shuffled.numel(), 4, 16, generator=gen), torch.randn(600, 2, 16), torch.randn(600, 2, 16)
    torch.testing.assert_close(sparse_attention_torch(q, k, v, shuffled, torch.arange(600), 0.25, plan),
                               naive_attention(q, k, v, shuffled, torch.arange(600), 0.25), atol=1e-5, rtol=1e-5)
