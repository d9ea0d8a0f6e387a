"""ProphetLLM, ProphetKVPostprocessor and ProphetSynthesizer inside real LlamaIndex query and chat engines (tiny
random model, offline).

The model's output is gibberish, so the tests check structure: the messages and documents that reach the engine,
what is stored, cache hits, the statistics on responses, and that the sync, streaming and async paths agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import warnings

import pytest

pytest.importorskip("llama_index.core")

import llama_index.core
from llama_index.core import Document, PromptTemplate, Settings, VectorStoreIndex
from llama_index.core.base.llms.types import ImageBlock
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler, TokenCountingHandler
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import ChatMessage
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

from prophet_rag import ContextWindowError, InvalidRequestError
from prophet_rag.integrations.llama_index import (
    ProphetKVPostprocessor,
    ProphetLLM,
    ProphetSynthesizer,
    SynthesisError,
)
from prophet_rag.layout import DOCUMENTS

QUESTION = "How heavy is widget 2?"
NEW_TOKENS = 6
# Compact mode reserves ~500 tokens of padding, so the tiny model gets a window LlamaIndex can pack into.
WINDOW = 2048
MODES = ("compact", "refine", "simple_summarize", "tree_summarize", "accumulate")


@pytest.fixture(autouse=True)
def _llama_index_globals():
    """Restores what a test may change: Settings.llm and the global tokenizer ProphetLLM sets."""
    llm, tokenizer = Settings._llm, llama_index.core.global_tokenizer
    yield
    Settings._llm, llama_index.core.global_tokenizer = llm, tokenizer


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


def query_engine(llm, index, **kwargs):
    kwargs.setdefault("similarity_top_k", 3)
    return index.as_query_engine(llm=llm, node_postprocessors=[ProphetKVPostprocessor(llm=llm)], **kwargs)


def node_texts(response) -> list[str]:
    return [n.node.get_content(metadata_mode=MetadataMode.LLM).strip() for n in response.source_nodes]


def user_content(call) -> list:
    return next(m["content"] for m in call["messages"] if m["role"] == "user")


def numeric_index(nodes: int = 4):
    rng = random.Random(0)
    texts = [" ".join(str(rng.randrange(10**9, 10**10)) for _ in range(40)) for _ in range(nodes)]
    return VectorStoreIndex.from_documents([Document(text=t) for t in texts], embed_model=MockEmbedding(embed_dim=8))


# ---- 1. errors surface ----------------------------------------------------------------------------------------


def test_a_window_error_raises_instead_of_an_empty_response(engine):
    # A window larger than the model's lets LlamaIndex pack more than fits: the engine refuses the request, and
    # the refine synthesizer used to turn that ValueError into "Empty Response".
    llm = ProphetLLM(engine=engine, max_new_tokens=NEW_TOKENS, context_window=WINDOW * 8)
    with pytest.raises(SynthesisError, match="ContextWindowError") as raised:
        query_engine(llm, numeric_index(6), similarity_top_k=6).query(QUESTION)
    assert isinstance(raised.value.__cause__, ContextWindowError)
    assert not isinstance(raised.value, ValueError)


def test_an_invalid_method_set_on_the_llm_raises(llm, index):
    llm.method = "nope"
    with pytest.raises(SynthesisError, match="unknown method 'nope'"):
        query_engine(llm, index).query(QUESTION)


def test_llamaindex_packs_by_the_models_token_counts(engine, calls):
    # Numbers take twice as many tokens in the model's tokenizer as in LlamaIndex's default (tiktoken): packed by
    # tiktoken's counts, the four nodes overflow the window; by the model's own, compact mode splits them.
    llm = ProphetLLM(engine=engine, max_new_tokens=NEW_TOKENS)
    assert Settings.tokenizer("3141592653 5897932384") == llm.token_ids("3141592653 5897932384")
    response = query_engine(llm, numeric_index(), similarity_top_k=4).query(QUESTION)
    assert len(calls) >= 2 and response.response
    assert all(c["stream"].answer.stats.cache_misses >= 1 for c in calls)


def test_without_the_models_token_counts_the_overflow_raises(engine):
    llm = ProphetLLM(engine=engine, max_new_tokens=NEW_TOKENS, set_global_tokenizer=False)
    llama_index.core.global_tokenizer = None  # LlamaIndex's default: tiktoken
    with pytest.raises(SynthesisError, match="context window"):
        query_engine(llm, numeric_index(), similarity_top_k=4).query(QUESTION)


# ---- 2. plain calls are plain ---------------------------------------------------------------------------------


def test_is_a_chat_model_with_the_models_true_window(llm, engine):
    meta = llm.metadata
    assert meta.is_chat_model and meta.context_window == engine.context_window == WINDOW
    assert (meta.num_output, meta.model_name) == (NEW_TOKENS, engine.model_name)
    assert ProphetLLM(engine=engine, context_window=1000).metadata.context_window == 1000


def test_plain_complete_is_one_user_message_answered_with_full_prefill(llm, engine, calls):
    response = llm.complete("List three colors, one per line.")
    assert calls[-1]["messages"] == [{"role": "user", "content": "List three colors, one per line."}]
    assert calls[-1]["documents"] == [] and response.additional_kwargs["prophet_rag"]["method"] == "full"
    assert response.text == engine.chat(calls[-1]["messages"], generation=llm.configs({})[1]).text
    assert len(engine.store) == 0


def test_system_prompt_opens_plain_calls_unless_formatted(engine, calls):
    llm = ProphetLLM(engine=engine, max_new_tokens=NEW_TOKENS, system_prompt="You are a pirate.")
    llm.complete("Hi")
    llm.complete("Hi", formatted=True)
    llm.chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")])
    assert [c["messages"][0] for c in calls] == [{"role": "system", "content": "You are a pirate."},
                                                 {"role": "user", "content": "Hi"},
                                                 {"role": "system", "content": "Be brief."}]


def test_chat_passes_every_role_to_the_chat_template(llm, calls):
    messages = [ChatMessage(role="system", content="S"), ChatMessage(role="user", content="U1"),
                ChatMessage(role="assistant", content="A1"), ChatMessage(role="user", content="U2")]
    llm.chat(messages)
    assert calls[-1]["messages"] == [{"role": m.role.value, "content": m.content} for m in messages]
    assert calls[-1]["documents"] == []


def test_stream_and_async_match_the_plain_answer(llm):
    done = llm.complete("Tell me about widgets.").text
    streamed = list(llm.stream_complete("Tell me about widgets."))
    assert "".join(r.delta for r in streamed) == streamed[-1].text == done

    async def run():
        chat = await llm.achat([ChatMessage(role="user", content="Tell me about widgets.")])
        deltas = [r.delta async for r in await llm.astream_chat([ChatMessage(role="user", content="Tell me about "
                                                                                                    "widgets.")])]
        return chat.message.content, "".join(deltas)

    assert asyncio.run(run()) == (done, done)


def test_acomplete_reports_one_llm_event(llm):
    handler = LlamaDebugHandler()
    llm.callback_manager = CallbackManager([handler])
    asyncio.run(llm.acomplete("Tell me about widgets."))
    assert len(handler.get_event_pairs(CBEventType.LLM)) == 1


def test_prompt_rules_the_chat_template_replaces_are_refused(engine):
    with pytest.raises(InvalidRequestError, match="messages_to_prompt"):
        ProphetLLM(engine=engine, messages_to_prompt=lambda messages: "x")


def test_non_text_content_is_refused(llm):
    message = ChatMessage(role="user", blocks=[ImageBlock(url="https://example.invalid/a.png")])
    with pytest.raises(InvalidRequestError, match="ImageBlock"):
        llm.chat([message])


# ---- 3. the framework's templates, system prompt and history reach the model ----------------------------------


def test_a_custom_text_qa_template_lays_out_the_request(llm, index, calls):
    template = PromptTemplate("Facts:\n{context_str}\n\nQ: {query_str}\nA:")
    response = query_engine(llm, index, text_qa_template=template).query(QUESTION)
    assert calls[0]["messages"] == [{"role": "user", "content": ["Facts:\n", DOCUMENTS, f"Q: {QUESTION}\nA:"]}]
    assert calls[0]["documents"] == node_texts(response) and not calls[0]["transient_prefix"]


def test_a_question_before_the_documents_makes_a_one_off_prefix(llm, index, engine, calls):
    template = PromptTemplate("Q: {query_str}\nFacts:\n{context_str}\nA:")
    query_engine(llm, index, text_qa_template=template).query(QUESTION)
    stored = len(engine.store)
    query_engine(llm, index, text_qa_template=template).query("Which widget weighs 4 kg?")
    assert calls[-1]["transient_prefix"] and len(engine.store) == stored


@pytest.mark.parametrize("mode", ["context", "condense_plus_context"])
def test_chat_engines_send_their_system_prompt_and_history(llm, index, calls, mode):
    chat_engine = index.as_chat_engine(chat_mode=mode, llm=llm, system_prompt="Always answer in French.",
                                       node_postprocessors=[ProphetKVPostprocessor(llm=llm)], similarity_top_k=2)
    first = chat_engine.chat(QUESTION)
    chat_engine.chat("And widget 3?")
    last = calls[-1]
    system = last["messages"][0]
    assert system["role"] == "system" and DOCUMENTS in system["content"]
    assert "Always answer in French." in system["content"][-1]
    assert [(m["role"], m["content"]) for m in last["messages"][1:]] == [
        ("user", QUESTION), ("assistant", first.response), ("user", "And widget 3?")]
    assert last["stream"].answer.stats.cache_hits == len(last["documents"]) == 2


# ---- 4. reuse in every response mode; one-off text is never stored --------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_response_mode_computes_each_node_once_then_reuses_it(llm, index, calls, mode):
    # A fresh store: the calls of the first query compute every node (misses), those of the second find them all.
    response = query_engine(llm, index, response_mode=mode).query(QUESTION)
    first = list(calls)
    calls.clear()
    query_engine(llm, index, response_mode=mode).query(QUESTION)
    assert first and {d for c in first for d in c["documents"]} == set(node_texts(response))
    assert [c["stream"].answer.stats.cache_hits for c in first] == [0] * len(first)
    assert sum(c["stream"].answer.stats.cache_misses for c in first) == len(set(node_texts(response)))
    for call in calls:
        stats = call["stream"].answer.stats
        assert not any(call["transient"]) and (stats.cache_hits, stats.cache_misses) == (len(call["documents"]), 0)


def test_refine_keeps_the_answer_so_far_out_of_the_store(llm, index, engine, calls):
    # The answer so far comes before the new context in this template, so each refine step's prefix is one-off.
    refine = PromptTemplate("Answer so far: {existing_answer}\nMore context:\n{context_msg}\nQuery: {query_str}\n")
    query_engine(llm, index, response_mode="refine", refine_template=refine).query(QUESTION)
    assert [c["transient_prefix"] for c in calls] == [False, True, True]
    stored = len(engine.store)
    query_engine(llm, index, response_mode="refine", refine_template=refine).query(QUESTION)
    assert len(engine.store) == stored


def test_without_the_postprocessor_warns_once_and_stores_no_fragment(llm, index, engine, calls):
    with pytest.warns(UserWarning, match="ProphetKVPostprocessor") as caught:
        index.as_query_engine(llm=llm, similarity_top_k=3).query(QUESTION)
        index.as_query_engine(llm=llm, similarity_top_k=3).query(QUESTION)
    assert len([w for w in caught if "ProphetKVPostprocessor" in str(w.message)]) == 1
    assert all(all(c["transient"]) for c in calls)
    assert len(engine.store) == 1  # the template's prefix; no node fragment


def test_repacked_pieces_are_one_off_fragments(engine, index, calls):
    llm = ProphetLLM(engine=engine, max_new_tokens=NEW_TOKENS, context_window=900)  # compact mode must repack
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the postprocessor is there: no warning
        query_engine(llm, index).query(QUESTION)
    assert len(calls) > 1 and any(any(c["transient"]) for c in calls)


# ---- 5. statistics and usage on every response ----------------------------------------------------------------


def test_query_responses_carry_each_calls_statistics(llm, index, calls):
    qe = query_engine(llm, index)
    response = qe.query(QUESTION)
    [stats] = response.metadata["prophet_rag"]
    assert stats == calls[0]["stream"].answer.stats.to_dict()  # the engine's own shape
    assert (stats["cache_hits"], stats["cache_misses"]) == (0, 3)  # a fresh store: computed in this call
    streaming = query_engine(llm, index, streaming=True).query(QUESTION)
    assert "".join(streaming.response_gen) == response.response
    assert streaming.metadata["prophet_rag"][0]["cache_hits"] == 3

    async def run():
        return await qe.aquery(QUESTION)

    assert asyncio.run(run()).metadata["prophet_rag"][0]["cache_hits"] == 3


@pytest.mark.parametrize("mode", ["context", "condense_plus_context"])
def test_chat_engine_responses_carry_each_calls_statistics(llm, index, calls, mode):
    chat_engine = index.as_chat_engine(chat_mode=mode, llm=llm, similarity_top_k=2,
                                       node_postprocessors=[ProphetKVPostprocessor(llm=llm)])
    first = chat_engine.chat(QUESTION)
    assert [(s["cache_hits"], s["cache_misses"]) for s in first.metadata["prophet_rag"]] == [(0, 2)]
    chat_engine.reset()
    again = chat_engine.chat(QUESTION)
    assert [(s["cache_hits"], s["cache_misses"]) for s in again.metadata["prophet_rag"]] == [(2, 0)]
    # Later turns: condense_plus_context first condenses the conversation into a question, a call of its own.
    calls.clear()
    streamed = chat_engine.stream_chat(QUESTION)
    "".join(streamed.response_gen)
    reports = streamed.metadata["prophet_rag"]
    assert reports == [c["stream"].answer.stats.to_dict() for c in calls]
    assert [r["method"] for r in reports] == ["full", "prophet_focus"][2 - len(calls):]

    async def run():
        return await chat_engine.achat(QUESTION)

    assert asyncio.run(run()).metadata["prophet_rag"][-1]["cache_hits"] == 2


def test_llm_responses_carry_statistics_where_agents_read_them(llm):
    # ReActAgent passes each step's ChatResponse.raw on as AgentOutput.raw.
    response = llm.chat([ChatMessage(role="user", content="Hi")])
    assert response.raw["prophet_rag"] == response.additional_kwargs["prophet_rag"]

    async def last_streamed():
        return [r async for r in await llm.astream_chat([ChatMessage(role="user", content="Hi")])][-1]

    assert asyncio.run(last_streamed()).raw["prophet_rag"]["method"] == "full"


def test_agent_steps_carry_their_calls_statistics(llm, calls):
    from llama_index.core.agent.workflow import AgentOutput, ReActAgent

    async def run():
        handler = ReActAgent(tools=[], llm=llm).run(user_msg="Hi", max_iterations=2)
        steps = [event async for event in handler.stream_events() if isinstance(event, AgentOutput)]
        with contextlib.suppress(Exception):  # the tiny model's gibberish may exhaust the iterations
            await handler
        return steps

    steps = asyncio.run(run())
    assert steps and [step.raw["prophet_rag"] for step in steps] == [
        c["stream"].answer.stats.to_dict() for c in calls][:len(steps)]


def test_llm_responses_carry_usage_and_statistics(llm):
    counter = TokenCountingHandler()
    llm.callback_manager = CallbackManager([counter])
    response = llm.chat([ChatMessage(role="user", content="Hi")])
    stats = response.additional_kwargs["prophet_rag"]
    assert response.raw["usage"]["input_tokens"] == stats["suffix_tokens"] == counter.prompt_llm_token_count
    assert response.raw["usage"]["output_tokens"] == stats["new_tokens"] == counter.completion_llm_token_count
    last = list(llm.stream_chat([ChatMessage(role="user", content="Hi")]))[-1]
    assert last.delta == "" and last.additional_kwargs["prophet_rag"]["new_tokens"] == stats["new_tokens"]


# ---- 6. settings and per-call options -------------------------------------------------------------------------


def test_per_call_options_apply(llm):
    assert llm.complete("Hi", max_new_tokens=2).additional_kwargs["prophet_rag"]["new_tokens"] == 2
    full = llm.complete("Hi").text
    stopped = llm.complete("Hi", stop=[full.strip()[:2]]).text
    assert full.strip()[:2] not in stopped and len(stopped) < len(full)


@pytest.mark.parametrize(("bad", "message"), [({"foo": 1}, "unknown option"), ({"ratio": 3.0}, "ratio"),
                                              ({"max_new_tokens": "8"}, "max_new_tokens must be an integer")])
def test_bad_per_call_options_are_refused(llm, bad, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.complete("Hi", **bad)


@pytest.mark.parametrize("bad", [{"ratio": 2.0}, {"method": "nope"}, {"max_new_tokens": 0}, {"foo": 1},
                                 {"generate_kwargs": {"do_sample": True}}])
def test_bad_settings_fail_at_construction(engine, bad):
    with pytest.raises(InvalidRequestError):
        ProphetLLM(engine=engine, **bad)


def test_settings_accept_the_common_names(engine):
    llm = ProphetLLM(engine=engine, max_tokens=3, device_map="cpu", generate_kwargs={"top_k": 5})
    assert (llm.max_new_tokens, llm.device) == (3, "cpu")
    assert llm.configs({})[1].top_k == 5


# ---- the postprocessor and strict mode ------------------------------------------------------------------------


def test_postprocessor_registers_and_returns_nodes_unchanged(llm, engine):
    nodes = [NodeWithScore(node=TextNode(text=f"Node {i}.\n\nMore about {i}."), score=1.0) for i in range(3)]
    out = ProphetKVPostprocessor(llm=llm).postprocess_nodes(nodes)
    assert out is nodes and all(n.node.text in llm.registry for n in nodes)
    assert len(engine.store) == 0  # computed by the LLM call that uses them, which then counts them as misses


@pytest.mark.parametrize("blank", ["  \n\t", "\u200b"])
def test_an_empty_retrieved_node_is_refused(llm, blank):
    # The synthesizers would drop it from the context and answer from what is left, or from nothing.
    nodes = [TextNode(text="Fact 1: widget 1 weighs 1 kg."), TextNode(text=blank)]
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))
    with pytest.raises(InvalidRequestError, match=r"retrieved node \d is empty.*Drop empty documents"):
        query_engine(llm, index, similarity_top_k=2).query(QUESTION)


def test_postprocessor_without_a_prophet_llm_says_how_to_fix():
    Settings._llm = None
    with pytest.raises(InvalidRequestError, match="Settings.llm = ProphetLLM"):
        ProphetKVPostprocessor()


def test_synthesizer_makes_one_call_over_exactly_the_nodes(llm, index, calls):
    qe = index.as_query_engine(llm=llm, response_synthesizer=ProphetSynthesizer(llm=llm), similarity_top_k=3)
    response = qe.query(QUESTION)
    assert len(calls) == 1 and calls[0]["documents"] == node_texts(response)
    assert response.metadata["prophet_rag"][0]["cache_misses"] == 3
    streaming = ProphetSynthesizer(llm=llm, streaming=True)
    streamed = index.as_query_engine(llm=llm, response_synthesizer=streaming, similarity_top_k=3).query(QUESTION)
    assert "".join(streamed.response_gen) == response.response

    async def run():
        return (await qe.aquery(QUESTION)).response

    assert asyncio.run(run()) == response.response


def test_synthesizer_uses_its_text_qa_template(llm, calls):
    template = PromptTemplate("Read:\n{context_str}\nThen answer: {query_str}")
    ProphetSynthesizer(llm=llm, text_qa_template=template).get_response(QUESTION, ["A.", "B."])
    assert calls[-1]["messages"] == [{"role": "user", "content": ["Read:\n", DOCUMENTS, f"Then answer: {QUESTION}"]}]
    assert calls[-1]["documents"] == ["A.", "B."]


@pytest.mark.parametrize(("query", "chunks", "message"), [("q", [None], "text chunk 0"), ("q", ["a", " "], "chunk 1"),
                                                          ("q", "joined", "non-empty list"), (" ", ["a"], "question")])
def test_synthesizer_refuses_bad_input_with_the_fix(llm, query, chunks, message):
    with pytest.raises(InvalidRequestError, match=message):
        ProphetSynthesizer(llm=llm).get_response(query, chunks)
