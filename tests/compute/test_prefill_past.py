"""Full prefill that starts from KV already computed for the first tokens (a conversation's earlier turns)."""

from __future__ import annotations

import pytest
import torch

from prophet_rag.compute.prefill import prefill_full
from tiny import CHUNKS, FAMILIES, QUERY


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_from_past_blocks_equals_prefill_from_scratch(make_engine, family):
    engine = make_engine(family)
    ids = engine.builder.layout(CHUNKS, QUERY).joined_ids()
    whole, hidden = prefill_full(engine.adapter, ids, 0, ids.numel(), torch.float32)
    blocks = [whole.kv[:, :, start : start + 8].clone() for start in range(0, 24, 8)]
    cache, tail = prefill_full(engine.adapter, ids, 0, ids.numel(), torch.float32, blocks)
    torch.testing.assert_close(cache.kv, whole.kv, atol=1e-5, rtol=1e-5)
    assert hidden.shape[0] == tail.shape[0] == 1  # the last token's state: all a prefill needs
    torch.testing.assert_close(tail, hidden, atol=1e-5, rtol=1e-5)

