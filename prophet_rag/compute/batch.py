"""One decode step of N requests in one forward pass: the step continuous batching repeats.

Request i has its own `StitchedCache` `caches[i]` (its own length, positions and capacity) and its last token
`tokens[i]`. The step appends each token to its request's cache, then runs every layer once for all N rows:

- embedding, norms, the Q/K/V, O and MLP projections and the LM head over hidden `[N, hidden]` (q `[N, Hq, D]`,
  k and v `[N, Hkv, D]`): the weights are read once per step instead of once per request, which is what a decode
  step on its own is bound by;
- each row's fresh K/V written into its own cache at its new slot, and attention per request: row i over its cache's
  first `length` slots (`[length, Hkv, D]`, exact position mask), with `kernels.sparse_attention` as
  `stitched.forward_rows` runs it for one request.

So a row's attention is what `generate.decode_one` computes for that request alone, and its projections are the
same products over a taller matrix. `benchmarks/spike_batched_decode.py` measured this step at N=8 against eight
one-row steps on the embedded SmolLM2-135M (CPU, 2 threads): 3.6-4.2x the tokens per second, the same greedy tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.stitched import StitchedCache
from prophet_rag.kernels import attention_plan, sparse_attention


@torch.inference_mode()
def decode_step(adapter: ModelAdapter, caches: Sequence[StitchedCache], tokens: Sequence[int]) -> torch.Tensor:
    """Append `tokens[i]` to `caches[i]` and run all of them through every layer; `[N, vocab]` fp32 logits, row i
    being request i's next-token logits."""
    assert len(caches) == len(tokens) and caches, "one token per cache, at least one request"
    ids = torch.tensor(list(tokens), device=adapter.device)
    slots = [cache.append_tokens(ids[i : i + 1]) for i, cache in enumerate(caches)]
    row_pos = [cache.positions[slot] for cache, slot in zip(caches, slots, strict=True)]
    hidden = adapter.embed(ids)
    rope = adapter.rope_tables(torch.cat(row_pos), hidden.dtype)
    group = adapter.spec.num_heads // adapter.spec.num_kv_heads
    # Each request's keys and positions are the same in every layer: its attention plan is worked out once.
    plans = [attention_plan(pos, cache.positions[: cache.length], hidden.dtype, group)
             for cache, pos in zip(caches, row_pos, strict=True)]
    for layer in range(adapter.spec.num_layers):
        q, k, v = adapter.qkv(layer, hidden, rope)
        outs = []
        for i, cache in enumerate(caches):
            if cache.layer_ready is not None:
                cache.layer_ready(layer)
            cache.kv[layer, 0, slots[i]], cache.kv[layer, 1, slots[i]] = k[i : i + 1], v[i : i + 1]
            n = cache.length
            outs.append(sparse_attention(q[i : i + 1], cache.kv[layer, 0, :n], cache.kv[layer, 1, :n], row_pos[i],
                                         cache.positions[:n], adapter.scale, plans[i]))
        hidden = adapter.finish_layer(layer, hidden, torch.cat(outs))
    return adapter.logits(hidden)
