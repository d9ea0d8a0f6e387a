"""Parsing a chat-completions body (where the documents go, what is refused), the server's settings and API key,
and the engine's count of cached prompt tokens behind `usage.prompt_tokens_details.cached_tokens`."""

from __future__ import annotations

import json

import pytest

from prophet_rag.config import DEFAULT_INSTRUCTION, GenerationConfig, PromptConfig
from prophet_rag.errors import InvalidRequestError
from prophet_rag.layout import DOCUMENTS, PromptBuilder
from prophet_rag.serve.config import API_KEY_ENV, ServeConfig, read_api_key
from prophet_rag.serve.openai_api import APIError, parse_chat_body
from tiny import CHUNKS, QUERY

DEFAULTS = GenerationConfig(max_new_tokens=64)
RAG = PromptBuilder(None, PromptConfig(system_prompt="ignored: the request's own messages stay"))


def parse(config: ServeConfig | None = None, **body):
    return parse_chat_body(json.dumps(body).encode(), DEFAULTS, config or ServeConfig(), RAG.rag_messages)


def test_the_last_user_message_is_laid_out_as_engine_answer_lays_out_a_question():
    call = parse(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                           {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}],
                 documents=["a", {"text": "b"}, {"title": "T", "text": "c", "id": 3}])
    messages = call.request.messages
    assert call.request.documents == ("a", "b", "c")
    assert messages[3]["content"] == [DEFAULT_INSTRUCTION + "\n\n", DOCUMENTS, "Question: second"]
    assert [m["content"] for m in messages[:3]] == ["Be brief.", "first", "ok"] and len(messages) == 4


def test_a_documents_part_marks_their_place_and_text_parts_join():
    call = parse(messages=[{"role": "developer", "content": [{"type": "text", "text": "Notes:"},
                                                              {"type": "text", "text": "read them"},
                                                              {"type": "documents"}]},
                           {"role": "user", "content": "q"}], documents=["a"])
    assert call.request.messages[0] == {"role": "system", "content": ["Notes:\nread them", DOCUMENTS]}
    assert call.request.messages[1]["content"] == "q"


def test_a_documents_part_without_documents_is_refused():
    with pytest.raises(APIError, match="'documents' is empty"):
        parse(messages=[{"role": "user", "content": [{"type": "documents"}, {"type": "text", "text": "q"}]}])


def test_decoding_options_follow_the_body():
    call = parse(messages=[{"role": "user", "content": "q"}], temperature=0.7, top_p=0.9, seed=5, top_k=4,
                 max_completion_tokens=9, stop="\n", method="reuse", ratio=0.3, n=1, user="u-1")
    generation = call.request.generation
    assert (generation.temperature, generation.top_p, generation.seed, generation.top_k) == (0.7, 0.9, 5, 4)
    assert (generation.max_new_tokens, generation.stop) == (9, ("\n",))
    assert (call.request.method, call.request.ratio) == ("reuse", 0.3)


def test_without_options_the_engine_defaults_and_the_servers_max_tokens_hold():
    generation = parse(ServeConfig(max_tokens=17), messages=[{"role": "user", "content": "q"}]).request.generation
    assert generation.max_new_tokens == 17 and generation.temperature == DEFAULTS.temperature == 0.0
    assert parse(messages=[{"role": "user", "content": "q"}], max_tokens=5).request.generation.max_new_tokens == 5


def test_a_bad_value_for_the_engine_is_its_own_error():
    with pytest.raises(InvalidRequestError, match="top_p"):
        parse(messages=[{"role": "user", "content": "q"}], top_p=0)


def test_stream_options_need_a_stream():
    assert parse(messages=[{"role": "user", "content": "q"}], stream=True,
                 stream_options={"include_usage": True}).include_usage
    with pytest.raises(APIError):
        parse(messages=[{"role": "user", "content": "q"}], stream_options={"include_usage": True})


def test_limits_count_documents_and_characters():
    config = ServeConfig(max_documents=2, max_chars=10)
    with pytest.raises(APIError, match="3 documents"):
        parse(config, messages=[{"role": "user", "content": "q"}], documents=["a", "b", "c"])
    with pytest.raises(APIError, match="11 characters"):
        parse(config, messages=[{"role": "user", "content": "q"}], documents=["a" * 10])


@pytest.mark.parametrize("field", [{"max_in_flight": 0}, {"max_queue": -1}, {"queue_timeout_s": 0},
                                   {"max_documents": True}, {"api_key": " "}, {"model_name": ""}])
def test_settings_are_checked(field):
    with pytest.raises(InvalidRequestError):
        ServeConfig(**field)


def test_the_key_is_never_in_the_settings_repr():
    assert "s3cret" not in repr(ServeConfig(api_key="s3cret"))


def test_api_key_from_the_environment_or_a_file(tmp_path):
    assert read_api_key(None, {}) is None
    assert read_api_key(None, {API_KEY_ENV: " k1 \n"}) == "k1"
    key_file = tmp_path / "key"
    key_file.write_text("k2\n")
    key_file.chmod(0o600)
    assert read_api_key(key_file, {}) == "k2"
    with pytest.raises(InvalidRequestError, match="one of them"):
        read_api_key(key_file, {API_KEY_ENV: "k1"})
    with pytest.raises(InvalidRequestError, match="empty"):
        read_api_key(None, {API_KEY_ENV: ""})
    key_file.write_text("  \n")
    with pytest.raises(InvalidRequestError, match="empty"):
        read_api_key(key_file, {})
    with pytest.raises(InvalidRequestError, match="cannot read"):
        read_api_key(tmp_path / "missing", {})


def test_a_key_file_others_can_read_warns(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k")
    key_file.chmod(0o644)
    with pytest.warns(UserWarning, match="chmod 600"):
        read_api_key(key_file, {})


# ---- cached tokens, as the engine counts them ----------------------------------------------------------------------

def test_cached_tokens_are_the_found_prompt_tokens_not_recomputed(make_engine):
    engine = make_engine()
    gen = GenerationConfig(max_new_tokens=2)
    cold = engine.answer(CHUNKS, QUERY, generation=gen).stats
    warm = engine.answer(CHUNKS, QUERY, generation=gen).stats
    assert cold.cached_tokens == 0 and warm.cache_hits == len(CHUNKS) and warm.recomputed_tokens > 0
    assert warm.cached_tokens == warm.prefix_tokens + warm.context_tokens - warm.recomputed_tokens
    reuse = engine.answer(CHUNKS, QUERY, method="reuse", generation=gen).stats
    assert reuse.recomputed_tokens == 0 and reuse.cached_tokens == reuse.prefix_tokens + reuse.context_tokens
    assert engine.answer(CHUNKS, QUERY, method="full", generation=gen).stats.cached_tokens == 0


def test_cached_tokens_leave_out_a_chunk_computed_in_the_request(make_engine):
    engine = make_engine()
    gen = GenerationConfig(max_new_tokens=2)
    engine.answer(CHUNKS[:2], QUERY, method="reuse", generation=gen)
    stats = engine.answer(CHUNKS, QUERY, method="reuse", generation=gen).stats
    new_chunk = engine.builder.layout(CHUNKS, QUERY).chunk_ids[2].numel()
    assert (stats.cache_hits, stats.cache_misses) == (2, 1)
    assert stats.cached_tokens == stats.prefix_tokens + stats.context_tokens - new_chunk


# ---- tools, grammars, one-off text --------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASKED = [{"role": "user", "content": "Weather?"}]


def test_a_plain_request_sends_the_engine_nothing_beyond_a_chat():
    assert parse(messages=ASKED, documents=["a", {"text": "b", "transient": False}]).request.extras() == {}


def test_transient_documents_and_prefix_reach_the_engine():
    call = parse(messages=ASKED, documents=["a", {"text": "b", "transient": True}], transient_prefix=True)
    assert call.request.extras() == {"transient": (False, True), "transient_prefix": True}


def test_tools_on_a_backend_without_tools_are_refused():
    with pytest.raises(APIError) as caught:
        parse(messages=ASKED, tools=[WEATHER])
    assert caught.value.param == "tools" and "--backend hf" in caught.value.message


def test_tools_build_the_grammar_of_the_choice_and_calls_are_parsed(make_engine):
    engine = make_engine("llama")
    body = json.dumps({"messages": ASKED, "tools": [WEATHER], "tool_choice": "required"}).encode()
    call = parse_chat_body(body, DEFAULTS, ServeConfig(), RAG.rag_messages, engine.tool_format)
    assert [t.name for t in call.request.tools] == ["get_weather"] and call.tool_format == engine.tool_format
    assert call.request.grammar == engine.tool_format.grammar(call.request.tools, "required")
    raw = parse_chat_body(json.dumps({**json.loads(body), "parse_tool_calls": False}).encode(), DEFAULTS,
                          ServeConfig(), RAG.rag_messages, engine.tool_format)
    assert raw.tool_format is None and raw.request.grammar == call.request.grammar


def test_a_response_format_is_a_json_grammar():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    call = parse(messages=ASKED,
                 response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert call.request.grammar.kind == "json_schema" and '"n"' in call.request.grammar.source
    assert parse(messages=ASKED, response_format={"type": "text"}).request.grammar is None
