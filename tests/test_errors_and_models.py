"""Bad input gets a clear error; unsupported models are refused at construction; nothing stored is harmed."""

from __future__ import annotations

import os

import pytest

from prophet_rag import (
    ContextWindowError,
    GenerationConfig,
    InvalidRequestError,
    SelectionConfig,
    StoreConfig,
    StoreError,
    UnsupportedModelError,
)
from prophet_rag.engine import ProphetEngine
from tiny import CHUNKS, QUERY, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval(make_engine, ratio):
    engine = make_engine("llama")
    with pytest.raises(InvalidRequestError, match="ratio"):
        engine.answer(CHUNKS, QUERY, ratio=ratio)


def test_unknown_method_lists_the_choices(make_engine):
    engine = make_engine("llama")
    with pytest.raises(InvalidRequestError, match="prophet"):
        engine.answer(CHUNKS, QUERY, method="magic")


def test_empty_chunks_and_query(make_engine):
    engine = make_engine("llama")
    with pytest.raises(InvalidRequestError, match="chunks is empty"):
        engine.answer([], QUERY)
    with pytest.raises(InvalidRequestError, match="query is empty"):
        engine.answer(CHUNKS, "")


def test_request_longer_than_the_window(make_engine):
    engine = make_engine("llama", model_overrides={"max_position_embeddings": 64})
    with pytest.raises(ContextWindowError, match="context window"):
        engine.answer(CHUNKS, QUERY)


def test_chunk_longer_than_the_window(make_engine):
    engine = make_engine("llama", model_overrides={"max_position_embeddings": 64})
    with pytest.raises(ContextWindowError, match="chunk 0 .* split the document"):
        engine.ingest(["word " * 200])


def test_max_new_tokens_counts_against_the_window(make_engine):
    engine = make_engine("llama", model_overrides={"max_position_embeddings": 120})
    engine.answer(CHUNKS[:1], QUERY, generation=GenerationConfig(max_new_tokens=4))
    with pytest.raises(ContextWindowError, match="max_new_tokens"):
        engine.answer(CHUNKS[:1], QUERY, generation=GenerationConfig(max_new_tokens=100))


def test_reorder_needs_a_scored_method(make_engine):
    engine = make_engine("llama")
    with pytest.raises(InvalidRequestError, match="reorder_chunks"):
        engine.answer(CHUNKS, QUERY, selection=SelectionConfig(method="epic", reorder_chunks=True))


def test_infoflow_layer_out_of_range(make_engine):
    engine = make_engine("llama")
    with pytest.raises(InvalidRequestError, match="infoflow_layers"):
        engine.answer(CHUNKS, QUERY, selection=SelectionConfig(method="infoflow", infoflow_layers=(5,)))


def test_unwritable_store_directory(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="StoreConfig"):
        ProphetEngine(tiny_model("llama"), tiny_tokenizer(), store=StoreConfig(directory=blocker / "kv"))


def test_a_failed_request_leaves_the_store_intact(make_engine):
    engine = make_engine("llama")
    engine.ingest(CHUNKS)
    before = len(engine.store)
    with pytest.raises(InvalidRequestError):
        engine.answer(CHUNKS, QUERY, ratio=2.0)
    assert len(engine.store) == before
    assert engine.store.verify().removed == 0


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 256}}, "yarn"),
        ("mistral", {"sliding_window": 32}, "sliding-window"),
    ],
)
def test_unsupported_models_are_refused_at_construction(family, overrides, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ProphetEngine(tiny_model(family, **overrides), tiny_tokenizer(), store=None)


def test_unknown_architecture_is_refused():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer()))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        ProphetEngine(transformers.GPT2LMHeadModel(config), tiny_tokenizer(), store=None)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    ],
)
def test_scaled_rope_ratio_one_matches_full(make_engine, rope_parameters):
    import torch

    engine = make_engine("llama", model_overrides={"rope_parameters": rope_parameters})
    assert engine.adapter.model.model.rotary_emb.rope_type == rope_parameters["rope_type"]
    ids = engine.builder.layout(CHUNKS, QUERY).joined_ids()[None]
    with torch.no_grad():
        logits = engine.adapter.model(ids).logits[0, -1]
    answer = engine.answer(CHUNKS, QUERY, method="prophet", ratio=1.0, return_logits=True,
                           generation=GenerationConfig(max_new_tokens=1))
    torch.testing.assert_close(answer.first_token_logits, logits, atol=1e-5, rtol=1e-5)


def test_default_store_lives_under_the_cache_home(make_engine):
    engine = ProphetEngine(tiny_model("llama"), tiny_tokenizer())
    try:
        assert str(engine.store.directory).startswith(os.environ["PROPHET_RAG_HOME"])
    finally:
        engine.close()
