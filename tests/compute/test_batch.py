"""Batched passes: N requests' decode steps and prefill passes run as one, each request's rows as its own pass."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prophet_rag.compute.batch import Pass, decode_step, forward, forward_passes, joined
from prophet_rag.compute.generate import decode_one
from prophet_rag.compute.prefill import prefill_full
from prophet_rag.compute.stitched import Scoring, forward_rows
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


def _stitched(engine, chunks, query: str, order):
    """A request's stitched cache, blocks placed, with its suffix appended: (cache, suffix slots)."""
    layout = engine.builder.layout(chunks, query)
    cache, _ = engine.prefiller.assemble(layout, order, layout.total_tokens + 2)
    return cache, cache.append_tokens(layout.suffix_ids)


def _clone(cache):
    return replace(cache, kv=cache.kv.clone(), token_ids=cache.token_ids.clone(), positions=cache.positions.clone())


def _keep_half_of_the_context(context_rows: int):
    """A row filter keeping every other of the first `context_rows` rows and all the others (the suffix, whose K/V
    no tier holds), as CacheBlend's keeps the suffix."""
    def keep(layer, rows, k, v):
        return torch.cat([torch.arange(0, context_rows, 2), torch.arange(context_rows, rows.numel())])
    return keep


def _passes(engine):
    """Three requests' passes of the three kinds a prefill runs: Stage I scoring up to a middle layer, a selective
    forward with a row filter, a selective forward over chosen context rows and the suffix wanting its last two rows'
    states (a 3-layer model)."""
    out = []
    for i, (question, order) in enumerate(zip(QUESTIONS, ([1, 0], [0, 2, 1], [0]), strict=True)):
        cache, suffix = _stitched(engine, CHUNKS[: len(order)], question, order)
        if i == 0:
            scores = torch.zeros(cache.context_end)
            item = Pass(cache, suffix, scoring=Scoring(frozenset({0, 1}), scores, None, cache.context_end),
                        last_layer=1)
        elif i == 1:
            context = cache.eligible_slots()[::3]
            item = Pass(cache, torch.cat([context, suffix]), row_filter=(1, _keep_half_of_the_context(len(context))))
        else:
            item = Pass(cache, torch.cat([cache.eligible_slots()[:5], suffix]), outputs=2)
        out.append(item)
    return out


def _alone(engine, item):
    return forward_rows(engine.adapter, item.cache, item.rows, scoring=item.scoring, row_filter=item.row_filter,
                        last_layer=item.last_layer, outputs=item.outputs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("outputs", [1, 3])
def test_a_pass_that_wants_its_last_rows_gets_their_states_and_every_rows_kv(make_engine, family, outputs):
    engine = make_engine(family)
    whole, suffix = _stitched(engine, CHUNKS, QUERY, list(range(len(CHUNKS))))
    trimmed, _ = _stitched(engine, CHUNKS, QUERY, list(range(len(CHUNKS))))
    rows = torch.cat([whole.eligible_slots()[::4], suffix])
    expected, expected_rows = forward_rows(engine.adapter, whole, rows)
    hidden, kept = forward_rows(engine.adapter, trimmed, rows, outputs=outputs)
    assert torch.equal(kept, expected_rows)  # every row was recomputed to the end
    assert hidden.shape == (outputs, expected.shape[1])
    torch.testing.assert_close(hidden, expected[-outputs:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trimmed.kv[:, :, : whole.length], whole.kv[:, :, : whole.length], atol=1e-5,
                               rtol=1e-5)


def test_passes_run_together_give_each_request_what_it_gets_alone(make_engine):
    engine = make_engine("llama", model_overrides=dict(num_hidden_layers=3))
    alone_passes, together_passes = _passes(engine), _passes(engine)
    alone = [_alone(engine, item) for item in alone_passes]
    together = forward_passes(engine.adapter, together_passes)
    for (hidden, rows), (expected_hidden, expected_rows) in zip(together, alone, strict=True):
        assert torch.equal(rows, expected_rows)
        torch.testing.assert_close(hidden, expected_hidden, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(together_passes, alone_passes, strict=True):  # the K/V each pass wrote (a scoring pass
        last, n = (mine.last_layer or 2) + 1, mine.cache.length  # writes none past its last layer)
        torch.testing.assert_close(mine.cache.kv[:last, :, :n], theirs.cache.kv[:last, :, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together_passes[0].scoring.prophet, alone_passes[0].scoring.prophet)
    assert together_passes[0].scoring.prophet.abs().sum() > 0  # the scoring pass scored


def test_a_row_filter_keeps_its_rows_and_the_other_passes_all_theirs(make_engine):
    engine = make_engine("llama", model_overrides=dict(num_hidden_layers=3))
    passes = _passes(engine)
    started = [int(item.rows.numel()) for item in passes]
    suffix = int(passes[1].rows.numel()) - int(passes[1].cache.eligible_slots()[::3].numel())
    results = forward_passes(engine.adapter, passes)
    kept = [int(rows.numel()) for _, rows in results]
    assert kept == [started[0], (started[1] - suffix + 1) // 2 + suffix, started[2]]
    assert [int(hidden.shape[0]) for hidden, _ in results] == [*kept[:2], 2]  # the third wants its last two


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_a_pass_whose_own_part_raises_leaves_and_the_others_get_what_they_get_alone(make_engine, failing):
    engine = make_engine("llama", model_overrides=dict(num_hidden_layers=3))
    passes, expected = _passes(engine), [_alone(engine, item) for item in _passes(engine)]

    def unreadable(layer):
        if layer == 1:
            raise RuntimeError("block read failed")

    passes[failing].cache.layer_ready = unreadable
    errors = [None] * len(passes)
    results = forward_passes(engine.adapter, passes, errors=errors)
    assert isinstance(errors[failing], RuntimeError) and results[failing] is None
    for i in set(range(3)) - {failing}:
        assert errors[i] is None and torch.equal(results[i][1], expected[i][1])
        torch.testing.assert_close(results[i][0], expected[i][0], atol=1e-5, rtol=1e-5)
    passes[failing].cache.layer_ready = unreadable
    with pytest.raises(RuntimeError, match="block read failed"):  # without `errors`, it propagates
        forward_passes(engine.adapter, passes)


def test_one_pass_alone_is_exactly_forward_rows(make_engine):
    engine = make_engine("mistral", model_overrides=dict(num_hidden_layers=3))
    item, copy = _passes(engine)[1], _passes(engine)[1]
    (hidden, rows), = forward_passes(engine.adapter, [item])
    expected, expected_rows = _alone(engine, copy)
    assert torch.equal(hidden, expected) and torch.equal(rows, expected_rows)
    n = item.cache.length
    assert torch.equal(item.cache.kv[:, :, :n], copy.cache.kv[:, :, :n])


def test_forward_runs_a_pass_through_the_batcher_a_thread_has_joined(make_engine):
    engine = make_engine("llama")
    item = _passes(engine)[2]
    seen = []

    def run(passes):
        seen.extend(passes)
        return ["ran"]

    with joined(run):
        assert forward(engine.adapter, item.cache, item.rows) == "ran"
    assert len(seen) == 1 and seen[0].cache is item.cache and torch.equal(seen[0].rows, item.rows)
    hidden, _ = forward(engine.adapter, item.cache, item.rows)  # left: forward_rows again
    assert hidden.shape[0] == item.rows.numel()


def test_a_pass_is_called_before_each_layer_after_the_passes_ahead_of_it(make_engine):
    engine = make_engine("llama", model_overrides=dict(num_hidden_layers=3))
    first, second = _passes(engine)[1:]  # both run every layer
    calls = []
    first.before = lambda layer: calls.append(("first", layer))
    second.before = lambda layer: calls.append(("second", layer))
    forward_passes(engine.adapter, [first, second])
    assert calls == [(name, layer) for layer in range(3) for name in ("first", "second")]


def test_a_pass_reads_the_positions_it_is_given(make_engine):
    """Positions are the pass's, not its cache's: the same rows over every key shifted by a constant attend alike
    (RoPE is relative), over the keys' own positions with the rows moved they do not."""
    engine = make_engine("llama", model_overrides=dict(num_hidden_layers=3))
    cache, _ = _requests(engine)[1]
    rows = torch.arange(cache.length - 3, cache.length)
    expected, _ = forward_passes(engine.adapter, [Pass(replace(cache, kv=cache.kv.clone()), rows)])[0]
    moved = cache.positions.clone()
    moved[rows] += 40
    # Only the rows' own keys are rotated at their positions; the others keep the cache's: not a uniform shift.
    shifted, _ = forward_passes(engine.adapter, [Pass(replace(cache, kv=cache.kv.clone()), rows, positions=moved)])[0]
    assert not torch.allclose(shifted, expected, atol=1e-4)
    same, _ = forward_passes(engine.adapter, [Pass(replace(cache, kv=cache.kv.clone()), rows,
                                                   positions=cache.positions.clone())])[0]
    assert torch.equal(same, expected)
