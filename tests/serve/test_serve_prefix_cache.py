"""The server's usage counts a conversation's earlier turns, served from the engine's prefix cache, as cached."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from prophet_rag.config import PrefixCacheConfig
from prophet_rag.serve.app import create_app
from prophet_rag.serve.cli import add_serve_arguments
from prophet_rag.serve.config import ServeConfig


def test_a_conversations_next_turn_reports_its_history_as_cached_tokens(make_engine):
    engine = make_engine(prefix_cache=PrefixCacheConfig(max_bytes=2**24, block_tokens=4))
    with TestClient(create_app(engine, ServeConfig())) as client:
        history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        first = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 4}).json()
        history += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "And then?"}]
        second = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 4}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == second["prophet_rag"]["prefix_cache_tokens"] >= first["usage"]["prompt_tokens"] // 4 * 4 - 4 > 0


def test_the_prefix_cache_is_off_unless_given_bytes():
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert parser.parse_args([]).prefix_cache_bytes == 0
    assert parser.parse_args(["--prefix-cache-bytes", "1048576"]).prefix_cache_bytes == 2**20
