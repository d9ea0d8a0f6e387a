"""Tools, structured output and one-off documents over `prophet-rag serve` (the tiny model, whose answers are noise
unless a grammar holds them): the OpenAI wire format from the openai package and LangChain's `ChatOpenAI`, and
`ChatProphet(base_url=...)` giving the calls and values an in-process `ChatProphet` gives."""

from __future__ import annotations

import json

import openai
import pytest
from langchain_core.documents import Document

from prophet_rag import ProphetEngine, StoreConfig
from prophet_rag.client import ProphetClient
from serve_helpers import API_KEY
from tiny import QUERY

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
BUDGET = 120
"""Tokens for a call: the random model spells a 12-character argument in many small tokens."""


@pytest.fixture(scope="module")
def client(served_tools):
    with openai.OpenAI(base_url=served_tools.base_url, api_key=API_KEY, max_retries=0) as client:
        yield client


def _create(client, **body):
    extra = {name: body.pop(name) for name in ("grammar", "parse_tool_calls", "documents") if name in body}
    return client.chat.completions.create(model="tiny", temperature=0, max_tokens=body.pop("max_tokens", BUDGET),
                                          extra_body=extra or None, **body)


def _streamed_calls(stream) -> tuple[dict[int, dict], str | None]:
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    return calls, finish


# ---- the OpenAI wire format --------------------------------------------------------------------------------------

def test_required_tool_choice_always_returns_a_valid_call(client):
    response = _create(client, messages=ASK, tools=[WEATHER], tool_choice="required")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert len(calls) >= 1 and {c.function.name for c in calls} == {"get_weather"}
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and len(arguments["city"]) <= 12
        assert call.id and call.type == "function"


def test_a_named_tool_choice_calls_that_tool(client):
    response = _create(client, messages=ASK, tools=[WEATHER, TIME],
                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = response.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_time"}
    assert all(json.loads(c.function.arguments)["zone"] in ("UTC", "CET") for c in calls)


def test_one_call_when_parallel_calls_are_off(client):
    response = _create(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert len(response.choices[0].message.tool_calls) == 1


def test_streamed_calls_match_the_whole_answer(client):
    whole = _create(client, messages=ASK, tools=[WEATHER], tool_choice="required").choices[0].message.tool_calls
    calls, finish = _streamed_calls(_create(client, messages=ASK, tools=[WEATHER], tool_choice="required",
                                            stream=True))
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole]
    assert all(c["id"] for c in calls.values())


def test_tool_choice_none_answers_in_text(client):
    response = _create(client, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=6)
    choice = response.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert "<tool_call>" not in (choice.message.content or "")


def test_history_with_calls_and_results_is_taken(client):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."}]
    response = _create(client, messages=history, tools=[WEATHER], max_tokens=4)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert response.usage.prompt_tokens > _create(client, messages=ASK, max_tokens=1).usage.prompt_tokens


def test_json_schema_response_format_always_parses_and_matches(client):
    response = _create(client, messages=[{"role": "user", "content": "Alice is 31. Who is she?"}],
                       response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
                       max_tokens=60)
    value = json.loads(response.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and 0 <= value["age"] <= 120


def test_json_object_response_format_holds_the_answer_to_json(client):
    # A random model writes digits forever inside a number; the first tokens show the grammar held.
    response = _create(client, messages=ASK, response_format={"type": "json_object"}, max_tokens=8)
    text = response.choices[0].message.content
    assert text[0] in "{[" and "<" not in text


def test_a_grammar_field_holds_the_answer(client):
    response = _create(client, messages=ASK, grammar={"kind": "regex", "source": "(yes|no)"}, max_tokens=5)
    assert response.choices[0].message.content in ("yes", "no")


def test_unparsed_calls_come_back_as_the_models_text(client):
    response = _create(client, messages=ASK, tools=[WEATHER], tool_choice="required", parse_tool_calls=False)
    message = response.choices[0].message
    assert message.tool_calls is None and "<tool_call>" in message.content and "get_weather" in message.content


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"tool_choice": "required"}, "tool_choice", "without 'tools'"),
    ({"tools": [WEATHER], "tool_choice": "get_nothing"}, "tool_choice", "get_weather"),
    ({"tools": [{"type": "function"}]}, "tools", "tool"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "json_object"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "tool_choice 'none'"),
    ({"grammar": {"kind": "cobol"}}, "grammar", "grammar kind"),
    ({"grammar": {"kind": "regex", "source": ".*"}, "response_format": {"type": "json_object"}}, "grammar", "not both"),
    ({"parallel_tool_calls": "yes", "tools": [WEATHER]}, "parallel_tool_calls", "bool"),
])
def test_bad_structure_fields_are_refused_by_name(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        _create(client, messages=ASK, **body)
    error = caught.value.body
    assert error["param"] == param and words in error["message"]


def test_models_list_the_tool_format(served_tools):
    with ProphetClient(served_tools.base_url, API_KEY) as remote:
        assert remote.tool_format.family == "smollm2" and remote.tool_format.start == "<tool_call>"


# ---- one-off documents ------------------------------------------------------------------------------------------

def test_transient_documents_are_computed_and_not_stored(served_tools):
    one_off, kept = "A one-off note: the kiln is blue.", "A kept note: the kiln is red."
    with ProphetClient(served_tools.base_url, API_KEY) as remote:
        for _ in range(2):
            stream = remote.stream_chat([{"role": "user", "content": QUERY}], [one_off, kept], transient=[True, False])
            "".join(stream)
        stats = stream.answer.stats
    assert stats.cache_hits == 1 and stats.cache_misses == 1  # the kept note came back from the store


# ---- the frameworks' clients -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_engine(served_tools, tmp_path_factory):
    engine = ProphetEngine.from_pretrained(str(served_tools.model_dir), device="cpu",
                                           store=StoreConfig(directory=tmp_path_factory.mktemp("tools-kv")))
    yield engine
    engine.close()


def test_chat_openai_bind_tools_and_structured_output(served_tools):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=served_tools.base_url, api_key=API_KEY, model="tiny", max_tokens=BUDGET,
                      temperature=0, max_retries=0)
    message = chat.bind_tools([WEATHER], tool_choice="required").invoke("Weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert set(message.tool_calls[0]["args"]) == {"city"}
    person = chat.with_structured_output(PERSON | {"title": "person"}, method="json_schema").invoke("Alice is 31.")
    assert set(person) == {"name", "age"}


def test_chat_prophet_over_a_server_calls_tools_as_in_process(served_tools, local_engine):
    from prophet_rag.integrations.langchain import ChatProphet

    remote = ChatProphet(base_url=served_tools.base_url, api_key=API_KEY, max_new_tokens=BUDGET)
    local = ChatProphet(engine=local_engine, max_new_tokens=BUDGET)
    calls = [[(c["name"], c["args"]) for c in chat.bind_tools([WEATHER, TIME], tool_choice="get_time").invoke(
        "Time in Paris?").tool_calls] for chat in (remote, local)]
    assert calls[0] and calls[0] == calls[1] and {name for name, _ in calls[0]} == {"get_time"}


def test_chat_prophet_over_a_server_streams_tool_call_chunks(served_tools, local_engine):
    from prophet_rag.integrations.langchain import ChatProphet

    remote = ChatProphet(base_url=served_tools.base_url, api_key=API_KEY, max_new_tokens=BUDGET)
    bound = remote.bind_tools([WEATHER], tool_choice="required")
    streamed = None
    for piece in bound.stream("Weather in Paris?"):
        streamed = piece if streamed is None else streamed + piece
    whole = ChatProphet(engine=local_engine, max_new_tokens=BUDGET).bind_tools(
        [WEATHER], tool_choice="required").invoke("Weather in Paris?")
    assert streamed.tool_call_chunks and [(c["name"], c["args"]) for c in streamed.tool_calls] == [
        (c["name"], c["args"]) for c in whole.tool_calls]


def test_chat_prophet_over_a_server_gives_the_in_process_structured_value(served_tools, local_engine):
    from prophet_rag.integrations.langchain import ChatProphet

    values = [chat.with_structured_output(PERSON | {"title": "person"}, method="json_schema").invoke("Alice is 31.")
              for chat in (ChatProphet(base_url=served_tools.base_url, api_key=API_KEY, max_new_tokens=60),
                           ChatProphet(engine=local_engine, max_new_tokens=60))]
    assert values[0] == values[1] and set(values[0]) == {"name", "age"}


def test_an_agent_over_a_server_reuses_the_documents_its_retriever_tool_returned(served_tools):
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    from prophet_rag.integrations.langchain import ChatProphet

    notes = [Document(page_content="Widget 1 weighs 3 kg."), Document(page_content="Widget 2 weighs 5 kg.")]

    @tool(response_format="content_and_artifact")
    def search(query: str) -> tuple[str, list[Document]]:
        """Search the widget notes."""
        return "\n\n".join(note.page_content for note in notes), notes

    chat = ChatProphet(base_url=served_tools.base_url, api_key=API_KEY, max_new_tokens=BUDGET)
    caller = chat.bind_tools([search], tool_choice="any", max_string_chars=8)
    stats = []
    for question in ("What does widget 1 weigh?", "And widget 2?"):
        asked = [HumanMessage(question)]
        called = caller.invoke(asked)
        result = search.invoke(called.tool_calls[0])
        stats.append(chat.invoke([*asked, called, result], max_new_tokens=4).response_metadata["prophet_rag"])
    assert (stats[0]["cache_misses"], stats[0]["cache_hits"]) == (len(notes), 0)
    assert (stats[1]["cache_misses"], stats[1]["cache_hits"]) == (0, len(notes))


# ---- LlamaIndex ---------------------------------------------------------------------------------------------------

@pytest.fixture
def prophet_llms(served_tools, local_engine):
    import llama_index.core
    from llama_index.core import Settings

    from prophet_rag.integrations.llama_index import ProphetLLM

    kept = Settings._llm, llama_index.core.global_tokenizer
    yield (ProphetLLM(base_url=served_tools.base_url, api_key=API_KEY, max_new_tokens=BUDGET),
           ProphetLLM(engine=local_engine, max_new_tokens=BUDGET))
    Settings._llm, llama_index.core.global_tokenizer = kept


def _small_sum():
    from llama_index.core.tools import FunctionTool
    from pydantic import BaseModel, Field

    class Small(BaseModel):
        """Two small numbers."""

        a: int = Field(ge=0, le=9)
        b: int = Field(ge=0, le=9)

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    return FunctionTool.from_defaults(fn=add, fn_schema=Small)


def test_prophet_llm_over_a_server_calls_tools_as_in_process(prophet_llms):
    calls = [[(c.tool_name, c.tool_kwargs) for c in llm.get_tool_calls_from_response(
        llm.chat_with_tools([_small_sum()], user_msg="Add 2 and 3.", tool_required=True))] for llm in prophet_llms]
    assert calls[0] and calls[0] == calls[1] and calls[0][0][0] == "add"


def test_prophet_llm_over_a_server_predicts_and_calls(prophet_llms):
    remote, local = prophet_llms
    outputs = [llm.predict_and_call([_small_sum()], user_msg="Add 2 and 3.", tool_required=True)
               for llm in (remote, local)]
    (source,) = outputs[0].sources
    assert outputs[0].response == outputs[1].response == str(source.raw_input["kwargs"]["a"]
                                                             + source.raw_input["kwargs"]["b"])
