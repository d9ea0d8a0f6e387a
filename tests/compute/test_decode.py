"""The decode loop: lazy, bounded by max_new_tokens, ends at EOS; one step equals a full forward."""

from __future__ import annotations

import torch

from prophet_rag.compute.generate import decode, decode_one, next_token
from prophet_rag.compute.prefill import prefill_full
from prophet_rag.config import GenerationConfig
from tiny import CHUNKS, QUERY, ForcedToken


def _prefilled(engine, extra: int):
    layout = engine.builder.layout(CHUNKS, QUERY)
    ids = layout.joined_ids()
    cache, hidden = prefill_full(engine.adapter, ids, int(layout.prefix_ids.numel()), ids.numel() + extra,
                                 torch.float32)
    with torch.inference_mode():
        logits = engine.adapter.logits(hidden[-1:])[0]
    return ids, cache, logits


def test_decode_stops_at_max_new_tokens_without_an_extra_step(make_engine):
    engine = make_engine("llama")
    _, cache, logits = _prefilled(engine, 3)
    tokens = list(decode(engine.adapter, cache, logits, GenerationConfig(max_new_tokens=3), eos=()))
    assert len(tokens) == 3
    assert cache.length == cache.capacity - 1  # the last token is sampled but never run through the model


def test_decode_ends_at_eos_without_yielding_it(make_engine):
    engine = make_engine("llama")
    _, cache, logits = _prefilled(engine, 5)
    first = int(torch.argmax(logits))
    assert list(decode(engine.adapter, cache, logits, GenerationConfig(max_new_tokens=5), eos={first})) == []


def test_decode_is_lazy(make_engine):
    engine = make_engine("llama")
    _, cache, logits = _prefilled(engine, 5)
    tokens = decode(engine.adapter, cache, logits, GenerationConfig(max_new_tokens=5), eos=())
    next(tokens)
    assert cache.length == cache.capacity - 5  # nothing run until the consumer asks for the next token


def test_one_decode_step_matches_a_full_forward(make_engine):
    engine = make_engine("qwen2")
    ids, cache, logits = _prefilled(engine, 1)
    token = int(torch.argmax(logits))
    step = decode_one(engine.adapter, cache, token)
    with torch.no_grad():
        reference = engine.adapter.model(torch.cat([ids, torch.tensor([token])])[None]).logits[0, -1].float()
    torch.testing.assert_close(step, reference, atol=1e-5, rtol=1e-5)

def test_next_token_takes_only_what_the_constraint_allows():
    logits = torch.tensor([5.0, 1.0, 0.0])
    constraint = ForcedToken(2, steps=3)
    assert next_token(logits, GenerationConfig(), None, constraint) == 2
    assert constraint.taken == [2]


def test_decode_follows_the_constraint_and_ends_when_it_is_finished(make_engine):
    engine = make_engine("llama")
    _, cache, logits = _prefilled(engine, 8)
    forced = int(torch.argmin(logits))
    constraint = ForcedToken(forced, steps=2)
    tokens = list(decode(engine.adapter, cache, logits, GenerationConfig(max_new_tokens=8), (), constraint))
    assert tokens == [forced, forced]
    assert cache.length == cache.capacity - 7  # one step run, for the second token; none after the grammar ended
