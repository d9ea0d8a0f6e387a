"""ProphetLLM as a LlamaIndex FunctionCallingLLM (tiny random model, offline): tool calls decoded under the tools'
grammar, parsed into ToolCallBlocks, histories with calls and results, structured_predict and as_structured_llm."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

import llama_index.core
from llama_index.core import Settings
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from prophet_rag.integrations.llama_index import ProphetLLM

BUDGET = 120


@pytest.fixture(autouse=True)
def _llama_index_globals():
    llm, tokenizer = Settings._llm, llama_index.core.global_tokenizer
    yield
    Settings._llm, llama_index.core.global_tokenizer = llm, tokenizer


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


class Small(BaseModel):
    """Two small numbers."""

    a: int = Field(ge=0, le=9)
    b: int = Field(ge=0, le=9)


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=8)
    adult: bool


def _tools():
    # Bounded arguments: a random model writes digits forever where an integer has no bound.
    return [FunctionTool.from_defaults(fn=add, fn_schema=Small), FunctionTool.from_defaults(fn=weather)]


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", model_overrides={"max_position_embeddings": 2048})


@pytest.fixture
def llm(engine):
    return ProphetLLM(engine=engine, max_new_tokens=BUDGET)


def test_prophet_llm_declares_function_calling(llm):
    assert llm.metadata.is_function_calling_model and llm.metadata.is_chat_model


def test_a_required_tool_call_is_parsed_into_a_tool_selection(llm):
    response = llm.chat_with_tools(_tools(), user_msg="Add 2 and 3.", tool_required=True)
    (call,) = llm.get_tool_calls_from_response(response)
    assert call.tool_name in ("add", "weather") and call.tool_id
    assert set(call.tool_kwargs) == ({"a", "b"} if call.tool_name == "add" else {"city"})
    assert isinstance(response.message.blocks[-1], ToolCallBlock)
    assert response.additional_kwargs["prophet_rag"]["new_tokens"] > 0


def test_a_named_tool_choice_calls_that_tool(llm):
    response = llm.chat_with_tools(_tools(), user_msg="Hi", tool_choice="add")
    (call,) = llm.get_tool_calls_from_response(response)
    assert call.tool_name == "add" and all(0 <= call.tool_kwargs[k] <= 9 for k in "ab")


def test_no_tool_call_is_an_error_only_when_asked(llm):
    response = llm.chat_with_tools(_tools(), user_msg="Hi", tool_choice="none", max_new_tokens=8)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="expected at least one tool call"):
        llm.get_tool_calls_from_response(response)


def test_predict_and_call_runs_the_chosen_tool(llm):
    response = llm.predict_and_call([FunctionTool.from_defaults(fn=add, fn_schema=Small)], user_msg="Add 2 and 3.",
                                    tool_required=True)
    (source,) = response.sources
    assert source.tool_name == "add" and response.response == str(source.raw_input["kwargs"]["a"]
                                                                   + source.raw_input["kwargs"]["b"])


def test_streaming_with_tools_ends_with_the_parsed_call(llm):
    whole = llm.chat_with_tools(_tools(), user_msg="Add 2 and 3.", tool_required=True)
    responses = list(llm.stream_chat_with_tools(_tools(), user_msg="Add 2 and 3.", tool_required=True))
    (streamed,) = llm.get_tool_calls_from_response(responses[-1])
    (called,) = llm.get_tool_calls_from_response(whole)
    assert (streamed.tool_name, streamed.tool_kwargs) == (called.tool_name, called.tool_kwargs)
    assert all("<tool_call>" not in (r.delta or "") for r in responses)


def test_async_chat_with_tools_matches_sync(llm):
    whole = llm.chat_with_tools(_tools(), user_msg="Add 2 and 3.", tool_required=True)
    awaited = asyncio.run(llm.achat_with_tools(_tools(), user_msg="Add 2 and 3.", tool_required=True))
    assert [(c.tool_name, c.tool_kwargs) for c in llm.get_tool_calls_from_response(awaited)] == [
        (c.tool_name, c.tool_kwargs) for c in llm.get_tool_calls_from_response(whole)]


def test_a_history_with_calls_and_results_reaches_the_engine(llm, engine, monkeypatch):
    seen = []
    original = engine.stream_chat
    monkeypatch.setattr(engine, "stream_chat", lambda messages, *a, **k: seen.append(messages) or original(
        messages, *a, **k))
    call = ToolCallBlock(tool_call_id="call_7", tool_name="weather", tool_kwargs={"city": "Oslo"})
    history = [ChatMessage(role="user", content="Weather in Oslo?"), ChatMessage(role="assistant", blocks=[call]),
               ChatMessage(role="tool", content="sunny in Oslo", additional_kwargs={"tool_call_id": "call_7"})]
    llm.chat_with_tools(_tools(), chat_history=history, max_new_tokens=2)
    messages = seen[-1]
    assert messages[1]["tool_calls"] == [{"id": "call_7", "type": "function",
                                          "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    assert messages[2] == {"role": "tool", "content": "sunny in Oslo", "tool_call_id": "call_7"}


def test_structured_predict_gives_a_valid_instance(llm):
    person = llm.structured_predict(Person, PromptTemplate("Who is in: {text}?"), text="Maria, 41.")
    assert isinstance(person, Person) and len(person.name) <= 8


def test_as_structured_llm_answers_chat_with_the_instance_as_json(llm):
    response = llm.as_structured_llm(Small).chat([ChatMessage(role="user", content="Two numbers?")])
    assert isinstance(response.raw, Small) and Small.model_validate_json(response.message.content) == response.raw


# ---- nodes that arrive as tool results are cached chunks ---------------------------------------------------------


def _retriever_tool(llm):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.schema import TextNode
    from llama_index.core.tools import RetrieverTool, ToolMetadata

    from prophet_rag.integrations.llama_index import ProphetKVPostprocessor

    nodes = [TextNode(text=f"Fact {i}: widget {i} weighs {i} kg.") for i in range(3)]
    # Every question retrieves all three facts, whatever query a random model writes.
    retriever = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8)).as_retriever(similarity_top_k=3)
    metadata = ToolMetadata(name="search", description="Search the facts.", fn_schema=Query)
    return RetrieverTool(retriever, metadata, node_postprocessors=[ProphetKVPostprocessor(llm=llm)])


class Query(BaseModel):
    input: str = Field(max_length=8)


def _agent_turn(llm, search, question):
    """One retrieval round of an agent: a forced call of the retriever tool, its result, the answer."""
    asked = [ChatMessage(role="user", content=question)]
    called = llm.chat_with_tools([search], chat_history=list(asked), tool_required=True)
    (selection,) = llm.get_tool_calls_from_response(called)
    output = search.call(**selection.tool_kwargs)
    result = ChatMessage(role="tool", content=output.content, additional_kwargs={"tool_call_id": selection.tool_id})
    return llm.chat_with_tools([search], chat_history=[*asked, called.message, result], max_new_tokens=4)


def test_nodes_a_retriever_tool_returns_are_cached_chunks(llm):
    search = _retriever_tool(llm)
    first = _agent_turn(llm, search, "What does widget 1 weigh?")
    second = _agent_turn(llm, search, "And widget 2?")
    assert first.additional_kwargs["prophet_rag"]["cache_misses"] == 3
    assert second.additional_kwargs["prophet_rag"]["cache_hits"] == 3


def test_a_tool_result_with_no_registered_node_is_plain_text(llm, engine):
    _retriever_tool(llm)
    history = [ChatMessage(role="user", content="Hi"),
               ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="search",
                                                                   tool_kwargs={"input": "x"})]),
               ChatMessage(role="tool", content="Nothing found.", additional_kwargs={"tool_call_id": "c1"})]
    response = llm.chat(history, max_new_tokens=2)
    stats = response.additional_kwargs["prophet_rag"]
    assert (stats["cache_hits"], stats["cache_misses"], stats["method"]) == (0, 0, "full")
