"""Streaming tool-call parsing: chunks as the text arrives, agreeing with the parse of the whole text."""

from __future__ import annotations

import itertools
import json

import pytest
from test_formats import FORMATS, TOOLS

from prophet_rag.structured.stream import TextDelta, ToolCallChunk, ToolCallStream

TEXTS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius", '
               '"n": [1, {"a": "}"}]}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
               "</tool_call>"),
    "smollm2": ('<tool_call>[{"name": "get_weather", "arguments": {"city": "O\\"slo}", "unit": "celsius"}}, '
                '{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>'),
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
    "mistral": 'Sure [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]',
}


def run(family: str, text: str, size: int):
    n = itertools.count()
    stream = ToolCallStream(FORMATS[family], new_id=lambda: f"id{next(n)}")
    events = []
    for i in range(0, len(text), size):
        events += stream.feed(text[i:i + size])
    tail, parsed = stream.finish(TOOLS)
    return events + tail, parsed


def merged(events):
    """Chunks merged per index, as LangChain merges tool_call_chunks."""
    calls: dict[int, dict] = {}
    for e in events:
        if isinstance(e, ToolCallChunk):
            call = calls.setdefault(e.index, {"id": None, "name": None, "args": ""})
            call["id"] = call["id"] or e.id
            call["name"] = call["name"] or e.name
            call["args"] += e.arguments
    return [(c["name"], json.loads(c["args"]), c["id"]) for c in calls.values()]


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
@pytest.mark.parametrize("family", FORMATS)
def test_streamed_chunks_add_up_to_the_parsed_calls(family, size):
    events, parsed = run(family, TEXTS[family], size)
    assert parsed.tool_calls and not parsed.invalid_tool_calls
    assert merged(events) == [(c.name, c.arguments, c.id) for c in parsed.tool_calls]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text.strip() == parsed.content


def test_a_calls_name_and_id_arrive_before_its_arguments_end():
    text = TEXTS["hermes"]
    stream = ToolCallStream(FORMATS["hermes"], new_id=lambda: "x")
    cut = text.index('"unit"')
    events = stream.feed(text[:cut])
    named = [e for e in events if isinstance(e, ToolCallChunk) and e.name]
    assert [(e.index, e.name, e.id) for e in named] == [(0, "get_weather", "x")]
    assert "".join(e.arguments for e in events if isinstance(e, ToolCallChunk)) == '{"city": "Oslo", '


def test_text_that_may_open_a_call_is_held_back_until_it_cannot():
    stream = ToolCallStream(FORMATS["hermes"])
    assert stream.feed("Use a <too") == [TextDelta("Use a ")]
    assert stream.feed("l> or not") == [TextDelta("<tool> or not")]


def test_plain_text_streams_as_it_comes():
    stream = ToolCallStream(FORMATS["smollm2"])
    assert stream.feed("Hello") == [TextDelta("Hello")]
    assert stream.feed(" world") == [TextDelta(" world")]
    events, parsed = stream.finish()
    assert events == [] and parsed.content == "Hello world" and not parsed.tool_calls


def test_a_call_cut_short_is_reported_invalid_at_the_end():
    events, parsed = run("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os', 3)
    assert [e.name for e in events if isinstance(e, ToolCallChunk) and e.name] == ["get_weather"]
    assert not parsed.tool_calls and len(parsed.invalid_tool_calls) == 1
