"""ProphetKV's Stage I on the fused kernel: the question's pass over the reused cache, scoring as it goes.

`selectors.query_relevance` runs the suffix through `stitched.forward_rows` with a hook, so every scoring layer
launches `query_scores` (two passes over the context keys) and then `sparse_attention` (a third), on the same q.
`stage1_forward` is that pass with one `stage1_attention` call per scoring layer instead: same K/V writes, same
scores, same hidden states (bit-identical on the torch backend, which runs the same two reference ops).

How it slots into today's code: `query_relevance(adapter, cache, suffix_rows, kind, layers)` is
`stage1_forward(adapter, cache, suffix_rows, kind, layers)[0]`; equivalently, `forward_rows` would take the score
accumulators instead of a hook and call `stage1_attention(..., cache.context_end, prophet, norm)` in place of
`sparse_attention` on the scoring layers. `run_rows` is that loop with the sizes made explicit, so that
`cuda_graphs` can run it on bucketed shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prophet_rag.kernels import sparse_attention, stage1_attention
from prophet_rag.model_adapter import ModelAdapter
from prophet_rag.stitched import StitchedCache


@dataclass(frozen=True)
class Scoring:
    """What a scoring pass accumulates, and where (see `stage1_attention`)."""

    layers: frozenset[int]
    prophet: torch.Tensor | None
    """`[>= context_end]` fp32 accumulator, or None."""
    norm: torch.Tensor | None
    context_end: int
    """Context slots scored; under graph replay the bucket maximum, the real count being in `bounds`."""
    bounds: torch.Tensor | None = None
    """None, or int32 `[3]` on the device: (rows to score, context_end, keys) (see `stage1_attention`)."""


def run_rows(
    adapter: ModelAdapter,
    cache: StitchedCache,
    rows: torch.Tensor,
    keys: int,
    last_layer: int,
    scoring: Scoring | None = None,
) -> torch.Tensor:
    """Recompute `rows` (slots `[R]`) through layers `0..last_layer` over the cache's first `keys` slots.

    Writes the rows' K/V into the cache; on `scoring.layers` also accumulates the scores. Returns the rows' hidden
    states `[R, hidden]` after `last_layer`. Slots in `[cache.length, keys)` must hold positions later than every
    row's and finite K/V (they are masked out).
    """
    keys_k, keys_v, positions = cache.kv[:, 0, :keys], cache.kv[:, 1, :keys], cache.positions[:keys]
    hidden = adapter.embed(cache.token_ids[rows])
    row_pos = positions[rows]
    for layer in range(last_layer + 1):
        q, k, v = adapter.qkv(layer, hidden, row_pos)
        cache.kv[layer, 0, rows], cache.kv[layer, 1, rows] = k, v
        if scoring is not None and layer in scoring.layers:
            out = stage1_attention(q, keys_k[layer], keys_v[layer], row_pos, positions, adapter.scale,
                                   scoring.context_end, scoring.prophet, scoring.norm, scoring.bounds)
        else:
            out = sparse_attention(q, keys_k[layer], keys_v[layer], row_pos, positions, adapter.scale)
        hidden = adapter.finish_layer(layer, hidden, out)
    return hidden


def score_layers(adapter: ModelAdapter, layers: tuple[int, ...] | None) -> frozenset[int]:
    """The scoring layers of `query_relevance`: `layers`, or every layer when None."""
    return frozenset(range(adapter.spec.num_layers) if layers is None else layers)


@torch.inference_mode()
def stage1_forward(
    adapter: ModelAdapter, cache: StitchedCache, suffix_rows: torch.Tensor, kind: str, layers: tuple[int, ...] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the suffix rows (slots `[S]`, after the context) through the layers up to the last scoring layer.

    kind "prophet" or "infoflow" and `layers` (None: all) as in `query_relevance`. Writes the rows' K/V into the
    cache. Returns (`[C]` fp32 scores of the chunk slots, `[S, hidden]` hidden states after the last scoring layer).
    """
    end = cache.context_end
    scores = torch.zeros(end, dtype=torch.float32, device=cache.kv.device)
    prophet, norm = (scores, None) if kind == "prophet" else (None, scores)
    wanted = score_layers(adapter, layers)
    hidden = run_rows(adapter, cache, suffix_rows, cache.length, max(wanted), Scoring(wanted, prophet, norm, end))
    return scores[cache.prefix_len :], hidden
