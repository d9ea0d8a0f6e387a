"""Conversation prefix reuse through the engine: turn N computes only what is new, and a conversation answered with
reuse equals full prefill of every turn when the earlier turns recomputed everything (ratio 1)."""

from __future__ import annotations

import threading

import pytest
import torch

from prophet_rag.config import GenerationConfig, PrefixCacheConfig
from prophet_rag.errors import InvalidRequestError
from prophet_rag.layout import DOCUMENTS, PlacedDocuments
from tiny import CHUNKS, FAMILIES

GREEDY = GenerationConfig(max_new_tokens=6, eos_token_ids=(10**6,))
BLOCK = 4
PREFIX = PrefixCacheConfig(max_bytes=2**24, block_tokens=BLOCK)
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
MORE = ("The vault code of Beta is 9034.", "Berlin is the capital of Germany.")
# (question, documents it brings): plain turns, and turns that bring documents through the chunk path.
PLAIN = [("what is the vault code of Alpha?", ()), ("and of Beta?", ()), ("what is the capital of France?", ()),
         ("answer the question using the documents", ())]
WITH_DOCUMENTS = [("what is the vault code of Alpha?", CHUNKS), ("and of Beta?", ()),
                  ("what is the capital of Germany?", MORE), ("answer the question", ())]


def _question(question: str, documents) -> dict:
    return {"role": "user", "content": ["Context:\n", documents, f"\nQuestion: {question}"]}


def converse(engine, turns, *, method=None, ratio=1.0, reference=None):
    """Answer `turns` one after another as a chat, earlier turns' documents placed in the history in the order
    their turn laid them out. With `reference`, each turn's prompt is also answered there by full prefill; returns
    [(answer, reference answer or None)]."""
    history, results = [SYSTEM], []
    for question, documents in turns:
        if documents:
            messages = [*history, _question(question, DOCUMENTS)]
            answer = engine.chat(messages, documents, method=method, ratio=ratio, generation=GREEDY,
                                 return_logits=True)
            laid_out = [documents[i] for i in answer.chunk_order]
            full = reference and reference.chat(messages, laid_out, method="full", generation=GREEDY,
                                                return_logits=True)
            history.append(_question(question, PlacedDocuments(laid_out)))
        else:
            history.append({"role": "user", "content": question})
            answer = engine.chat(history, method=method, ratio=ratio, generation=GREEDY, return_logits=True)
            full = reference and reference.chat(history, method="full", generation=GREEDY, return_logits=True)
        history.append({"role": "assistant", "content": answer.text})
        results.append((answer, full))
    return results


def _assert_same(answer, full):
    assert list(answer.token_ids) == list(full.token_ids)
    torch.testing.assert_close(answer.first_token_logits, full.first_token_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_plain_conversation_with_prefix_reuse_equals_full_prefill(make_engine, family):
    engine, reference = make_engine(family, prefix_cache=PREFIX), make_engine(family)
    results = converse(engine, PLAIN, reference=reference)
    for answer, full in results:
        _assert_same(answer, full)
    assert results[0][0].stats.prefix_cache_tokens == 0
    assert all(answer.stats.prefix_cache_tokens > 0 for answer, _ in results[1:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prophet_focus", "cacheblend"])
def test_documents_in_earlier_turns_at_ratio_one_equal_full_prefill(make_engine, family, method):
    engine, reference = make_engine(family, prefix_cache=PREFIX), make_engine(family)
    results = converse(engine, WITH_DOCUMENTS, method=method, reference=reference)
    for answer, full in results:
        _assert_same(answer, full)
    stats = [answer.stats for answer, _ in results]
    assert stats[2].context_tokens > 0 and stats[2].recomputed_tokens == stats[2].context_tokens  # chunk path
    assert all(s.prefix_cache_tokens > 0 for s in stats[1:])


def test_reuse_differs_from_full_prefill_when_earlier_turns_recomputed_nothing(make_engine):
    # Guards the test above: the history's KV is what the model used, so an approximate first turn carries on.
    engine, reference = make_engine(prefix_cache=PREFIX), make_engine()
    results = converse(engine, WITH_DOCUMENTS[:2], method="reuse", ratio=0.0, reference=reference)
    second, full = results[1]
    assert second.stats.prefix_cache_tokens > 0
    assert (second.first_token_logits - full.first_token_logits).abs().max() > 1e-3


def test_turn_n_computes_only_what_follows_the_earlier_turns(make_engine):
    engine = make_engine(prefix_cache=PREFIX)
    results = converse(engine, PLAIN)
    for (before, _), (after, _) in zip(results, results[1:], strict=False):
        earlier = before.stats.suffix_tokens  # a plain turn's prompt is all suffix
        assert after.stats.prefix_cache_tokens >= earlier // BLOCK * BLOCK
        assert after.stats.prefix_cache_tokens < after.stats.suffix_tokens
        assert after.stats.cached_tokens == after.stats.prefix_cache_tokens


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    return int((a[:n] == b[:n]).cumprod(0).sum())


def test_the_history_covers_the_earlier_answers(make_engine):
    engine = make_engine(prefix_cache=PREFIX)
    history = [SYSTEM, {"role": "user", "content": "hello"}]
    first = engine.chat(history, generation=GREEDY)
    follow = [*history, {"role": "assistant", "content": first.text}, {"role": "user", "content": "x"}]
    second = engine.chat(follow, generation=GREEDY)
    # Kept: the prompt and every generated token but the last, whose KV is never computed.
    kept = torch.cat([engine.builder.chat_layout(history).joined_ids(), torch.tensor(first.token_ids[:-1])])
    same = _common(engine.builder.chat_layout(follow).joined_ids(), kept)
    assert same > engine.builder.chat_layout(history).total_tokens
    assert second.stats.prefix_cache_tokens == same // BLOCK * BLOCK


def test_a_changed_earlier_message_misses_from_the_change(make_engine):
    engine, reference = make_engine(prefix_cache=PREFIX), make_engine()
    results = converse(engine, PLAIN[:2])
    edited = [SYSTEM, {"role": "user", "content": "what is the vault code of Gamma?"},
              {"role": "assistant", "content": results[0][0].text}, {"role": "user", "content": "and of Beta?"}]
    answer = engine.chat(edited, generation=GREEDY, return_logits=True)
    original = engine.builder.chat_layout([SYSTEM, {"role": "user", "content": PLAIN[0][0]}]).joined_ids()
    same = _common(engine.builder.chat_layout(edited).joined_ids(), original)
    assert answer.stats.prefix_cache_tokens == same // BLOCK * BLOCK > 0
    _assert_same(answer, reference.chat(edited, method="full", generation=GREEDY, return_logits=True))


def test_the_full_method_reads_no_conversation_kv_but_keeps_its_own(make_engine):
    engine = make_engine(prefix_cache=PREFIX)
    history = [SYSTEM, {"role": "user", "content": "hello"}]
    engine.chat(history, generation=GREEDY)
    full = engine.chat(history, method="full", generation=GREEDY)
    assert full.stats.prefix_cache_tokens == 0 and full.stats.cached_tokens == 0
    engine.prefix_cache.clear()
    engine.chat(history, method="full", generation=GREEDY)
    assert engine.chat(history, generation=GREEDY).stats.prefix_cache_tokens > 0


def test_a_stored_prefix_segment_stays_with_the_chunk_tiers(make_engine):
    # A single-turn RAG prefix is a stored segment: found in a tier, counted as before, never the prefix cache's.
    engine = make_engine(prefix_cache=PREFIX)
    engine.answer(CHUNKS, "what is the vault code of Alpha?", generation=GREEDY)
    warm = engine.answer(CHUNKS, "what is the vault code of Alpha?", generation=GREEDY).stats
    assert warm.prefix_cache_tokens == 0
    assert warm.cached_tokens == warm.prefix_tokens + warm.context_tokens - warm.recomputed_tokens


def test_a_history_prefix_counts_its_reused_tokens_as_cached(make_engine):
    engine = make_engine(prefix_cache=PREFIX)
    engine.ingest(MORE)
    stats = [answer.stats for answer, _ in converse(engine, WITH_DOCUMENTS[:3], method="reuse", ratio=0.0)]
    third = stats[2]  # history from the prefix cache, then stored documents from a tier
    assert third.prefix_cache_tokens > 0 and third.recomputed_tokens == 0
    assert third.cached_tokens == third.prefix_cache_tokens + third.context_tokens


def test_prefix_reuse_is_off_by_default(make_engine):
    engine = make_engine()
    results = converse(engine, PLAIN[:2])
    assert results[1][0].stats.prefix_cache_tokens == 0 and len(engine.prefix_cache) == 0


def test_a_streamed_turn_is_kept(make_engine):
    engine = make_engine(prefix_cache=PREFIX)
    history = [SYSTEM, {"role": "user", "content": "hello"}]
    stream = engine.stream_chat(history, generation=GREEDY)
    text = "".join(stream)
    follow = [*history, {"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
    assert engine.chat(follow, generation=GREEDY).stats.prefix_cache_tokens > 0


def test_a_small_budget_reuses_less_and_answers_the_same(make_engine):
    small = PrefixCacheConfig(max_bytes=3 * 2 * 2 * BLOCK * 2 * 16 * 4, block_tokens=BLOCK)  # 3 blocks of the tiny KV
    engine, reference = make_engine(prefix_cache=small), make_engine()
    results = converse(engine, PLAIN[:3], reference=reference)
    for answer, full in results:
        _assert_same(answer, full)
    assert engine.prefix_cache.stats().nbytes <= small.max_bytes
    assert all(answer.stats.prefix_cache_tokens <= 3 * BLOCK for answer, _ in results)


def test_threads_running_conversations_on_one_engine_answer_as_alone(make_engine):
    engine, reference = make_engine(prefix_cache=PREFIX), make_engine()
    conversations = [PLAIN[:3], WITH_DOCUMENTS[:3], [(q, ()) for q, _ in reversed(PLAIN[:3])]]
    expected = [[full.token_ids for _, full in converse(reference, turns, reference=reference)]
                for turns in conversations]
    got: dict[int, list] = {}

    def run(i: int) -> None:
        got[i] = [answer.token_ids for answer, _ in converse(engine, conversations[i])]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [got[i] for i in range(len(conversations))] == expected
    assert engine.prefix_cache.stats().hits >= 2 * len(conversations)


def test_placed_documents_are_tokenized_as_the_chunks_were(make_engine):
    builder = make_engine().builder
    asked = builder.chat_layout([SYSTEM, _question("q", DOCUMENTS)], CHUNKS)
    history = builder.chat_layout([SYSTEM, _question("q", PlacedDocuments(CHUNKS))])
    assert torch.equal(history.joined_ids(), asked.joined_ids())


@pytest.mark.parametrize("texts", ["one string", [], [""], [3]])
def test_bad_placed_documents_are_refused(make_engine, texts):
    builder = make_engine().builder
    with pytest.raises(InvalidRequestError, match="PlacedDocuments|placed document"):
        builder.chat_layout([SYSTEM, _question("q", PlacedDocuments(texts))])
