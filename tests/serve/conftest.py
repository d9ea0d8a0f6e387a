"""Servers for the serve tests: `prophet-rag serve` in a subprocess over the tiny model (one per session), and an app
over a scripted engine (one whose tokens the test releases one by one) run by uvicorn in a thread; both on free
loopback ports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from serve_helpers import API_KEY, LIMITS, LiveServer, ScriptedEngine, Served, free_port, stop_process, wait_healthy
from tiny import tiny_model, tiny_tokenizer


def _model_dir(folder, **overrides):
    tiny_model("llama", **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny llama and its tokenizer saved as a model folder, as `prophet-rag serve --model` loads one."""
    return _model_dir(tmp_path_factory.mktemp("tiny-model"))


@contextlib.contextmanager
def _serving(model_dir, home):
    """`prophet-rag serve` over `model_dir`, with an API key and small limits, until the block ends."""
    port = free_port()
    env = {**os.environ, "PROPHET_RAG_API_KEY": API_KEY, "PROPHET_RAG_HOME": str(home)}
    command = [sys.executable, "-m", "prophet_rag.cli", "serve", "--model", str(model_dir), "--store",
               str(home / "kv"), "--port", str(port), "--log-level", "warning",
               *(f"--{name.replace('_', '-')}={value}" for name, value in LIMITS.items())]
    log = home / "server.log"
    with log.open("w") as out:  # a file, not a pipe: a pipe nobody reads would block the server once full
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield Served(url, model_dir, proc)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def served(tiny_model_dir, tmp_path_factory):
    """`prophet-rag serve` over the tiny model for the whole session."""
    with _serving(tiny_model_dir, tmp_path_factory.mktemp("serve-home")) as server:
        yield server


@pytest.fixture(scope="module")
def served_tools(tmp_path_factory):
    """`prophet-rag serve` over a tiny model with 2,048 positions: a tool list in the system prompt takes more than
    the default 512."""
    model_dir = _model_dir(tmp_path_factory.mktemp("tiny-model-2k"), max_position_embeddings=2048)
    with _serving(model_dir, tmp_path_factory.mktemp("serve-tools-home")) as server:
        yield server


@pytest.fixture
def scripted_server():
    """`make(**ServeConfig fields)`: a live server over a fresh `ScriptedEngine`; returns (engine, server)."""
    from prophet_rag.serve.app import create_app
    from prophet_rag.serve.config import ServeConfig

    servers = []

    def make(**config):
        engine = ScriptedEngine()
        server = LiveServer(create_app(engine, ServeConfig(**config)))
        servers.append((engine, server))
        return engine, server

    yield make
    for engine, server in servers:
        engine.release(10_000)  # let anything still running end
        server.stop()
