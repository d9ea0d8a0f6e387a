"""Tool specs in OpenAI shape, tool_choice spellings, call ids."""

from __future__ import annotations

import pytest

from prophet_rag.errors import InvalidRequestError
from prophet_rag.structured.tools import Tool, as_tools, new_call_id, tool_choice

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_a_tool_reads_the_openai_shape_and_its_inner_function():
    tool = Tool.from_openai(WEATHER)
    assert tool == Tool.from_openai(WEATHER["function"])
    assert tool.name == "get_weather" and tool.parameters["required"] == ["city"]
    assert tool.openai() == WEATHER


def test_a_tool_without_parameters_takes_no_arguments():
    tool = Tool.from_openai({"name": "now"})
    assert tool.parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "tag<|im_end|>", None, "naïve"])
def test_tool_names_must_be_plain(name):
    with pytest.raises(InvalidRequestError, match="letters, digits"):
        Tool(name)


def test_parameters_must_be_an_object_schema():
    with pytest.raises(InvalidRequestError, match="object"):
        Tool("f", parameters={"type": "string"})


def test_only_function_tools_are_taken():
    with pytest.raises(InvalidRequestError, match="function tools"):
        Tool.from_openai({"type": "web_search_preview"})


def test_tool_names_must_be_unique():
    with pytest.raises(InvalidRequestError, match="unique"):
        as_tools([WEATHER, WEATHER])


def test_tools_must_be_a_list():
    with pytest.raises(InvalidRequestError):
        as_tools(WEATHER)


@pytest.mark.parametrize(("given", "expected"), [
    (None, "auto"), ("auto", "auto"), ("none", "none"), ("required", "required"), ("any", "required"),
    (True, "required"), ("get_weather", "get_weather"),
    ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
    ({"name": "get_weather"}, "get_weather"),
])
def test_tool_choice_spellings(given, expected):
    assert tool_choice(given, as_tools([WEATHER])) == expected


@pytest.mark.parametrize("given", ["search", {"type": "function", "function": {"name": "search"}}, 3])
def test_a_tool_choice_naming_no_tool_is_refused(given):
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        tool_choice(given, as_tools([WEATHER]))


def test_required_needs_a_tool():
    with pytest.raises(InvalidRequestError, match="at least one tool"):
        tool_choice("required", ())


def test_call_ids():
    assert new_call_id().startswith("call_") and len(new_call_id()) == 29
    short = new_call_id(9, "")
    assert len(short) == 9 and short.isalnum()
    assert new_call_id() != new_call_id()
