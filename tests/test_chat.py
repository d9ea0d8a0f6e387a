"""The engine's chat API: plain prompts are plain, documents are cached chunks, one-off text is never stored."""

from __future__ import annotations

import torch

from prophet_rag.config import GenerationConfig
from prophet_rag.layout import DOCUMENTS
from tiny import CHUNKS, QUERY

GEN = GenerationConfig(max_new_tokens=3, eos_token_ids=(10**6,))


def test_a_plain_chat_is_full_prefill_of_the_rendered_template(make_engine):
    engine = make_engine("qwen2")
    messages = [{"role": "user", "content": "List three colors."}]
    answer = engine.chat(messages, generation=GEN, return_logits=True, method="prophet")
    assert answer.stats.method == "full" and answer.stats.context_tokens == 0
    assert (answer.stats.cache_hits, answer.stats.cache_misses) == (0, 0) and len(engine.store) == 0
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = engine.adapter.model(ids).logits[0, -1].float()
    torch.testing.assert_close(answer.first_token_logits, reference, atol=1e-5, rtol=1e-5)


def test_chat_with_documents_reuses_their_cached_kv(make_engine):
    engine = make_engine("llama")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": ["Documents:\n", DOCUMENTS, f"Question: {QUERY}"]}]
    first = engine.chat(messages, CHUNKS, generation=GEN)
    second = engine.chat(messages, CHUNKS, generation=GEN)
    assert (first.stats.cache_misses, second.stats.cache_hits) == (3, 3)
    assert first.token_ids == second.token_ids


def test_chat_at_ratio_one_matches_full_prefill_of_the_same_messages(make_engine):
    engine = make_engine("mistral")
    messages = [{"role": "user", "content": ["Read:\n", DOCUMENTS, "What is the code?"]}]
    full = engine.chat(messages, CHUNKS, method="full", generation=GEN, return_logits=True)
    every = engine.chat(messages, CHUNKS, method="prophet", ratio=1.0, generation=GEN, return_logits=True)
    torch.testing.assert_close(every.first_token_logits, full.first_token_logits, atol=1e-5, rtol=1e-5)


def test_transient_documents_and_history_prefixes_are_not_stored(make_engine):
    engine = make_engine("llama")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [DOCUMENTS, "and the code?"]}]
    answer = engine.chat(messages, [CHUNKS[0], "Existing answer: 42."], transient=[False, True], generation=GEN)
    assert answer.stats.cache_misses == 2
    assert len(engine.store) == 1  # the stored document only: not the one-off text, not the history prefix



def test_a_one_off_prefix_is_computed_but_not_stored(make_engine):
    engine = make_engine("llama")

    def messages(answer_so_far: str) -> list[dict]:
        return [{"role": "user", "content": [f"The answer so far is {answer_so_far}.\n", DOCUMENTS, "Refine it."]}]

    engine.chat(messages("41"), CHUNKS[:1], generation=GEN)
    assert len(engine.store) == 2  # that prefix and the document
    one_off = engine.chat(messages("42"), CHUNKS[1:2], transient_prefix=True, generation=GEN)
    assert one_off.stats.cache_misses == 1 and one_off.stats.prefix_tokens > 0
    assert len(engine.store) == 3  # the new document only
