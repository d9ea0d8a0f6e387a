"""`--backend hf`: plain `generate` on the flattened prompt, behind the server's engine interface."""

from __future__ import annotations

import threading

import pytest

from prophet_rag.config import GenerationConfig
from prophet_rag.errors import ContextWindowError
from prophet_rag.serve.hf_backend import HFGenerateBackend
from tiny import CHUNKS, QUERY

MESSAGES = [{"role": "user", "content": QUERY}]
NO_EOS = (10**6,)


def _rag(engine):
    """The server's messages for a question with documents that no content part places."""
    return engine.builder.rag_messages(QUERY)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_answers_are_the_engines_full_prefill_answers(make_engine, family):
    engine = make_engine(family)
    backend = HFGenerateBackend(engine)
    generation = GenerationConfig(max_new_tokens=8)
    answer = backend.stream_chat(_rag(engine), CHUNKS, generation=generation).result()
    reference = engine.chat(_rag(engine), CHUNKS, method="full", generation=generation)
    assert answer.token_ids == reference.token_ids and answer.text == reference.text
    assert answer.stats.cache_hits == 0 and answer.stats.cache_misses == len(CHUNKS)
    assert answer.stats.recomputed_tokens == answer.stats.context_tokens == reference.stats.context_tokens


def test_streamed_deltas_make_the_answer(make_engine):
    backend = HFGenerateBackend(make_engine("llama"))
    stream = backend.stream_chat(MESSAGES, generation=GenerationConfig(max_new_tokens=6, eos_token_ids=NO_EOS))
    deltas = list(stream)
    assert "".join(deltas) == stream.answer.text and len(stream.answer.token_ids) == 6
    assert 0 < stream.answer.stats.ttft_s


def test_a_stop_string_ends_the_answer_as_in_the_engine(make_engine):
    engine = make_engine("llama")
    backend = HFGenerateBackend(engine)
    long = engine.chat(MESSAGES, generation=GenerationConfig(max_new_tokens=12, eos_token_ids=NO_EOS))
    stop = long.text[len(long.text) // 2 :][:2]
    assert stop.strip()
    generation = GenerationConfig(max_new_tokens=12, eos_token_ids=NO_EOS, stop=(stop,))
    expected = engine.chat(MESSAGES, generation=generation)
    answer = backend.stream_chat(MESSAGES, generation=generation).result()
    assert answer.text == expected.text and answer.token_ids == expected.token_ids


def test_a_closed_stream_lets_the_next_request_run(make_engine):
    backend = HFGenerateBackend(make_engine("llama"))
    stream = iter(backend.stream_chat(MESSAGES, generation=GenerationConfig(max_new_tokens=400,
                                                                            eos_token_ids=NO_EOS)))
    next(stream)
    stream.close()
    done: list = []
    thread = threading.Thread(target=lambda: done.append(backend.stream_chat(
        MESSAGES, generation=GenerationConfig(max_new_tokens=3, eos_token_ids=NO_EOS)).result()))
    thread.start()
    thread.join(60)
    assert len(done) == 1 and len(done[0].token_ids) == 3


def test_a_request_over_the_window_is_refused_before_generating(make_engine):
    engine = make_engine("llama")
    backend = HFGenerateBackend(engine)
    with pytest.raises(ContextWindowError, match="context window"):
        backend.stream_chat(_rag(engine), CHUNKS, generation=GenerationConfig(max_new_tokens=500))


def test_the_server_app_serves_the_hf_backend_over_http(make_engine):
    """`prophet-rag serve --backend hf` builds the same app: /v1/models reports the window, a RAG request is
    answered with every prompt token computed (none cached), as the engine's full prefill answers it."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from prophet_rag.serve.app import create_app
    from prophet_rag.serve.config import ServeConfig

    engine = make_engine("llama")
    backend = HFGenerateBackend(engine)
    with TestClient(create_app(backend, ServeConfig())) as client:
        models = client.get("/v1/models").json()["data"]
        body = {"messages": [{"role": "user", "content": QUERY}], "documents": list(CHUNKS), "max_tokens": 6,
                "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body).json()
    assert models[0]["max_model_len"] == engine.context_window
    reference = engine.answer(list(CHUNKS), QUERY, method="full", generation=GenerationConfig(max_new_tokens=6))
    assert reply["choices"][0]["message"]["content"] == reference.text
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
