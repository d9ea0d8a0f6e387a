"""ProphetLangChainLLM and ProphetRAG in LCEL chains (tiny random model, in-memory retriever, no network).

The model's output is gibberish, so the tests check structure: which chunks and query reach the engine, cache hits,
callbacks, and that invoke, stream, batch and async give the same greedy text.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from prophet_rag import GenerationConfig, InvalidRequestError
from prophet_rag.integrations.langchain import PLAIN_QUERY, ProphetLangChainLLM, ProphetRAG

QUESTION = "How heavy is widget 2?"
NEW_TOKENS = 8
FACTS = [f"Fact {i}: widget {i} weighs {i} kg." for i in range(5)]


@pytest.fixture
def engine(make_engine):
    return make_engine("llama")


@pytest.fixture
def llm(engine):
    return ProphetLangChainLLM(engine=engine, max_new_tokens=NEW_TOKENS)


@pytest.fixture
def retriever():
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=8))
    store.add_texts(FACTS)
    return store.as_retriever(search_kwargs={"k": 3})


@pytest.fixture
def chain(llm, retriever):
    return {"context": retriever, "question": RunnablePassthrough()} | ProphetRAG(llm=llm) | StrOutputParser()


def reference(engine, chunks, query=QUESTION) -> str:
    """The greedy text `engine.answer` gives for this request with the LLM's defaults."""
    return engine.answer(chunks, query, method="prophet", ratio=0.2,
                         generation=GenerationConfig(max_new_tokens=NEW_TOKENS)).text


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.llm_starts = 0

    def on_llm_start(self, serialized, prompts, **kwargs) -> None:
        self.llm_starts += 1

    def on_llm_new_token(self, token, **kwargs) -> None:
        self.tokens.append(token)


# ---- the LLM on its own -------------------------------------------------------------------------------------------


def test_identifying_params_and_type(llm, engine):
    assert llm._llm_type == "prophet-rag"
    assert llm._identifying_params["model_name"] == engine.model_name
    assert llm._identifying_params["method"] == "prophet"


@pytest.mark.parametrize("bad", [{"ratio": -0.1}, {"method": "nope"}, {"temperature": -1.0}])
def test_bad_settings_fail_at_construction(engine, bad):
    with pytest.raises(InvalidRequestError):
        ProphetLangChainLLM(engine=engine, **bad)


def test_plain_invoke_answers_the_prompt_with_full_prefill(llm, engine, calls):
    text = llm.invoke("Tell me about widgets.")
    assert (calls[-1]["chunks"], calls[-1]["query"], calls[-1]["method"]) == (
        ["Tell me about widgets."], PLAIN_QUERY, "full")
    expected = engine.answer(["Tell me about widgets."], PLAIN_QUERY, method="full",
                             generation=GenerationConfig(max_new_tokens=NEW_TOKENS))
    assert text == expected.text


def test_rag_kwargs_take_the_chunked_path(llm, engine, calls):
    text = llm.invoke("rendered prompt", rag_query=QUESTION, rag_chunks=FACTS[:3])
    assert calls[-1]["chunks"] == FACTS[:3] and calls[-1]["query"] == QUESTION
    assert calls[-1]["method"] == "prophet"
    assert text == reference(engine, FACTS[:3])


def test_rag_kwargs_must_come_together(llm):
    with pytest.raises(InvalidRequestError, match="together"):
        llm.invoke("prompt", rag_query=QUESTION)


def test_stream_calls_on_llm_new_token_for_every_delta(llm):
    recorder = Recorder()
    deltas = list(llm.stream("p", config={"callbacks": [recorder]}, rag_query=QUESTION, rag_chunks=FACTS[:3]))
    assert deltas and recorder.tokens == deltas
    assert "".join(deltas) == llm.invoke("p", rag_query=QUESTION, rag_chunks=FACTS[:3])


def test_stop_strings_end_generation(llm):
    full = llm.invoke("p", rag_query=QUESTION, rag_chunks=FACTS[:3])
    stop = full.strip()[:2]
    stopped = llm.invoke("p", stop=[stop], rag_query=QUESTION, rag_chunks=FACTS[:3])
    assert stop not in stopped and len(stopped) < len(full)


# ---- ProphetRAG in a chain ---------------------------------------------------------------------------------------


def test_invoke_sends_each_document_as_its_own_chunk(chain, engine, calls):
    text = chain.invoke(QUESTION)
    assert len(calls) == 1
    chunks = calls[0]["chunks"]
    assert len(chunks) == 3 and set(chunks) <= set(FACTS)
    assert calls[0]["query"] == QUESTION
    assert text == reference(engine, chunks)


def test_second_invoke_hits_the_cache(chain, calls):
    chain.invoke(QUESTION)
    chain.invoke(QUESTION)
    first, second = (c["stream"].answer.stats for c in calls)
    assert (first.cache_hits, first.cache_misses) == (0, 3)
    assert (second.cache_hits, second.cache_misses) == (3, 0)


def test_stream_deltas_join_to_invoke(chain):
    deltas = list(chain.stream(QUESTION))
    assert len(deltas) > 1
    assert "".join(deltas) == chain.invoke(QUESTION)


def test_batch_matches_invoke(chain):
    questions = [QUESTION, "Which widget weighs 4 kg?"]
    assert chain.batch(questions) == [chain.invoke(q) for q in questions]


def test_async_invoke_and_stream_match_invoke(chain):
    async def run():
        done = await chain.ainvoke(QUESTION)
        deltas = [delta async for delta in chain.astream(QUESTION)]
        return done, "".join(deltas)

    done, streamed = asyncio.run(run())
    assert done == streamed == chain.invoke(QUESTION)


def test_callbacks_see_one_llm_run_with_its_tokens(chain):
    recorder = Recorder()
    deltas = list(chain.stream(QUESTION, config={"callbacks": [recorder]}))
    assert recorder.llm_starts == 1
    assert recorder.tokens == deltas


@pytest.mark.parametrize("key", ["question", "input"])
def test_accepts_strings_documents_and_alternative_keys(llm, calls, key):
    rag = ProphetRAG(llm=llm)
    rag.invoke({"documents": [Document(page_content=FACTS[0]), FACTS[1]], key: QUESTION})
    assert calls[-1]["chunks"] == FACTS[:2] and calls[-1]["query"] == QUESTION


def test_rendered_prompt_reaches_callbacks(llm):
    prompts = []

    class Prompts(BaseCallbackHandler):
        def on_llm_start(self, serialized, p, **kwargs) -> None:
            prompts.extend(p)

    ProphetRAG(llm=llm).invoke({"context": FACTS[:2], "question": QUESTION}, config={"callbacks": [Prompts()]})
    assert prompts == [f"Answer the question using the documents below.\n\n{FACTS[0]}\n\n{FACTS[1]}\n\n"
                       f"Question: {QUESTION}"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("just a string", "takes a dict"),
        ({"context": FACTS}, "question"),
        ({"context": FACTS, "question": "  "}, "question"),
        ({"question": QUESTION}, "list of Documents or strings"),
        ({"context": "joined text", "question": QUESTION}, "not a joined string"),
        ({"context": [], "question": QUESTION}, "empty 'context'"),
        ({"context": [FACTS[0], 3], "question": QUESTION}, "context document 1"),
        ({"context": [Document(page_content=" ")], "question": QUESTION}, "context document 0"),
    ],
)
def test_bad_input_names_the_problem(llm, value, message):
    with pytest.raises(ValueError, match=message):
        ProphetRAG(llm=llm).invoke(value)
