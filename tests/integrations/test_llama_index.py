"""ProphetLLM, ProphetKVPostprocessor and ProphetSynthesizer inside real LlamaIndex query engines (tiny random model).

The model's output is gibberish, so the tests check structure: which chunks and query reach the engine, cache hits,
and that every path (compact, strict, streaming, async) produces the same greedy text as `engine.answer`.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

from prophet_rag import GenerationConfig, InvalidRequestError
from prophet_rag.integrations.llama_index import (
    PLAIN_QUERY,
    ChunkRegistry,
    ProphetKVPostprocessor,
    ProphetLLM,
    ProphetSynthesizer,
)

QUESTION = "How heavy is widget 2?"
NEW_TOKENS = 8
# Compact mode reserves ~500 tokens of padding, so the tiny model gets a window LlamaIndex can pack into.
WINDOW = 2048


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", model_overrides={"max_position_embeddings": WINDOW})


@pytest.fixture
def llm(engine):
    return ProphetLLM(engine=engine, max_new_tokens=NEW_TOKENS)


@pytest.fixture
def index():
    # The metadata header puts a blank line inside every node's text, as real file loaders do.
    docs = [
        Document(text=f"Fact {i}: widget {i} weighs {i} kg.\n\nIt is sold in shop {i}.", metadata={"source": f"d{i}"})
        for i in range(5)
    ]
    return VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))


@pytest.fixture
def settings_llm():
    """Restores `Settings.llm` after a test that sets it."""
    saved = Settings._llm
    yield
    Settings._llm = saved


def node_texts(response) -> list[str]:
    return [n.node.get_content(metadata_mode=MetadataMode.LLM).strip() for n in response.source_nodes]


def reference(engine, chunks, query=QUESTION) -> str:
    """The greedy text `engine.answer` gives for this request with ProphetLLM's defaults."""
    return engine.answer(chunks, query, method="prophet", ratio=0.2,
                         generation=GenerationConfig(max_new_tokens=NEW_TOKENS)).text


# ---- the LLM on its own -------------------------------------------------------------------------------------------


def test_metadata_reports_the_models_true_window(llm, engine):
    meta = llm.metadata
    assert meta.context_window == engine.adapter.spec.max_positions == WINDOW
    assert meta.num_output == NEW_TOKENS
    assert meta.model_name == engine.model_name
    assert ProphetLLM(engine=engine, context_window=1000).metadata.context_window == 1000


@pytest.mark.parametrize("bad", [{"ratio": 2.0}, {"method": "nope"}, {"max_new_tokens": 0}])
def test_bad_settings_fail_at_construction(engine, bad):
    with pytest.raises(InvalidRequestError):
        ProphetLLM(engine=engine, **bad)


def test_plain_complete_answers_the_prompt_as_one_document_with_full_prefill(llm, engine, calls):
    response = llm.complete("Tell me about widgets.")
    assert calls[-1]["chunks"] == ["Tell me about widgets."]
    assert calls[-1]["query"] == PLAIN_QUERY
    assert calls[-1]["method"] == "full"
    assert response.additional_kwargs["stats"]["method"] == "full"
    expected = engine.answer(["Tell me about widgets."], PLAIN_QUERY, method="full",
                             generation=GenerationConfig(max_new_tokens=NEW_TOKENS))
    assert response.text == expected.text


def test_stream_complete_deltas_join_to_complete(llm):
    responses = list(llm.stream_complete("Tell me about widgets."))
    assert "".join(r.delta for r in responses) == responses[-1].text == llm.complete("Tell me about widgets.").text


def test_async_complete_and_stream_match_sync(llm):
    async def run():
        done = await llm.acomplete("Tell me about widgets.")
        deltas = [r.delta async for r in await llm.astream_complete("Tell me about widgets.")]
        return done.text, "".join(deltas)

    done, streamed = asyncio.run(run())
    assert done == streamed == llm.complete("Tell me about widgets.").text


def test_acomplete_reports_one_llm_event(llm):
    handler = LlamaDebugHandler()
    llm.callback_manager = CallbackManager([handler])
    asyncio.run(llm.acomplete("Tell me about widgets."))
    assert len(handler.get_event_pairs(CBEventType.LLM)) == 1


def test_empty_plain_prompt_is_refused(llm):
    with pytest.raises(InvalidRequestError, match="chunk 0"):
        llm.complete("   ")


# ---- segmentation ------------------------------------------------------------------------------------------------


def test_segment_takes_the_longest_registered_run():
    registry = ChunkRegistry()
    registry.add("  header\n\nbody one  ")
    registry.add("body two")
    context = "header\n\nbody one\n\nbody two\n\nloose\n\n\n\ntail"
    assert registry.segment(context) == ["header\n\nbody one", "body two", "loose", "tail"]


def test_segment_keeps_a_registered_text_with_blank_lines_inside():
    registry = ChunkRegistry()
    registry.add("a\n\n\n\nb")
    assert registry.segment("x\n\na\n\n\n\nb") == ["x", "a\n\n\n\nb"]


def test_registry_forgets_the_oldest_text_past_its_bound():
    registry = ChunkRegistry(max_entries=2)
    for text in ("one\n\n1", "two\n\n2", "three\n\n3"):
        registry.add(text)
    assert len(registry) == 2
    assert "one\n\n1" not in registry and "three\n\n3" in registry
    assert registry.segment("one\n\n1") == ["one", "1"]


# ---- the postprocessor -------------------------------------------------------------------------------------------


def test_postprocessor_ingests_registers_and_returns_nodes_unchanged(llm, engine):
    nodes = [NodeWithScore(node=TextNode(text=f"Node {i}.\n\nMore about {i}."), score=1.0) for i in range(3)]
    out = ProphetKVPostprocessor(llm=llm).postprocess_nodes(nodes)
    assert out is nodes and [n.node.text for n in out] == [f"Node {i}.\n\nMore about {i}." for i in range(3)]
    assert all(n.node.text in llm.registry for n in nodes)
    assert engine.ingest([n.node.text for n in nodes]) == 0  # already stored


def test_postprocessor_without_a_prophet_llm_says_how_to_fix(settings_llm):
    Settings._llm = None
    with pytest.raises(InvalidRequestError, match="Settings.llm = ProphetLLM"):
        ProphetKVPostprocessor()


# ---- query engines -----------------------------------------------------------------------------------------------


def test_compact_query_sends_each_node_as_its_own_cached_chunk(llm, engine, index, calls):
    qe = index.as_query_engine(llm=llm, node_postprocessors=[ProphetKVPostprocessor(llm=llm)], similarity_top_k=3)
    response = qe.query(QUESTION)
    assert len(calls) == 1
    assert calls[0]["chunks"] == node_texts(response) and len(node_texts(response)) == 3
    assert calls[0]["query"] == QUESTION and calls[0]["method"] == "prophet"
    stats = calls[0]["stream"].answer.stats
    assert (stats.cache_hits, stats.cache_misses) == (3, 0)  # the postprocessor stored them
    assert response.response == reference(engine, node_texts(response))


def test_compact_query_without_postprocessor_still_answers_from_blank_line_pieces(llm, index, calls):
    response = index.as_query_engine(llm=llm, similarity_top_k=3).query(QUESTION)
    pieces = [piece for text in node_texts(response) for piece in text.split("\n\n")]
    assert calls[-1]["chunks"] == pieces
    assert calls[-1]["stream"].answer.stats.cache_misses == len(pieces)


def test_settings_llm_and_default_postprocessor(llm, index, calls, settings_llm):
    Settings.llm = llm
    qe = index.as_query_engine(node_postprocessors=[ProphetKVPostprocessor()], similarity_top_k=3)
    response = qe.query(QUESTION)
    assert calls[-1]["chunks"] == node_texts(response)
    assert calls[-1]["stream"].answer.stats.cache_hits == 3


def test_streaming_query_matches_the_engine(llm, engine, index, calls):
    qe = index.as_query_engine(llm=llm, node_postprocessors=[ProphetKVPostprocessor(llm=llm)], similarity_top_k=3,
                               streaming=True)
    response = qe.query(QUESTION)
    text = "".join(response.response_gen)
    assert calls[0]["chunks"] == node_texts(response)
    assert text == reference(engine, node_texts(response))


def test_aquery_matches_query(llm, index, calls):
    qe = index.as_query_engine(llm=llm, node_postprocessors=[ProphetKVPostprocessor(llm=llm)], similarity_top_k=3)
    response = asyncio.run(qe.aquery(QUESTION))
    assert calls[-1]["chunks"] == node_texts(response)
    assert calls[-1]["stream"].answer.stats.cache_hits == 3
    assert response.response == qe.query(QUESTION).response


def test_request_does_not_leak_into_later_plain_calls(llm, index, calls):
    qe = index.as_query_engine(llm=llm, node_postprocessors=[ProphetKVPostprocessor(llm=llm)], similarity_top_k=3)
    qe.query(QUESTION)
    llm.complete("plain")
    assert [c["method"] for c in calls] == ["prophet", "full"]


def test_refine_mode_answers_each_node_with_the_answer_so_far(llm, index, calls):
    qe = index.as_query_engine(llm=llm, node_postprocessors=[ProphetKVPostprocessor(llm=llm)], similarity_top_k=3,
                               response_mode="refine")
    response = qe.query(QUESTION)
    texts = node_texts(response)
    assert [c["chunks"][-1] for c in calls] == texts
    assert calls[0]["chunks"] == texts[:1]
    for previous, call in zip(calls, calls[1:], strict=False):
        assert call["chunks"][:-1] == [f"Existing answer: {previous['stream'].answer.text}"]


# ---- strict mode -------------------------------------------------------------------------------------------------


def test_synthesizer_makes_one_call_over_exactly_the_nodes(llm, engine, index, calls):
    qe = index.as_query_engine(llm=llm, response_synthesizer=ProphetSynthesizer(llm=llm), similarity_top_k=3)
    response = qe.query(QUESTION)
    assert len(calls) == 1 and calls[0]["chunks"] == node_texts(response)
    assert response.response == reference(engine, node_texts(response))


def test_synthesizer_streams_sync_and_async(llm, engine, index):
    synthesizer = ProphetSynthesizer(llm=llm, streaming=True)
    qe = index.as_query_engine(llm=llm, response_synthesizer=synthesizer, similarity_top_k=3)
    response = qe.query(QUESTION)
    expected = reference(engine, node_texts(response))
    assert "".join(response.response_gen) == expected

    async def run():
        streaming = await qe.aquery(QUESTION)
        return "".join([delta async for delta in streaming.async_response_gen()])

    assert asyncio.run(run()) == expected


def test_synthesizer_async_matches_sync(llm, index):
    qe = index.as_query_engine(llm=llm, response_synthesizer=ProphetSynthesizer(llm=llm), similarity_top_k=3)
    assert asyncio.run(qe.aquery(QUESTION)).response == qe.query(QUESTION).response


def test_synthesizer_exposes_its_prompt(llm):
    synthesizer = ProphetSynthesizer(llm=llm)
    assert set(synthesizer.get_prompts()) == {"text_qa_template"}
