"""ProphetKV's Stage I on the fused kernel: the question's pass over the reused cache, scoring as it goes.

`selectors.query_relevance` runs the suffix through `stitched.forward_rows` with a hook, so every scoring layer
launches `query_scores` (two passes over the context keys) and then `sparse_attention` (a third), on the same q.
`stage1_forward` is that pass with one `stage1_attention` call per scoring layer instead: same K/V writes, same
scores, same hidden states (bit-identical on the torch backend, which runs the same two reference ops).

How it slots into today's code: `query_relevance(adapter, cache, suffix_rows, kind, layers)` is
`stage1_forward(adapter, cache, suffix_rows, kind, layers)[0]`; equivalently, `forward_rows` would take the score
accumulators instead of a hook and call `stage1_attention(..., cache.context_end, prophet, norm)` in place of
`sparse_attention` on the scoring layers.
"""

from __future__ import annotations

import torch

from prophet_rag.kernels import sparse_attention, stage1_attention
from prophet_rag.model_adapter import ModelAdapter
from prophet_rag.stitched import StitchedCache


@torch.inference_mode()
def stage1_forward(
    adapter: ModelAdapter, cache: StitchedCache, suffix_rows: torch.Tensor, kind: str, layers: tuple[int, ...] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the suffix rows (slots `[S]`, after the context) through the layers up to the last scoring layer.

    kind "prophet" or "infoflow" and `layers` (None: all) as in `query_relevance`. Writes the rows' K/V into the
    cache. Returns (`[C]` fp32 scores of the chunk slots, `[S, hidden]` hidden states after the last scoring layer).
    """
    end, n = cache.context_end, cache.length
    scores = torch.zeros(end, dtype=torch.float32, device=cache.kv.device)
    prophet, norm = (scores, None) if kind == "prophet" else (None, scores)
    wanted = set(range(adapter.spec.num_layers)) if layers is None else set(layers)
    keys_k, keys_v, positions = cache.kv[:, 0, :n], cache.kv[:, 1, :n], cache.positions[:n]
    hidden = adapter.embed(cache.token_ids[suffix_rows])
    row_pos = positions[suffix_rows]
    for layer in range(max(wanted) + 1):
        q, k, v = adapter.qkv(layer, hidden, row_pos)
        cache.kv[layer, 0, suffix_rows], cache.kv[layer, 1, suffix_rows] = k, v
        if layer in wanted:
            out = stage1_attention(q, keys_k[layer], keys_v[layer], row_pos, positions, adapter.scale, end, prophet,
                                   norm)
        else:
            out = sparse_attention(q, keys_k[layer], keys_v[layer], row_pos, positions, adapter.scale)
        hidden = adapter.finish_layer(layer, hidden, out)
    return scores[cache.prefix_len :], hidden
