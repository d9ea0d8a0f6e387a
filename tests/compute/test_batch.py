"""The batched decode step: N requests' caches advanced in one pass, each row as its request's own step."""

from __future__ import annotations

import pytest
import torch

from prophet_rag.compute.batch import decode_step
from prophet_rag.compute.generate import decode_one
from prophet_rag.compute.prefill import prefill_full
from tiny import CHUNKS, QUERY

QUESTIONS = (QUERY, "Which city is the capital of France?", "What jumps over the lazy dog?")


def _prefilled(engine, chunks, query: str, extra: int = 4):
    layout = engine.builder.layout(chunks, query)
    ids = layout.joined_ids()
    cache, hidden = prefill_full(engine.adapter, ids, int(layout.prefix_ids.numel()), ids.numel() + extra,
                                 torch.float32)
    with torch.inference_mode():
        logits = engine.adapter.logits(hidden[-1:])[0]
    return cache, int(torch.argmax(logits))


def _requests(engine):
    """Three requests of different lengths: (cache, first greedy token)."""
    return [_prefilled(engine, CHUNKS[: i + 1], q) for i, q in enumerate(QUESTIONS)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_each_row_of_a_batched_step_is_its_requests_own_step(make_engine, family):
    engine = make_engine(family)
    alone = [decode_one(engine.adapter, cache, token) for cache, token in _requests(engine)]
    caches, tokens = zip(*_requests(engine), strict=True)
    together = decode_step(engine.adapter, caches, tokens)
    assert together.shape == (3, engine.adapter.spec.vocab_size)
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_a_step_appends_one_slot_to_every_cache_and_writes_its_kv(make_engine):
    engine = make_engine("llama")
    requests = _requests(engine)
    lengths = [cache.length for cache, _ in requests]
    decode_step(engine.adapter, [c for c, _ in requests], [t for _, t in requests])
    for (cache, token), length in zip(requests, lengths, strict=True):
        assert cache.length == length + 1 and int(cache.token_ids[length]) == token
        assert torch.isfinite(cache.kv[:, :, length]).all()


def test_greedy_tokens_of_batched_steps_equal_serial_decoding(make_engine):
    engine = make_engine("mistral")
    serial = []
    for cache, token in _requests(engine):
        seq = [token]
        for _ in range(3):
            seq.append(int(torch.argmax(decode_one(engine.adapter, cache, seq[-1]))))
        serial.append(seq)
    requests = _requests(engine)
    seqs = [[token] for _, token in requests]
    for _ in range(3):
        logits = decode_step(engine.adapter, [c for c, _ in requests], [s[-1] for s in seqs])
        for seq, row in zip(seqs, logits, strict=True):
            seq.append(int(torch.argmax(row)))
    assert seqs == serial
