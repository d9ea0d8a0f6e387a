"""Prefill: full prefill of a whole prompt, and isolated chunk prefill (each chunk's KV on its own).

Isolated: each chunk is computed behind the sink tokens, several chunks per batch. Chunks of one batch are
right-padded to a common length; under the causal mask padding after a token cannot change it, so each chunk's KV
equals a batch-of-one prefill. The sink's own KV is dropped; the chunk keeps the positions it was computed at
(`sink_len ... sink_len + n - 1`) so it can be re-positioned by one delta rotation later.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from prophet_rag.compute.chunk_kv import ChunkKV
from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.stitched import StitchedCache, forward_rows

# Rows per batch (batch size x padded length): bounds the peak activation memory of one batch.
_MAX_BATCH_TOKENS = 8192


@torch.inference_mode()
def _prefill_batch(adapter: ModelAdapter, ids: torch.Tensor, kv_dtype: torch.dtype) -> torch.Tensor:
    """Causal prefill of `ids` `[B, T]` at positions `0..T-1`; returns K/V `[L, 2, B, T, Hkv, D]`."""
    spec = adapter.spec
    batch, length = ids.shape
    positions = torch.arange(length, device=ids.device)
    kv = torch.empty(spec.num_layers, 2, batch, length, spec.num_kv_heads, spec.head_dim, dtype=kv_dtype,
                     device=ids.device)
    hidden = adapter.embed(ids)
    rope = adapter.rope_tables(positions, hidden.dtype)
    for layer in range(spec.num_layers):
        q, k, v = adapter.qkv(layer, hidden, rope)
        kv[layer, 0], kv[layer, 1] = k, v
        if layer == spec.num_layers - 1:
            break  # the last layer's output is not needed, only its K/V
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=adapter.scale,
            enable_gqa=True,
        )
        hidden = adapter.finish_layer(layer, hidden, out.transpose(1, 2))
    return kv


def prefill_isolated(
    adapter: ModelAdapter, sink_ids: torch.Tensor, chunks: Sequence[torch.Tensor], kv_dtype: torch.dtype
) -> list[ChunkKV]:
    """KV of each chunk `[n_i]` computed alone behind `sink_ids` `[s]`, in the order given."""
    sink = sink_ids.to(adapter.device)
    s = int(sink.numel())
    order = sorted(range(len(chunks)), key=lambda i: int(chunks[i].numel()))
    results: dict[int, ChunkKV] = {}
    start = 0
    while start < len(order):
        end = start + 1
        # Sorted by length, so the last chunk of a batch sets its padded length.
        while end < len(order) and (end + 1 - start) * (s + int(chunks[order[end]].numel())) <= _MAX_BATCH_TOKENS:
            end += 1
        batch = order[start:end]
        length = s + int(chunks[batch[-1]].numel())
        ids = torch.zeros(len(batch), length, dtype=torch.long, device=adapter.device)
        for row, i in enumerate(batch):
            n = int(chunks[i].numel())
            ids[row, :s] = sink
            ids[row, s : s + n] = chunks[i].to(adapter.device)
        kv = _prefill_batch(adapter, ids, kv_dtype)
        for row, i in enumerate(batch):
            n = int(chunks[i].numel())
            results[i] = ChunkKV(
                token_ids=chunks[i].to(adapter.device),
                positions=torch.arange(s, s + n, device=adapter.device),
                kv=kv[:, :, row, s : s + n].clone(),
            )
        start = end
    return [results[i] for i in range(len(chunks))]


@torch.inference_mode()
def prefill_full(adapter: ModelAdapter, ids: torch.Tensor, prefix_len: int, capacity: int,
                 kv_dtype: torch.dtype, past: Sequence[torch.Tensor] = ()) -> tuple[StitchedCache, torch.Tensor]:
    """Plain prefill of the prompt `ids` `[T]` into a fresh cache of `capacity` slots (its first `prefix_len` tokens
    are the prefix); returns the cache and the last token's last-layer hidden state `[1, hidden]` (the next token's
    logits are all a prefill needs: `forward_rows`'s `outputs`).

    `past` holds KV already computed for the first m tokens (blocks `[L, 2, n_i, H_kv, D]` in order, at positions
    0..m-1, m = sum of n_i, less than T): it is copied in, and only the tokens after it are computed.
    """
    cache = StitchedCache.empty(adapter, capacity, kv_dtype)
    rows = cache.append_tokens(ids.to(adapter.device))
    cache.prefix_len = prefix_len
    start = 0
    for block in past:
        end = start + int(block.shape[2])
        cache.kv[:, :, start:end] = block
        start = end
    assert start < rows.numel(), "past must leave at least one token to compute"
    hidden, _ = forward_rows(adapter, cache, rows[start:], outputs=1)
    return cache, hidden
