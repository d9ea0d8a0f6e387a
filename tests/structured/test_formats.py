"""Tool-call formats per family: detection, grammars for each tool_choice, parsing calls back."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch

from prophet_rag.structured.formats import ToolFormat, calls_list_schema, detect_family, tool_format
from prophet_rag.structured.grammar import Grammar, GrammarCache, TokenConstraint
from prophet_rag.structured.tools import InvalidToolCall, ToolCall, as_tools
from structured_helpers import family_tokenizer

TOOLS = as_tools([
    {"name": "get_weather", "description": "Weather now.", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}},
    {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}},
])
FORMATS = {
    "hermes": ToolFormat("hermes", True, "<tool_call>", end="</tool_call>"),
    "llama3": ToolFormat("llama3", True, '{"name"', args_key="parameters", parallel=False),
    "mistral": ToolFormat("mistral", True, "[TOOL_CALLS]"),
    "smollm2": ToolFormat("smollm2", False, "<tool_call>", end="</tool_call>"),
}
WEATHER_ARGS = {"city": "Oslo", "unit": "celsius"}
CALLS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]',
    "smollm2": '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]</tool_call>',
}
WRONG_ARGS = {f: c.replace('"celsius"', '"kelvin"') for f, c in CALLS.items()}
OTHER_TOOL = {f: c.replace("get_weather", "add").replace('{"city": "Oslo", "unit": "celsius"}', '{"a": 1, "b": 2}')
              for f, c in CALLS.items()}


def counter():
    n = itertools.count()
    return lambda: f"id{next(n)}"


# ---- detection -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "family"), [
    ("qwen2.5", "hermes"), ("llama3.1_json", "llama3"), ("mistral_official", "mistral"), (None, "smollm2"),
])
def test_the_family_is_read_from_the_chat_template(template, family):
    assert detect_family(family_tokenizer(template)) == family


def test_a_tokenizer_without_a_template_falls_back_to_the_smollm2_format():
    tok = family_tokenizer(None)
    tok.chat_template = None
    assert detect_family(tok) == "smollm2"


def test_mistral_uses_its_special_token_when_the_tokenizer_has_it():
    tok = family_tokenizer("mistral_official")
    assert tool_format(tok).start_id == tok.convert_tokens_to_ids("[TOOL_CALLS]")
    plain = family_tokenizer(None)
    plain.chat_template = tok.chat_template
    assert tool_format(plain).start_id is None


def test_llama_calls_carry_parameters_and_one_call_per_answer():
    fmt = tool_format(family_tokenizer("llama3.1_json"))
    assert fmt.args_key == "parameters" and not fmt.parallel


# ---- parsing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FORMATS)
def test_a_call_parses_into_name_arguments_and_id(family):
    parsed = FORMATS[family].parse(CALLS[family], TOOLS, new_id=counter())
    assert parsed.tool_calls == (ToolCall("get_weather", WEATHER_ARGS, "id0"),)
    assert parsed.invalid_tool_calls == () and parsed.content == ""


@pytest.mark.parametrize("family", FORMATS)
def test_text_before_a_call_is_content(family):
    parsed = FORMATS[family].parse("Let me look. " + CALLS[family], TOOLS, new_id=counter())
    assert parsed.content == "Let me look."
    assert [c.name for c in parsed.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("family", FORMATS)
def test_plain_text_has_no_calls(family):
    parsed = FORMATS[family].parse("It is sunny in Oslo.", TOOLS)
    assert parsed.content == "It is sunny in Oslo." and not parsed.tool_calls and not parsed.invalid_tool_calls


@pytest.mark.parametrize("family", FORMATS)
def test_a_call_of_an_unknown_tool_is_invalid(family):
    text = CALLS[family].replace("get_weather", "rm_rf")
    parsed = FORMATS[family].parse(text, TOOLS, new_id=counter())
    assert parsed.tool_calls == ()
    (invalid,) = parsed.invalid_tool_calls
    assert invalid.name == "rm_rf" and "unknown tool" in invalid.error and json.loads(invalid.arguments) == WEATHER_ARGS


@pytest.mark.parametrize("family", FORMATS)
def test_a_call_that_is_not_json_is_invalid_with_its_text(family):
    text = CALLS[family].replace('"unit": "celsius"', '"unit": celsius')
    (invalid,) = FORMATS[family].parse(text, TOOLS, new_id=counter()).invalid_tool_calls
    assert "not valid JSON" in invalid.error and "celsius" in invalid.arguments


def test_a_hermes_block_left_open_is_invalid():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os'
    parsed = FORMATS["hermes"].parse(text, TOOLS, new_id=counter())
    assert parsed.tool_calls == () and "not closed" in parsed.invalid_tool_calls[0].error


def test_arguments_written_as_a_json_string_are_decoded():
    text = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\", \\"unit\\": \\"celsius\\"}"}'
    parsed = FORMATS["hermes"].parse(text + "\n</tool_call>", TOOLS, new_id=counter())
    assert parsed.tool_calls == (ToolCall("get_weather", WEATHER_ARGS, "id0"),)


def test_arguments_that_are_not_an_object_are_invalid():
    text = '<tool_call>[{"name": "get_weather", "arguments": [1, 2]}]</tool_call>'
    (invalid,) = FORMATS["smollm2"].parse(text, TOOLS, new_id=counter()).invalid_tool_calls
    assert invalid == InvalidToolCall("get_weather", "[1, 2]", "id0", "arguments must be a JSON object")


def test_several_calls_keep_their_order_and_valid_ones_survive_an_invalid_neighbour():
    text = ('<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "nope", "arguments": {}}, '
            '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}]</tool_call>')
    parsed = FORMATS["smollm2"].parse(text, TOOLS, new_id=counter())
    assert [(c.name, c.id) for c in parsed.tool_calls] == [("add", "id0"), ("get_weather", "id2")]
    assert [(c.name, c.id) for c in parsed.invalid_tool_calls] == [("nope", "id1")]


def test_hermes_takes_one_block_per_call():
    text = CALLS["hermes"] + "\n" + OTHER_TOOL["hermes"]
    assert [c.name for c in FORMATS["hermes"].parse(text, TOOLS).tool_calls] == ["get_weather", "add"]


def test_llama_calls_may_follow_the_python_tag():
    parsed = FORMATS["llama3"].parse("<|python_tag|>" + CALLS["llama3"], TOOLS)
    assert [c.name for c in parsed.tool_calls] == ["get_weather"] and parsed.content == ""


def test_mistral_call_ids_are_nine_letters_and_digits():
    (call,) = FORMATS["mistral"].parse(CALLS["mistral"], TOOLS).tool_calls
    assert len(call.id) == 9 and call.id.isalnum()


# ---- grammars --------------------------------------------------------------------------------------------------

CACHE = GrammarCache()


def takes(fmt: ToolFormat, tok, grammar: Grammar, text: str) -> bool:
    """Whether the grammar takes `text` (tokenized with the family's special tokens) and then EOS."""
    c = TokenConstraint.build(grammar, tok, len(tok), [tok.eos_token_id], CACHE)
    for token in tok(text, add_special_tokens=False)["input_ids"]:
        if not c.allows(token):
            return False
        c.advance(token)
    return c.allows(tok.eos_token_id)


TOKENIZERS = {"hermes": "qwen2.5", "llama3": "llama3.1_json", "mistral": "mistral_official", "smollm2": None}


@pytest.fixture(scope="module", params=list(FORMATS))
def family(request):
    tok = family_tokenizer(TOKENIZERS[request.param])
    return request.param, tool_format(tok), tok


@pytest.mark.parametrize(("choice", "text", "call", "wrong", "other"), [
    ("auto", True, True, False, True),
    ("required", False, True, False, True),
    ("get_weather", False, True, False, False),
    ("none", True, False, False, False),
])
def test_each_tool_choice_takes_exactly_what_it_should(family, choice, text, call, wrong, other):
    name, fmt, tok = family
    grammar = fmt.grammar(TOOLS, choice)
    assert takes(fmt, tok, grammar, "It is sunny.") is text
    assert takes(fmt, tok, grammar, CALLS[name]) is call
    assert takes(fmt, tok, grammar, WRONG_ARGS[name]) is wrong
    assert takes(fmt, tok, grammar, OTHER_TOOL[name]) is other


@pytest.mark.parametrize("choice", ["required", "get_weather", "add"])
def test_required_and_named_choices_always_end_in_valid_calls(family, choice):
    """Whatever the logits, a constrained answer parses into calls of the listed tools and nothing invalid."""
    name, fmt, tok = family
    # One call per answer: with parallel calls, random logits may open call after call and never stop.
    grammar = replace(fmt, parallel=False).grammar(TOOLS, choice)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        c = TokenConstraint.build(grammar, tok, len(tok), [tok.eos_token_id], CACHE)
        out = []
        for _ in range(400):
            token = int(torch.argmax(c.mask(torch.randn(len(tok), generator=generator))))
            if token == tok.eos_token_id:
                break
            c.advance(token)
            out.append(token)
        else:
            pytest.fail("no EOS within 400 tokens")
        parsed = fmt.parse(tok.decode(out, skip_special_tokens=False), TOOLS)
        assert parsed.tool_calls and not parsed.invalid_tool_calls, tok.decode(out)
        if choice != "required":
            assert {c.name for c in parsed.tool_calls} == {choice}


def test_list_formats_hoist_each_tools_own_definitions():
    nested = as_tools([{"name": "book", "parameters": {
        "type": "object", "properties": {"guest": {"$ref": "#/$defs/Guest"}}, "required": ["guest"],
        "$defs": {"Guest": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}}}}])
    schema = calls_list_schema(nested)
    assert set(schema["$defs"]) == {"tool_0", "tool_0__Guest"}
    assert schema["$defs"]["tool_0"]["properties"]["guest"] == {"$ref": "#/$defs/tool_0__Guest"}
    fmt, tok = FORMATS["smollm2"], family_tokenizer(None)
    grammar = fmt.grammar(nested, "required")
    assert takes(fmt, tok, grammar, '<tool_call>[{"name": "book", "arguments": {"guest": {"age": 30}}}]</tool_call>')
    assert not takes(fmt, tok, grammar, '<tool_call>[{"name": "book", "arguments": {"guest": {"age": "x"}}}]'
                                        "</tool_call>")


@pytest.mark.parametrize("family", ["smollm2", "mistral"])
@pytest.mark.parametrize("choice", ["auto", "required"])
def test_list_families_take_one_block_of_calls(family, choice):
    tok = family_tokenizer(TOKENIZERS[family])
    fmt = tool_format(tok)
    grammar = fmt.grammar(TOOLS, choice)
    assert takes(fmt, tok, grammar, CALLS[family].replace('"celsius"}}', '"celsius"}}, {"name": "add", '
                                                                      '"arguments": {"a": 1, "b": 2}}'))
    assert not takes(fmt, tok, grammar, CALLS[family] + "\n" + CALLS[family])


def test_hermes_takes_one_block_per_parallel_call():
    tok = family_tokenizer("qwen2.5")
    fmt = tool_format(tok)
    assert takes(fmt, tok, fmt.grammar(TOOLS, "required"), CALLS["hermes"] + "\n" + OTHER_TOOL["hermes"])
    assert not takes(fmt, tok, replace(fmt, parallel=False).grammar(TOOLS, "required"),
                     CALLS["hermes"] + "\n" + OTHER_TOOL["hermes"])
