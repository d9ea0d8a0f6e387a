"""ProphetKV's Stage I over a stitched cache: how strongly the question attends to each chunk token.

The selection methods rank tokens and chunks by these scores; `cuda_graphs` runs the same pass from captured graphs.
"""

from __future__ import annotations

import torch

from prophet_rag.compute import batch
from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.stitched import Scoring, StitchedCache, lay_out_by_layer


def query_relevance(
    adapter: ModelAdapter, cache: StitchedCache, suffix_rows: torch.Tensor, kind: str, layers: tuple[int, ...] | None
) -> torch.Tensor:
    """`[C]` fp32 score of each chunk slot from the suffix's attention over the cached context (Stage I).

    kind "prophet": attention mass summed over heads, query tokens and all layers (uniform fusion), softmax over the
    context keys only. kind "infoflow": L2 norm over query tokens of the head-mean attention, averaged over `layers`.
    The suffix runs over the cache as it is (reused, not yet repaired), so this costs one |suffix|-row forward, up
    to the last scoring layer; each scoring layer's attention and scores come from one `stage1_attention` call.
    """
    end = cache.context_end
    scores = torch.zeros(end, dtype=torch.float32, device=cache.kv.device)
    wanted = frozenset(range(adapter.spec.num_layers) if layers is None else layers)
    prophet, norm = (scores, None) if kind == "prophet" else (None, scores)
    # Through `batch.forward`: with the other requests' passes, when the request's prefill has joined a batcher.
    batch.forward(adapter, cache, suffix_rows, scoring=Scoring(wanted, prophet, norm, end), last_layer=max(wanted))
    return scores[cache.prefix_len :]


def query_relevance_twice(adapter: ModelAdapter, cache: StitchedCache,
                          suffix_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[C]` ProphetKV's Stage I scores (kind "prophet") of a cache assembled in request order in the parallel
    geometry, then of the same cache laid out at its slots' positions (the retrieval layout), from one forward of
    both passes; the cache is left laid out (`stitched.lay_out_by_layer`), the second pass's suffix K/V in it.

    Each layer is read by the first pass, then placed and read by the second, so no second cache is filled: a copy
    of a 4K-token SmolLM2 cache costs more in page faults (~0.26 s) than the pass it would save. The two passes'
    projections run as one matmul of twice the rows, which on a CPU costs about one pass's (the weights are read
    once: a 21-row pass is bound by that read), so the second pass costs about its attention alone."""
    end = cache.context_end
    layers = frozenset(range(adapter.spec.num_layers))
    parallel, laid_out = (torch.zeros(end, dtype=torch.float32, device=cache.kv.device) for _ in range(2))
    stored, place = lay_out_by_layer(adapter, cache)
    passes = [batch.Pass(cache, suffix_rows, Scoring(layers, parallel, None, end), positions=stored),
              batch.Pass(cache, suffix_rows, Scoring(layers, laid_out, None, end), before=place)]
    batch.forward_together(adapter, passes)
    return parallel[cache.prefix_len :], laid_out[cache.prefix_len :]
