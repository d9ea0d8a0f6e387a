"""The frameworks' own OpenAI clients against `prophet-rag serve`: LangChain's `ChatOpenAI` (documents through
`extra_body`) and LlamaIndex's `OpenAILike`, with the answers an in-process call gives."""

from __future__ import annotations

import asyncio

import openai
import pytest

from serve_helpers import API_KEY
from tiny import CHUNKS, QUERY


@pytest.fixture(scope="module")
def expected(served):
    """The server's own answer to the question over CHUNKS, 6 tokens, through the openai package."""
    with openai.OpenAI(base_url=served.base_url, api_key=API_KEY, max_retries=0) as client:
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUERY}],
                                              max_tokens=6, temperature=0, extra_body={"documents": list(CHUNKS)})


@pytest.fixture
def chat_openai(served):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=served.base_url, api_key=API_KEY, model="tiny", max_tokens=6, temperature=0,
                      max_retries=0, stream_usage=True, extra_body={"documents": list(CHUNKS)})


def test_chat_openai_invoke(chat_openai, expected):
    message = chat_openai.invoke(QUERY)
    assert message.content == expected.choices[0].message.content
    assert message.usage_metadata["input_tokens"] == expected.usage.prompt_tokens
    assert message.usage_metadata["input_token_details"]["cache_read"] == (
        expected.usage.prompt_tokens - expected.model_extra["prophet_rag"]["suffix_tokens"]
        - expected.model_extra["prophet_rag"]["recomputed_tokens"])


def test_chat_openai_stream_and_async(chat_openai, expected):
    streamed = list(chat_openai.stream(QUERY))
    assert "".join(chunk.content for chunk in streamed) == expected.choices[0].message.content
    assert sum((chunk.usage_metadata or {}).get("output_tokens", 0) for chunk in streamed) == (
        expected.usage.completion_tokens)
    assert asyncio.run(chat_openai.ainvoke(QUERY)).content == expected.choices[0].message.content


def test_chat_openai_in_a_chain_with_per_call_documents(served, expected):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(base_url=served.base_url, api_key=API_KEY, model="tiny", max_tokens=6, temperature=0,
                       max_retries=0)
    chain = ChatPromptTemplate([("human", "{question}")]) | model.bind(extra_body={"documents": list(CHUNKS)})
    assert (chain | StrOutputParser()).invoke({"question": QUERY}) == expected.choices[0].message.content


def test_llama_index_openai_like(served, expected):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(api_base=served.base_url, api_key=API_KEY, model="tiny", is_chat_model=True, max_tokens=6,
                     temperature=0, max_retries=0, additional_kwargs={"extra_body": {"documents": list(CHUNKS)}})
    messages = [ChatMessage(role="user", content=QUERY)]
    assert llm.chat(messages).message.content == expected.choices[0].message.content
    assert "".join(r.delta for r in llm.stream_chat(messages)) == expected.choices[0].message.content
    assert llm.complete(QUERY).text == expected.choices[0].message.content
