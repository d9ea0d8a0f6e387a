"""`ChatProphet(base_url=...)` and `ProphetLLM(base_url=...)` against a real `prophet-rag serve` (the tiny model):
the notebooks' RAG chains give the answers the in-process adapters give over the same model, with the documents
sent as documents, usage and statistics in the same places, streaming, and errors as the package's exceptions."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from prophet_rag import InvalidRequestError, ProphetEngine, StoreConfig
from prophet_rag.client import ProphetClient
from prophet_rag.errors import ServerAuthenticationError, ServerUnavailableError
from serve_helpers import API_KEY, free_port
from tiny import CHUNKS, QUERY

NEW = {"max_new_tokens": 6}
WINDOW = 4096


@pytest.fixture(scope="module")
def local_engine(served, tmp_path_factory):
    """The served model loaded in this process, with a store of its own."""
    engine = ProphetEngine.from_pretrained(str(served.model_dir), device="cpu",
                                           store=StoreConfig(directory=tmp_path_factory.mktemp("local-kv")))
    yield engine
    engine.close()


@pytest.fixture
def sent(monkeypatch):
    """The JSON bodies the client posts to /v1/chat/completions."""
    bodies = []
    original = ProphetClient._body

    def spy(self, *args):
        bodies.append(original(self, *args))
        return bodies[-1]

    monkeypatch.setattr(ProphetClient, "_body", spy)
    return bodies


# ---- LangChain ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chats(served, local_engine):
    from prophet_rag.integrations.langchain import ChatProphet

    return (ChatProphet(base_url=served.base_url, api_key=API_KEY, **NEW),
            ChatProphet(engine=local_engine, **NEW))


@pytest.fixture(scope="module")
def retriever():
    from langchain_community.retrievers import BM25Retriever

    return BM25Retriever.from_texts(list(CHUNKS), k=2)


def _stuff_chain(chat, retriever):
    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate([("system", "Answer from these notes:\n\n{context}"), ("human", "{input}")])
    return create_retrieval_chain(retriever, create_stuff_documents_chain(chat, prompt))


def test_chat_prophet_over_a_server_answers_a_plain_chat_as_in_process(chats):
    remote, local = chats
    assert remote.invoke("Hi there").content == local.invoke("Hi there").content


def test_retrieval_chain_sends_documents_as_documents_and_matches_in_process(chats, retriever, sent):
    remote, local = chats
    answer = _stuff_chain(remote, retriever).invoke({"input": QUERY})
    assert answer["answer"] == _stuff_chain(local, retriever).invoke({"input": QUERY})["answer"]
    body = sent[-1]
    assert body["documents"] == [doc.page_content for doc in answer["context"]]
    system = body["messages"][0]["content"]
    assert {"type": "documents"} in system and not any(doc in str(system) for doc in body["documents"])


def test_lcel_chain_matches_in_process_with_usage_and_statistics(chats, retriever):
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough

    prompt = ChatPromptTemplate([("human", "Question: {question}\nContext: {context}\nAnswer:")])

    def chain(chat):
        return {"context": retriever | (lambda docs: "\n\n".join(d.page_content for d in docs)),
                "question": RunnablePassthrough()} | prompt | chat

    remote, local = (chain(chat).invoke(QUERY) for chat in chats)
    assert remote.content == local.content
    assert remote.usage_metadata["input_tokens"] == local.usage_metadata["input_tokens"]
    assert remote.usage_metadata["output_tokens"] == local.usage_metadata["output_tokens"]
    # Both documents were computed by earlier tests on each side: cached on the server as in process.
    assert remote.usage_metadata["input_token_details"]["cache_read"] == (
        local.usage_metadata["input_token_details"]["cache_read"]) > 0
    stats = remote.response_metadata["prophet_rag"]
    assert stats["cache_hits"] + stats["cache_misses"] == 2 and stats["context_tokens"] > 0
    assert remote.response_metadata["finish_reason"] == local.response_metadata["finish_reason"]


def test_prophet_rag_runnable_streams_the_in_process_answer(chats, retriever):
    from langchain_core.runnables import RunnablePassthrough

    from prophet_rag.integrations.langchain import ProphetRAG

    remote, local = ({"context": retriever, "question": RunnablePassthrough()} | ProphetRAG(llm=chat, output="text")
                     for chat in chats)
    deltas = list(remote.stream(QUERY))
    assert len(deltas) > 1 and "".join(deltas) == local.invoke(QUERY)


def test_streamed_message_ends_with_usage_and_statistics(chats):
    remote, _ = chats
    chunks = list(remote.stream(QUERY))
    last = chunks[-1]
    assert last.usage_metadata["output_tokens"] == last.response_metadata["prophet_rag"]["new_tokens"]
    assert "".join(c.content for c in chunks) == remote.invoke(QUERY).content


def test_async_calls_and_batch(chats):
    remote, local = chats
    expected = local.invoke(QUERY).content
    assert asyncio.run(remote.ainvoke(QUERY)).content == expected
    assert [m.content for m in remote.batch([QUERY, QUERY])] == [expected, expected]


def test_token_counts_are_the_served_models(chats):
    from langchain_core.messages import HumanMessage, SystemMessage

    remote, local = chats
    messages = [SystemMessage("Be brief."), HumanMessage(QUERY)]
    assert remote.get_token_ids(QUERY) == local.get_token_ids(QUERY)
    assert remote.get_num_tokens_from_messages(messages) == local.get_num_tokens_from_messages(messages)


def test_per_call_options_reach_the_server(chats):
    remote, local = chats
    message = remote.invoke(QUERY, max_new_tokens=2, method="full")
    assert message.response_metadata["prophet_rag"]["new_tokens"] == 2
    assert message.content == local.invoke(QUERY, max_new_tokens=2, method="full").content


def test_the_text_llm_over_a_server_answers_as_in_process(served, local_engine):
    from prophet_rag.integrations.langchain import ProphetLangChainLLM

    remote = ProphetLangChainLLM(base_url=served.base_url, api_key=API_KEY, **NEW)
    local = ProphetLangChainLLM(engine=local_engine, **NEW)
    assert remote.invoke("Name a color.") == local.invoke("Name a color.")
    assert API_KEY not in repr(remote) and API_KEY not in str(remote.model_dump())


def test_a_request_the_server_refuses_raises_invalid_request(chats):
    remote, _ = chats
    with pytest.raises(InvalidRequestError, match="method"):
        remote.invoke(QUERY, method="nope")


# ---- LlamaIndex -----------------------------------------------------------------------------------------------------

@pytest.fixture
def llms(served, local_engine):
    import llama_index.core
    from llama_index.core import Settings

    from prophet_rag.integrations.llama_index import ProphetLLM

    saved = Settings._llm, llama_index.core.global_tokenizer
    # The tiny model's 512 positions are less than LlamaIndex's padding for compact mode: report more, as the
    # in-process adapter tests do; the requests themselves are short.
    yield (ProphetLLM(base_url=served.base_url, api_key=API_KEY, context_window=WINDOW, **NEW),
           ProphetLLM(engine=local_engine, set_global_tokenizer=False, context_window=WINDOW, **NEW))
    Settings._llm, llama_index.core.global_tokenizer = saved


def _node_retriever():
    from llama_index.core.schema import TextNode
    from llama_index.retrievers.bm25 import BM25Retriever

    return BM25Retriever.from_defaults(nodes=[TextNode(text=t) for t in CHUNKS], similarity_top_k=2)


def _query_engine(llm, streaming=False):
    from llama_index.core.query_engine import RetrieverQueryEngine

    from prophet_rag.integrations.llama_index import ProphetKVPostprocessor

    return RetrieverQueryEngine.from_args(_node_retriever(), llm=llm, streaming=streaming,
                                          node_postprocessors=[ProphetKVPostprocessor(llm=llm)])


def test_prophet_llm_query_engine_matches_in_process(llms, sent):
    remote, local = llms
    response = _query_engine(remote).query(QUERY)
    assert str(response) == str(_query_engine(local).query(QUERY))
    assert len(sent[-1]["documents"]) == 2
    [stats] = response.metadata["prophet_rag"]
    assert stats["cache_hits"] + stats["cache_misses"] == 2


def test_prophet_llm_chat_engine_matches_in_process(llms):
    from llama_index.core.chat_engine import ContextChatEngine

    from prophet_rag.integrations.llama_index import ProphetKVPostprocessor

    remote, local = (ContextChatEngine.from_defaults(retriever=_node_retriever(), llm=llm, system_prompt="Be brief.",
                                                     node_postprocessors=[ProphetKVPostprocessor(llm=llm)])
                     for llm in llms)
    reply = remote.chat(QUERY)
    assert str(reply) == str(local.chat(QUERY))
    assert str(remote.chat("And Beta?")) == str(local.chat("And Beta?"))  # with the first turn as history
    assert reply.metadata["prophet_rag"][0]["context_tokens"] > 0


def test_prophet_llm_streams_and_completes_as_in_process(llms):
    remote, local = llms
    streamed = _query_engine(remote, streaming=True).query(QUERY)
    assert "".join(streamed.response_gen) == str(_query_engine(local).query(QUERY))
    completion = remote.complete("Name a color.")
    assert completion.text == local.complete("Name a color.").text
    assert completion.raw["usage"]["output_tokens"] == completion.additional_kwargs["prophet_rag"]["new_tokens"]


def test_prophet_llm_metadata_and_tokenizer_come_from_the_server(llms, local_engine):
    from llama_index.core import Settings

    from prophet_rag.integrations.llama_index import ProphetLLM

    remote, _ = llms
    assert ProphetLLM(base_url=remote.base_url, api_key=API_KEY).metadata.context_window == (
        local_engine.context_window)
    assert Settings.tokenizer(QUERY) == local_engine.builder.encode(QUERY).tolist()


# ---- setup and errors -----------------------------------------------------------------------------------------------

def test_tokenize_needs_the_key_and_a_prompt_or_messages(served, local_engine):
    url = f"{served.base_url}/tokenize"
    assert httpx.post(url, json={"prompt": "Hi"}).status_code == 401
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for bad in ({}, {"prompt": "Hi", "messages": []}, {"prompt": 3}, {"text": "Hi"}):
        response = httpx.post(url, json=bad, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error", bad
    reply = httpx.post(url, json={"messages": [{"role": "user", "content": "Hi"}]}, headers=headers).json()
    assert reply["count"] == len(reply["tokens"]) > 0 and reply["max_model_len"] == local_engine.context_window


def test_base_url_with_a_local_model_is_refused(served, local_engine):
    from prophet_rag.integrations.langchain import ChatProphet

    with pytest.raises(InvalidRequestError, match="drop engine"):
        ChatProphet(base_url=served.base_url, api_key=API_KEY, engine=local_engine)


def test_a_wrong_key_fails_when_the_adapter_is_built(served):
    from prophet_rag.integrations.langchain import ChatProphet

    with pytest.raises(ServerAuthenticationError, match="api_key"):
        ChatProphet(base_url=served.base_url, api_key="wrong")


def test_no_server_is_a_retryable_error_naming_the_fix():
    with pytest.raises(ServerUnavailableError, match="prophet-rag serve") as raised:
        ProphetClient(f"http://127.0.0.1:{free_port()}/v1", max_retries=0)
    assert raised.value.retryable


def test_base_url_without_v1_and_bad_settings(served):
    with ProphetClient(served.url, API_KEY) as client:
        assert client.base_url == served.base_url
    with pytest.raises(InvalidRequestError, match="base_url"):
        ProphetClient("127.0.0.1:8000")
    with pytest.raises(InvalidRequestError, match="max_retries"):
        ProphetClient(served.base_url, API_KEY, max_retries=-1)


def test_eos_token_ids_are_refused_before_sending(served):
    from prophet_rag.config import GenerationConfig

    with ProphetClient(served.base_url, API_KEY) as client, pytest.raises(InvalidRequestError, match="eos_token_ids"):
        client.stream_chat([{"role": "user", "content": "Hi"}], generation=GenerationConfig(eos_token_ids=(1,)))


def test_overloaded_server_is_retried_then_retryable(scripted_server):
    from prophet_rag.config import GenerationConfig

    engine, server = scripted_server(max_in_flight=1, max_queue=0)
    three = GenerationConfig(max_new_tokens=3)
    with ProphetClient(server.url, max_retries=0, generation=three) as busy, \
            ProphetClient(server.url, max_retries=1, generation=three) as patient:
        first = busy.stream_chat([{"role": "user", "content": "first"}])
        with pytest.raises(ServerUnavailableError, match="503") as raised:
            busy.stream_chat([{"role": "user", "content": "second"}])
        assert raised.value.retryable and raised.value.retry_after_s == 1
        engine.release(10_000)
        assert "".join(first) == "t0 t1 t2 " and first.answer.stats.new_tokens == 3
        # Retried after the 503's Retry-After, it finds the worker free.
        assert "".join(patient.stream_chat([{"role": "user", "content": "third"}])) == "t0 t1 t2 "


def test_closing_a_stream_cancels_the_request_on_the_server(scripted_server):
    engine, server = scripted_server()
    with ProphetClient(server.url, max_retries=0) as client:
        stream = iter(client.stream_chat([{"role": "user", "content": "go"}]))
        engine.release(1)
        assert next(stream) == "t0 "
        stream.close()
        deadline = time.monotonic() + 10
        while "prophet_rag_requests_total{endpoint=\"/v1/chat/completions\",status=\"499\"} 1.0" not in (
                httpx.get(f"{server.url}/metrics").text) and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.release(1)  # the worker notices the cancellation at its next token
        assert engine.closed.wait(10) and engine.yielded == 2


def test_a_connection_broken_mid_answer_is_retryable(scripted_server):
    engine, server = scripted_server()
    with ProphetClient(server.url, max_retries=0) as client:
        stream = iter(client.stream_chat([{"role": "user", "content": "go"}]))
        engine.release(1)
        next(stream)
        server.server.force_exit = server.server.should_exit = True
        with pytest.raises(ServerUnavailableError, match="broke after 1"):
            list(stream)
