"""Reused prompt tokens reach each framework where it looks for them: LangChain's
`usage_metadata["input_token_details"]["cache_read"]`, LlamaIndex's `raw["usage"]` (tiny random model, offline)."""

from __future__ import annotations

import pytest

from prophet_rag.config import PrefixCacheConfig

QUESTION = "How heavy is widget 2?"
FACTS = [f"Fact {i}: widget {i} weighs {i} kg." for i in range(3)]


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", prefix_cache=PrefixCacheConfig(max_bytes=2**24, block_tokens=4))


def test_langchain_counts_a_conversations_earlier_turns_as_cache_read(engine):
    pytest.importorskip("langchain_core")
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from prophet_rag.integrations.langchain import ChatProphet

    chat = ChatProphet(engine=engine, max_new_tokens=4)
    history = [SystemMessage("Be brief."), HumanMessage("Hi")]
    first = chat.invoke(history)
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    second = chat.invoke([*history, AIMessage(first.content), HumanMessage(QUESTION)])
    stats = second.response_metadata["prophet_rag"]
    assert second.usage_metadata["input_token_details"]["cache_read"] == stats["cached_tokens"]
    assert stats["cached_tokens"] == stats["prefix_cache_tokens"] > first.usage_metadata["input_tokens"] // 2
    streamed = list(chat.stream([*history, AIMessage(first.content), HumanMessage(QUESTION)]))
    assert streamed[-1].usage_metadata["input_token_details"]["cache_read"] > 0


def test_langchain_counts_documents_from_a_tier_as_cache_read(engine):
    pytest.importorskip("langchain_core")
    from prophet_rag.integrations.langchain import ChatProphet, ProphetRAG

    rag = ProphetRAG(llm=ChatProphet(engine=engine, max_new_tokens=4))
    cold = rag.invoke({"context": FACTS, "question": QUESTION})
    warm = rag.invoke({"context": FACTS, "question": QUESTION})
    stats = warm.response_metadata["prophet_rag"]
    assert cold.usage_metadata["input_token_details"]["cache_read"] == 0
    assert warm.usage_metadata["input_token_details"]["cache_read"] == stats["cached_tokens"]
    assert stats["cache_hits"] == len(FACTS) and stats["cached_tokens"] >= stats["context_tokens"] - stats[
        "recomputed_tokens"] > 0


def test_llama_index_carries_cache_read_in_its_raw_usage(engine):
    pytest.importorskip("llama_index.core")
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
    from llama_index.core.llms import ChatMessage

    from prophet_rag.integrations.llama_index import ProphetLLM

    llm = ProphetLLM(engine=engine, max_new_tokens=4, set_global_tokenizer=False)
    counter = TokenCountingHandler()
    llm.callback_manager = CallbackManager([counter])
    history = [ChatMessage(role="user", content="Hi")]
    first = llm.chat(history)
    second = llm.chat([*history, ChatMessage(role="assistant", content=first.message.content),
                       ChatMessage(role="user", content=QUESTION)])
    stats = second.additional_kwargs["prophet_rag"]
    assert second.raw["usage"]["input_token_details"]["cache_read"] == stats["cached_tokens"]
    assert stats["prefix_cache_tokens"] > 0 and stats["cached_tokens"] == stats["prefix_cache_tokens"]
    assert counter.prompt_llm_token_count == first.raw["usage"]["input_tokens"] + second.raw["usage"]["input_tokens"]
