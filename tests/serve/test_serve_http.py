"""`prophet-rag serve` over the tiny model in a subprocess, called with the `openai` package and plain HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from prophet_rag.config import GenerationConfig
from prophet_rag.engine import ProphetEngine
from prophet_rag.layout import DOCUMENTS
from serve_helpers import API_KEY, LIMITS
from tiny import CHUNKS, QUERY

QUESTION = [{"role": "user", "content": QUERY}]


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served.base_url, api_key=API_KEY, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def local_engine(served, tmp_path_factory):
    """The same model in this process, for answers to compare with the server's."""
    from prophet_rag.config import StoreConfig

    engine = ProphetEngine.from_pretrained(str(served.model_dir),
                                           store=StoreConfig(directory=tmp_path_factory.mktemp("local-kv")))
    yield engine
    engine.close()


def post(served, body) -> httpx.Response:
    return httpx.post(f"{served.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60)


def test_health_and_models(served, client):
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    assert [model.id for model in client.models.list()] == [str(served.model_dir)]


def test_answer_matches_the_engine_in_process(client, local_engine):
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"documents": list(CHUNKS)},
                                           max_tokens=6, temperature=0)
    # A question with documents that no content part places is the request engine.answer makes.
    local = local_engine.answer(CHUNKS, QUERY, generation=GenerationConfig(max_new_tokens=6))
    assert reply.choices[0].message.content == local.text
    assert reply.usage.completion_tokens == local.stats.new_tokens
    prompt = local.stats.prefix_tokens + local.stats.context_tokens + local.stats.suffix_tokens
    assert reply.usage.prompt_tokens == prompt
    assert reply.choices[0].finish_reason == ("length" if local.stats.new_tokens == 6 else "stop")


def test_cached_tokens_count_what_came_from_the_cache(client):
    documents = ["The vault code of Gamma is 7713.", "Rome is the capital of Italy."]
    messages = [{"role": "system", "content": "A system prompt no other test sends."}, *QUESTION]  # a new prefix
    ask = dict(model="tiny", messages=messages, extra_body={"documents": documents}, max_tokens=2, temperature=0)
    cold = client.chat.completions.create(**ask)
    warm = client.chat.completions.create(**ask)
    stats = warm.model_extra["prophet_rag"]
    assert cold.usage.prompt_tokens_details.cached_tokens == 0 < warm.usage.prompt_tokens_details.cached_tokens
    assert stats["cache_hits"] == 2 and stats["recomputed_tokens"] > 0
    assert warm.usage.prompt_tokens_details.cached_tokens == (
        stats["prefix_tokens"] + stats["context_tokens"] - stats["recomputed_tokens"])


def test_stream_ends_with_usage_and_done(served, client):
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, stream=True,
                                                  extra_body={"documents": list(CHUNKS)},
                                                  stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5,
                                           extra_body={"documents": list(CHUNKS)})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = post(served, {"messages": QUESTION, "max_tokens": 2, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]") and '"usage"' not in raw


@pytest.mark.parametrize("documents", [list(CHUNKS), [{"text": c} for c in CHUNKS],
                                       [{"title": f"doc {i}", "text": c} for i, c in enumerate(CHUNKS)]])
def test_documents_as_strings_or_objects(client, documents):
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"documents": documents},
                                           max_tokens=3)
    assert reply.model_extra["prophet_rag"]["cache_hits"] + reply.model_extra["prophet_rag"]["cache_misses"] == 3


def test_a_documents_part_places_them(client, local_engine):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Notes:\n"}, {"type": "documents"}]},
                {"role": "user", "content": QUERY}]
    reply = client.chat.completions.create(model="tiny", messages=messages, extra_body={"documents": list(CHUNKS)},
                                           max_tokens=4)
    local = local_engine.chat([{"role": "system", "content": ["Notes:\n", DOCUMENTS]}, QUESTION[0]], CHUNKS,
                              generation=GenerationConfig(max_new_tokens=4))
    assert reply.choices[0].message.content == local.text
    assert reply.model_extra["prophet_rag"]["suffix_tokens"] == local.stats.suffix_tokens


def test_plain_chat_without_documents(client):
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3)
    assert reply.model_extra["prophet_rag"]["method"] == "full"
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}",
                                    f"Basic {API_KEY}", f"{API_KEY}", "Bearer"])
def test_a_missing_or_wrong_key_gets_401(served, header):
    headers = {} if header is None else {"Authorization": header}
    response = httpx.post(f"{served.base_url}/chat/completions", json={"messages": QUESTION}, headers=headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{served.base_url}/models").status_code == 401


def test_openai_client_sees_401_as_authentication_error(served):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.base_url, api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": QUESTION, "n": 2}, "n"),
    ({"messages": QUESTION, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": QUESTION, "logprobs": True}, "logprobs"),
    ({"messages": QUESTION, "frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": QUESTION, "documents": "one string"}, "documents"),
    ({"messages": QUESTION, "documents": [{"title": "no text"}]}, "documents"),
    ({"messages": [{"role": "system", "content": "s"}], "documents": ["d"]}, "messages"),
    ({"messages": QUESTION, "max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
    ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
])
def test_bad_requests_get_openai_shaped_400s(served, body, param):
    response = post(served, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [
    {"messages": QUESTION, "temperature": -1},
    {"messages": QUESTION, "method": "nonsense"},
    {"messages": QUESTION, "documents": ["d"], "ratio": 2},
    {"messages": QUESTION, "documents": ["   "]},
])
def test_the_engines_own_checks_are_400s_with_their_message(served, body):
    response = post(served, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def test_context_window_overflow_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded" and "context window" in caught.value.message


def test_body_that_is_not_json_is_a_400(served):
    response = httpx.post(f"{served.base_url}/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_limits(served):
    assert post(served, {"messages": QUESTION, "documents": ["x"] * (LIMITS["max_documents"] + 1)}).status_code == 400
    assert post(served, {"messages": QUESTION, "documents": ["x" * (LIMITS["max_chars"] + 1)]}).status_code == 400
    big = post(served, {"messages": QUESTION, "documents": ["y" * (LIMITS["max_body_bytes"] + 1)]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"messages": [], "documents": ["'
        for _ in range(LIMITS["max_body_bytes"] // 1000 + 1):
            yield b"z" * 1000
        yield b'"]}'

    response = httpx.post(f"{served.base_url}/chat/completions", content=chunked(),
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 413


def test_unknown_route_is_an_openai_shaped_404(served):
    response = httpx.get(f"{served.base_url}/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    httpx.get(f"{served.url}/some/other/path")
    # Unknown paths share one label value, so no client can mint metric series.
    assert served.metric("prophet_rag_requests_total", endpoint="other", status="404") >= 2
    assert "/some/other/path" not in httpx.get(f"{served.url}/metrics").text


def test_metrics_count_requests_tokens_and_tier_hits(served, client):
    before = served.metric("prophet_rag_requests_total", endpoint="/v1/chat/completions", status="200")
    hits_before = served.metric("prophet_rag_cache_hits_total", tier="disk")
    documents = ["The vault code of Delta is 1357."]
    for _ in range(2):
        client.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"documents": documents},
                                       max_tokens=2)
    assert served.metric("prophet_rag_requests_total", endpoint="/v1/chat/completions", status="200") == before + 2
    assert served.metric("prophet_rag_cache_hits_total", tier="disk") >= hits_before + 1
    assert served.metric("prophet_rag_tokens_total", kind="cached") > 0
    assert served.metric("prophet_rag_tokens_total", kind="recomputed") > 0
    assert served.metric("prophet_rag_ttft_seconds_count") >= 2
    assert served.metric("prophet_rag_queue_depth") == 0 and served.metric("prophet_rag_requests_in_flight") == 0


def test_concurrent_clients_get_their_serial_answers_in_shared_steps(served, client):
    questions = (QUERY, "Which city is the capital of France?", "What jumps over the dog?", "Who is Beta?")
    asks = [dict(model="tiny", messages=[{"role": "user", "content": questions[i % 4]}], max_tokens=4 + i % 5,
                 extra_body={"documents": list(CHUNKS[: 1 + i % 3])}, temperature=0) for i in range(8)]

    def ask(kwargs):
        return client.chat.completions.create(**kwargs).choices[0].message.content

    serial = [ask(kwargs) for kwargs in asks]
    steps = served.metric("prophet_rag_decode_steps_total")
    passes = served.metric("prophet_rag_prefill_passes_total")
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, asks)) == serial
    assert served.metric("prophet_rag_decode_steps_total") > steps
    assert served.metric("prophet_rag_prefill_passes_total") >= passes + 8  # the prefills ran in the steps
    assert served.metric("prophet_rag_decode_rows_total") >= served.metric("prophet_rag_decode_steps_total")
    assert served.metric("prophet_rag_decode_batch_size") == 0  # every request has left the batch
