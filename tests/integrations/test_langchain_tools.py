"""ChatProphet with tools and structured output (tiny random model, offline): the grammar makes even a random model
answer with valid calls and schema-valid JSON, so the tests check that and the LangChain shapes around it."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")

from typing import Annotated, TypedDict

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from prophet_rag import InvalidRequestError
from prophet_rag.integrations.langchain import ChatProphet
from prophet_rag.integrations.langchain.messages import parsed_message
from prophet_rag.structured import as_tools

BUDGET = 120


@tool
def get_weather(city: Annotated[str, Field(max_length=8)]) -> str:
    """Get the weather in a city."""
    return "sunny"


@tool
def add(a: Annotated[int, Field(ge=0, le=9)], b: Annotated[int, Field(ge=0, le=9)]) -> int:
    """Add two small numbers."""
    return a + b


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


class PersonDict(TypedDict):
    """A person."""

    name: str
    adult: bool


PERSON_SCHEMA = {"title": "Person", "description": "A person.", "type": "object", "required": ["name", "adult"],
                 "properties": {"name": {"type": "string"}, "adult": {"type": "boolean"}}}
"""A random model writes digits forever where an integer has no bound; a boolean always ends."""


@pytest.fixture
def engine(make_engine):
    # The tool list goes into the system prompt: more than the tiny model's default 512 positions.
    return make_engine("llama", model_overrides={"max_position_embeddings": 2048})


@pytest.fixture
def chat(engine):
    return ChatProphet(engine=engine, max_new_tokens=BUDGET)


def test_bind_tools_binds_openai_format_tools_and_checks_tool_choice_at_once(chat):
    bound = chat.bind_tools([get_weather, add], tool_choice="add")
    assert [t["function"]["name"] for t in bound.kwargs["tools"]] == ["get_weather", "add"]
    assert bound.kwargs["tool_choice"] == "add"
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        chat.bind_tools([get_weather], tool_choice="missing")


def test_two_tools_of_one_name_bind_but_are_refused_when_called(chat):
    bound = chat.bind_tools([Person, Person.model_json_schema()])  # as LangChain's standard unit suite binds them
    with pytest.raises(InvalidRequestError, match="unique"):
        bound.invoke("Hi")


@pytest.mark.parametrize("choice", ["any", "required", True])
def test_a_required_tool_choice_always_gives_one_valid_call(chat, choice):
    message = chat.bind_tools([get_weather, add], tool_choice=choice).invoke("Weather in Oslo?")
    assert isinstance(message, AIMessage) and len(message.tool_calls) == 1 and not message.invalid_tool_calls
    call = message.tool_calls[0]
    assert call["name"] in ("get_weather", "add") and call["id"] and call["type"] == "tool_call"
    assert set(call["args"]) == ({"city"} if call["name"] == "get_weather" else {"a", "b"})
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_a_named_tool_choice_calls_that_tool_with_arguments_of_its_schema(chat):
    (call,) = chat.bind_tools([get_weather, add], tool_choice="add").invoke("Hi").tool_calls
    assert call["name"] == "add" and all(0 <= call["args"][k] <= 9 for k in ("a", "b"))


def test_tool_choice_none_answers_in_text(chat):
    message = chat.bind_tools([get_weather], tool_choice="none").invoke("Hi", max_new_tokens=12)
    assert message.tool_calls == [] and message.invalid_tool_calls == [] and "<tool_call>" not in message.content


def test_streaming_gives_tool_call_chunks_that_add_up_to_the_same_call(chat):
    bound = chat.bind_tools([get_weather, add], tool_choice="any")
    whole = bound.invoke("Weather in Oslo?").tool_calls[0]
    chunks = list(bound.stream("Weather in Oslo?"))
    assert any(c.tool_call_chunks for c in chunks)
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    (streamed,) = total.tool_calls
    assert (streamed["name"], streamed["args"]) == (whole["name"], whole["args"]) and streamed["id"]
    assert total.usage_metadata["output_tokens"] > 0


def test_what_does_not_parse_becomes_an_invalid_tool_call(engine):
    tools = as_tools([{"name": "add", "parameters": {"type": "object", "properties": {}}}])
    parsed = engine.tool_format.parse('<tool_call>[{"name": "nope", "arguments": {}}]</tool_call> and <tool_call>{',
                                      tools)
    message = parsed_message(parsed)
    assert message.tool_calls == [] and len(message.invalid_tool_calls) == 2
    assert "unknown tool" in message.invalid_tool_calls[0]["error"]


def test_an_agent_loop_history_reaches_the_engine_with_its_calls_and_results(chat, calls):
    history = [HumanMessage("Weather in Oslo?"),
               AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "toolu 01!"}]),
               ToolMessage("sunny", tool_call_id="toolu 01!", name="get_weather")]
    chat.bind_tools([get_weather]).invoke(history, max_new_tokens=4)
    messages = calls[-1]["messages"]
    call_id = messages[1]["tool_calls"][0]["id"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": call_id, "name": "get_weather"}
    assert call_id != "toolu 01!" and call_id.startswith("call_")  # a stand-in the templates may place


def test_tool_use_blocks_of_an_assistant_message_are_not_refused(chat, calls):
    ai = AIMessage([{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}],
                   tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "t1"}])
    chat.bind_tools([get_weather]).invoke([HumanMessage("Oslo?"), ai, ToolMessage("sunny", tool_call_id="t1")],
                                          max_new_tokens=2)
    assert calls[-1]["messages"][1]["content"] == "Checking."


def test_tools_add_their_tokens_to_the_count(chat):
    messages = [HumanMessage("Weather in Oslo?")]
    assert chat.get_num_tokens_from_messages(messages, tools=[get_weather]) > chat.get_num_tokens_from_messages(
        messages) + 20


@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_structured_output_of_a_pydantic_model_is_an_instance(chat, method):
    person = chat.with_structured_output(Person, method=method).invoke("Maria is 41.")
    assert isinstance(person, Person) and len(person.name) <= 8 and 0 <= person.age <= 120


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_of_a_typed_dict_or_json_schema_is_a_dict(chat, method):
    for schema in (PersonDict, PERSON_SCHEMA):
        value = chat.with_structured_output(schema, method=method, max_string_chars=8).invoke("Maria is 41.")
        assert set(value) == {"name", "adult"} and isinstance(value["adult"], bool) and len(value["name"]) <= 8


def test_structured_output_streams_partial_dicts_ending_with_the_whole(chat):
    chunks = list(chat.with_structured_output(PersonDict, max_string_chars=8).stream("Maria is 41."))
    assert chunks and set(chunks[-1]) == {"name", "adult"}
    assert all(set(c) <= {"name", "adult"} for c in chunks)


def test_include_raw_returns_the_message_the_value_and_no_error(chat):
    out = chat.with_structured_output(Person, include_raw=True).invoke("Maria is 41.")
    assert isinstance(out["raw"], AIMessage) and isinstance(out["parsed"], Person) and out["parsing_error"] is None
    assert Person.model_validate_json(out["raw"].content) == out["parsed"]


def test_include_raw_reports_an_answer_cut_by_the_budget_as_a_parsing_error(engine):
    short = ChatProphet(engine=engine, max_new_tokens=3)
    out = short.with_structured_output(Person, include_raw=True).invoke("Maria is 41.")
    assert out["parsed"] is None and out["parsing_error"] is not None


def test_structured_output_refuses_unknown_methods_and_arguments(chat):
    with pytest.raises(InvalidRequestError, match="method must be"):
        chat.with_structured_output(Person, method="xml")
    with pytest.raises(InvalidRequestError, match="unsupported"):
        chat.with_structured_output(Person, colour="red")


# ---- documents that arrive as tool results are cached chunks ----------------------------------------------------

FACTS = [f"Fact {i}: widget {i} weighs {i} kg." for i in range(3)]


def _retriever_tool(response_format):
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.tools import create_retriever_tool
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=8))
    store.add_texts(FACTS)
    # Every question retrieves all three facts, whatever query a random model writes.
    retriever = store.as_retriever(search_kwargs={"k": len(FACTS)})
    return create_retriever_tool(retriever, "search", "Search the facts.", response_format=response_format)


def _agent_turn(chat, search, question):
    """One retrieval round of an agent: a forced call of the retriever tool, its result, the answer."""
    asked = [HumanMessage(question)]
    ai = chat.bind_tools([search], tool_choice="any", max_string_chars=8).invoke(asked)
    result = search.invoke(ai.tool_calls[0])
    return chat.invoke([*asked, ai, result], max_new_tokens=4)


def test_documents_a_retriever_tool_returns_as_artifact_are_cached_chunks(chat, calls):
    search = _retriever_tool("content_and_artifact")
    first = _agent_turn(chat, search, "What does widget 1 weigh?")
    second = _agent_turn(chat, search, "And widget 2?")
    assert sorted(calls[-1]["documents"]) == FACTS and calls[-1]["messages"][2]["role"] == "tool"
    assert first.response_metadata["prophet_rag"]["cache_misses"] == len(FACTS)
    assert second.response_metadata["prophet_rag"]["cache_hits"] == len(FACTS)


def test_documents_of_a_content_only_retriever_tool_are_found_within_the_run(chat, calls):
    from langchain_core.runnables import RunnableLambda

    search = _retriever_tool("content")
    agent = RunnableLambda(lambda question: _agent_turn(chat, search, question))
    agent.invoke("What does widget 1 weigh?")
    second = agent.invoke("And widget 2?")
    assert sorted(calls[-1]["documents"]) == FACTS
    assert second.response_metadata["prophet_rag"]["cache_hits"] == len(FACTS)


def test_a_langgraph_agent_reuses_the_documents_of_its_retriever_tool(chat):
    pytest.importorskip("langgraph")
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    search = _retriever_tool("content_and_artifact")
    caller = chat.bind_tools([search], tool_choice="any", max_string_chars=8)
    graph = StateGraph(MessagesState)
    graph.add_node("retrieve", lambda state: {"messages": [caller.invoke(state["messages"])]})
    graph.add_node("tools", ToolNode([search]))
    graph.add_node("answer", lambda state: {"messages": [chat.invoke(state["messages"], max_new_tokens=4)]})
    graph.add_edge(START, "retrieve")
    graph.add_edge("retrieve", "tools")
    graph.add_edge("tools", "answer")
    graph.add_edge("answer", END)
    agent = graph.compile()
    stats = [agent.invoke({"messages": [HumanMessage(q)]})["messages"][-1].response_metadata["prophet_rag"]
             for q in ("What does widget 1 weigh?", "And widget 2?")]
    assert (stats[0]["cache_misses"], stats[0]["cache_hits"]) == (len(FACTS), 0)
    assert (stats[1]["cache_misses"], stats[1]["cache_hits"]) == (0, len(FACTS))
