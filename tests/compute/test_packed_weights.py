"""bf16 projections on a CPU run on weights packed once for oneDNN, with the modules' own results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prophet_rag.compute.model_adapter import ModelAdapter
from tiny import FAMILIES, tiny_model

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch")


def _bf16(family: str):
    return tiny_model(family).to(torch.bfloat16)


def _plain(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


@needs_mkldnn
def test_bf16_on_cpu_packs_and_fp32_does_not():
    assert ModelAdapter(_bf16("llama")).packed_weights
    assert not ModelAdapter(tiny_model("llama")).packed_weights


@needs_mkldnn
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_packed_layer_equals_the_modules_bit_for_bit_on_few_rows(family, rows):
    model = _bf16(family)
    adapter = ModelAdapter(model)
    torch.manual_seed(1)
    hidden = torch.randn(rows, adapter.spec.hidden_size, dtype=torch.bfloat16)
    attn_out = torch.randn(rows, adapter.spec.num_heads, adapter.spec.head_dim, dtype=torch.bfloat16)
    rope = adapter.rope_tables(torch.arange(rows), torch.bfloat16)
    block = adapter.layers[0]
    with torch.inference_mode():
        q, k, v = adapter.qkv(0, hidden, rope)
        h = block.input_layernorm(hidden)
        want_v = _plain(block.self_attn.v_proj, h).view(rows, -1, adapter.spec.head_dim)
        want_k = _plain(block.self_attn.k_proj, h).view(rows, -1, adapter.spec.head_dim)
        if adapter.has_qk_norm:
            want_k = block.self_attn.k_norm(want_k)
        assert torch.equal(v, want_v)
        assert torch.equal(k, adapter.interleave(adapter.rope(want_k, rope)))
        out = adapter.finish_layer(0, hidden, attn_out)
        mid = hidden + _plain(block.self_attn.o_proj, attn_out.flatten(-2))
        want = mid + block.mlp(block.post_attention_layernorm(mid))
        assert torch.equal(out, want)
        logits = adapter.logits(hidden)
        assert torch.equal(logits, model.lm_head(model.model.norm(hidden)).float())
    assert q.shape == (rows, adapter.spec.num_heads, adapter.spec.head_dim)


@needs_mkldnn
def test_packed_layer_stays_within_bf16_rounding_on_many_rows():
    model = _bf16("qwen2")
    adapter = ModelAdapter(model)
    torch.manual_seed(2)
    hidden = torch.randn(300, adapter.spec.hidden_size, dtype=torch.bfloat16)
    attn_out = torch.randn(300, adapter.spec.num_heads, adapter.spec.head_dim, dtype=torch.bfloat16)
    block = adapter.layers[1]
    with torch.inference_mode():
        out = adapter.finish_layer(1, hidden, attn_out)
        mid = hidden + block.self_attn.o_proj(attn_out.flatten(-2))
        want = mid + block.mlp(block.post_attention_layernorm(mid))
    torch.testing.assert_close(out.float(), want.float(), atol=0.05, rtol=0.02)


@needs_mkldnn
def test_packed_projections_keep_leading_dimensions():
    adapter = ModelAdapter(_bf16("llama"))
    hidden = torch.randn(2, 5, adapter.spec.hidden_size, dtype=torch.bfloat16)
    rope = adapter.rope_tables(torch.arange(5).expand(2, 5), torch.bfloat16)
    with torch.inference_mode():
        q, k, v = adapter.qkv(0, hidden, rope)
        flat_q, _, _ = adapter.qkv(0, hidden.reshape(10, -1), adapter.rope_tables(torch.arange(5).repeat(2),
                                                                                  torch.bfloat16))
    assert q.shape == (2, 5, adapter.spec.num_heads, adapter.spec.head_dim)
    assert k.shape == v.shape == (2, 5, adapter.spec.num_kv_heads, adapter.spec.head_dim)
    assert torch.equal(q.reshape(10, *q.shape[2:]), flat_q)
