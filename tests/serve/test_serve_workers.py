"""`prophet-rag serve --workers N`: engine processes behind one port, checked before anything starts, and (a real
server over the tiny model) answering as the engine in process does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from prophet_rag.cli import build_parser
from prophet_rag.config import GenerationConfig, SelectionConfig, StoreConfig
from prophet_rag.engine import ProphetEngine
from prophet_rag.errors import InvalidRequestError, ProphetRAGError
from prophet_rag.serve.cli import run_serve_command
from prophet_rag.serve.config import ReplicaSpec, ServeConfig
from prophet_rag.serve.workers import WORKER_HEADER, threads_per_worker
from serve_helpers import free_port, stop_process, wait_healthy
from tiny import CHUNKS, QUERY


@pytest.mark.parametrize(("workers", "cpus", "threads"), [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 8, 4), (3, 8, 2)])
def test_each_worker_gets_an_equal_share_of_the_threads(workers, cpus, threads):
    assert threads_per_worker(workers, cpus) == threads


@pytest.mark.parametrize("workers", [0, -1, True, 1.5])
def test_a_worker_count_below_one_is_refused(workers):
    with pytest.raises(InvalidRequestError, match="--workers"):
        threads_per_worker(workers, 2)


@pytest.mark.parametrize(("option", "message"), [(["--ray"], "--ray"), (["--backend", "hf"], "one-process"),
                                                 (["--device", "cuda"], "CPU serving")])
def test_workers_with_what_they_cannot_serve_are_refused(option, message):
    args = build_parser().parse_args(["serve", "--workers", "2", *option])
    with pytest.raises(ProphetRAGError, match=message):
        run_serve_command(args, StoreConfig())


@pytest.fixture(scope="module")
def workers_server(tiny_model_dir, tmp_path_factory):
    """`prophet-rag serve --workers 2` over the tiny model, its temporary files in a folder of its own."""
    home, tmp = tmp_path_factory.mktemp("workers-home"), tmp_path_factory.mktemp("workers-tmp")
    port = free_port()
    env = {**os.environ, "PROPHET_RAG_HOME": str(home), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "2"}
    env.pop("PROPHET_RAG_API_KEY", None)
    command = [sys.executable, "-m", "prophet_rag.cli", "serve", "--model", str(tiny_model_dir), "--store",
               str(home / "kv"), "--port", str(port), "--log-level", "warning", "--workers", "2"]
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, proc, tmp, log
    finally:
        stop_process(proc, timeout_s=60)


def ask(url: str, documents: list[str]) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUERY}], "documents": documents,
            "max_tokens": 6, "temperature": 0}
    with httpx.Client() as client:  # a connection of its own: any worker may take it
        return client.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_workers_answer_as_the_engine_in_process(workers_server, tiny_model_dir, tmp_path):
    url, proc, _, _ = workers_server
    requests = [list(CHUNKS), list(reversed(CHUNKS)), list(CHUNKS[:2])] * 4
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda documents: ask(url, documents), requests))
    engine = ProphetEngine.from_pretrained(str(tiny_model_dir), store=StoreConfig(directory=tmp_path / "kv"))
    try:
        expected = [engine.answer(documents, QUERY, generation=GenerationConfig(max_new_tokens=6)).text
                    for documents in requests]
    finally:
        engine.close()
    assert [reply.status_code for reply in replies] == [200] * len(requests)
    assert [reply.json()["choices"][0]["message"]["content"] for reply in replies] == expected
    workers = {reply.headers[WORKER_HEADER] for reply in replies}
    assert workers and str(proc.pid) not in workers  # answered by worker processes, not the supervisor


def test_clients_holding_connections_together_are_split_evenly(workers_server):
    url, _, _, _ = workers_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUERY}], "documents": list(CHUNKS),
            "max_tokens": 2, "temperature": 0}
    clients = [httpx.Client() for _ in range(6)]  # keep-alive: each holds its connection, as an SDK client does
    try:
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda client: [client.post(f"{url}/v1/chat/completions", json=body,
                                                                timeout=120) for _ in range(2)], clients))
    finally:
        for client in clients:
            client.close()
    served = [reply.headers[WORKER_HEADER] for pair in replies for reply in pair]
    assert all(reply.status_code == 200 for pair in replies for reply in pair)
    assert all(first.headers[WORKER_HEADER] == second.headers[WORKER_HEADER] for first, second in replies)
    assert sorted(Counter(served).values()) == [6, 6]


def _workers_of(supervisor: int) -> set[int]:
    """The supervisor's worker processes (uvicorn spawns them through multiprocessing)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    workers = set()
    for pid in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.add(pid)
        except FileNotFoundError:
            pass
    return workers


def test_a_killed_worker_is_replaced_and_the_other_serves_meanwhile(workers_server):
    url, proc, _, _ = workers_server
    before = _workers_of(proc.pid)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    replies = [ask(url, list(CHUNKS)) for _ in range(4)]  # fresh connections: only the live worker accepts them
    assert [reply.status_code for reply in replies] == [200] * 4
    assert str(victim) not in {reply.headers[WORKER_HEADER] for reply in replies}
    deadline = time.monotonic() + 60
    while (len(_workers_of(proc.pid)) < 2 or victim in _workers_of(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    after = _workers_of(proc.pid)
    assert len(after) == 2 and victim not in after
    wait_healthy(url, proc)


def test_the_workers_spec_file_is_private_and_removed_at_shutdown(workers_server):
    url, proc, tmp, log = workers_server
    (folder,) = tmp.glob("prophet-rag-workers-*")
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert oct((folder / "spec.pickle").stat().st_mode & 0o777) == "0o600"
    proc.terminate()
    proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()
    assert not list(tmp.glob("prophet-rag-workers-*"))


def test_workers_that_cannot_load_the_model_fail_the_command(tmp_path):
    env = {**os.environ, "PROPHET_RAG_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "prophet_rag.cli", "serve", "--model", str(tmp_path / "no-such-model"),
               "--store", str(tmp_path / "kv"), "--port", str(free_port()), "--log-level", "warning",
               "--workers", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "while the server was starting" in done.stderr


def test_a_replica_spec_refuses_a_dtype_it_cannot_load(tmp_path):
    with pytest.raises(InvalidRequestError, match="dtype 'fp8' is not one"):
        ReplicaSpec(None, "cpu", StoreConfig(directory=tmp_path), SelectionConfig(), GenerationConfig(),
                    ServeConfig(), dtype="fp8")
