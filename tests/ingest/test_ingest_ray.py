"""`cache ingest --ray` on one local Ray instance for the module: the entries a single-process ingest stores, byte
for byte; a second run that sends nothing to the workers; failures reported by name with a non-zero exit.

Each Ray run starts its workers (a process each, importing torch and loading the tiny model), so the module ingests
one corpus three times (in process, then twice on Ray) and most tests read those runs' outputs.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import time

import pytest
import torch
from ingest_helpers import BAD, GOOD, stored_entries, write_corpus

from prophet_rag import ingest
from prophet_rag.cli import main
from prophet_rag.config import StoreConfig

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'prophet-rag[ray]')")
from ray.exceptions import RayActorError  # noqa: E402 (only once Ray is known to be installed)

WORKERS = 2


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local instance started the way `cache ingest --ray` starts one (ingest.connect): 2 CPUs, so each of the 2
    workers reserves 1 and runs torch on 1 thread."""
    home = tmp_path_factory.mktemp("ray-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROPHET_RAG_HOME", str(home))  # the workers inherit the environment the instance starts in
        assert ingest.connect(ingest.import_ray(), None, num_cpus=WORKERS) is True
    yield ray
    ray.shutdown()


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(local_ray, tiny_model_folder, tmp_path_factory):
    """The same corpus ingested in this process (on 1 torch thread, as each worker runs) and twice with --ray."""
    root = tmp_path_factory.mktemp("ray-ingest")
    (root / "docs").mkdir()
    docs = write_corpus(root / "docs")
    common = ["cache", "ingest", "--model", str(tiny_model_folder)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU kernels split float reductions by thread count: match the workers' one thread
    try:
        plain = _cli(*common, "--store", str(root / "plain"), str(docs))
    finally:
        torch.set_num_threads(threads)
    first = _cli(*common, "--store", str(root / "ray"), "--ray", "--workers", str(WORKERS), str(docs))
    stored = stored_entries(root / "ray")
    # The second run calls what the CLI calls, for the summary's count of chunks handed to the workers.
    second = ingest.ingest_files_on_ray(ingest.text_files(docs), str(tiny_model_folder),
                                        StoreConfig(directory=root / "ray"), workers=WORKERS, show_progress=False)
    return {"root": root, "docs": docs, "plain": plain, "first": first, "second": second, "after_first": stored}


def test_ray_ingest_stores_the_single_process_entries_byte_for_byte(runs):
    plain, on_ray = stored_entries(runs["root"] / "plain"), runs["after_first"]
    assert len(on_ray) == len(GOOD)
    assert set(on_ray) == set(plain)
    for key, value in plain.items():
        assert on_ray[key] == value, f"entry {key} differs"


def test_ray_ingest_summary_counts_like_the_single_process_one(runs):
    _, plain_out, _ = runs["plain"]
    code, out, _ = runs["first"]
    assert f"{len(GOOD)} chunks computed on {WORKERS} Ray workers (" in out
    tail = "1 skipped (already stored), 1 empty, 2 failed"
    assert tail in out and tail in plain_out
    tokens = plain_out.split("computed (")[1].split(" tokens")[0]
    assert f"({tokens} tokens," in out and int(tokens) > 0


def test_ray_ingest_names_each_failed_file_and_exits_non_zero(runs):
    code, _, err = runs["first"]
    assert code == 1
    for name, words in BAD.items():
        line = next(line for line in err.splitlines() if f"{name}: skipped:" in line)
        assert words in line
    assert err.strip().splitlines()[-1] == "prophet-rag: error: 2 of 8 files could not be cached (listed above)."


def test_second_ray_run_sends_nothing_to_the_workers(runs):
    second = runs["second"]
    assert second.sent == 0 and second.computed == 0 and second.tokens == 0 and second.compute_s == 0.0
    assert second.stored == len(GOOD) + 1 and len(second.failed) == len(BAD) and second.workers == WORKERS
    assert f"0 chunks computed on {WORKERS} Ray workers (0 tokens, 0 tokens/s)" in second.line()


def test_second_ray_run_leaves_the_store_as_it_was(runs):
    assert stored_entries(runs["root"] / "ray") == runs["after_first"]


def test_an_instance_the_ingest_did_not_start_is_left_running(local_ray, runs):
    assert local_ray.is_initialized()


def test_a_dead_worker_fails_its_files_by_name_and_the_other_finishes(local_ray, tiny_model_folder, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(ingest, "BATCH_TOKENS", 1)  # one chunk per task: 2 tasks go to each worker at once
    (tmp_path / "docs").mkdir()
    files = ingest.text_files(write_corpus(tmp_path / "docs", bad=False))
    store = StoreConfig(directory=tmp_path / "kv")
    worker = local_ray.remote(num_cpus=1)(ingest.IngestWorker)
    actors = [worker.remote(str(tiny_model_folder), store, 1) for _ in range(WORKERS)]
    try:
        info = ingest.load_workers(local_ray, actors)
        local_ray.kill(actors[1])  # dies after loading, before any task: both of its tasks fail
        wait_dead(local_ray, actors[1])  # `kill` only asks: the run must start once the actor is gone
        summary = ingest.ingest_with(local_ray, actors, info, files, store)
        assert summary.sent == len(GOOD) and summary.computed == len(GOOD) - 2 and len(summary.failed) == 2
        assert all(reason.startswith("Ray worker failed: ") for _, reason in summary.failed)
        assert {name for name, _ in summary.failed} <= {str(tmp_path / "docs" / name) for name in GOOD}
        assert len(stored_entries(tmp_path / "kv")) == len(GOOD) - 2
        again = ingest.ingest_with(local_ray, actors[:1], info, files, store)  # the failed files, on the live one
        assert again.sent == 2 and again.computed == 2 and not again.failed
    finally:
        ingest.close_workers(local_ray, actors)


def wait_dead(ray_module, actor, timeout_s: float = 60.0) -> None:
    """Return once calls to `actor` fail with RayActorError; `__ray_ready__` is Ray's no-op actor method, so the
    probes change nothing in the actor while it lives."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray_module.get(actor.__ray_ready__.remote(), timeout=timeout_s)
        except RayActorError:
            return
        assert time.monotonic() < deadline, f"the killed actor still answers after {timeout_s:.0f} s"
        time.sleep(0.05)


@pytest.fixture
def redis_url(tmp_path):
    """A redis-server of this test on a free loopback port (`make install` installs the binary)."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is not installed: `make install` installs it")
        pytest.skip("redis-server is not installed: `make install` installs it")
    redis = pytest.importorskip("redis")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir",
                               str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        for _ in range(500):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_ray_workers_write_the_shared_tier_another_machine_then_skips(local_ray, tiny_model_folder, tmp_path,
                                                                      redis_url):
    from prophet_rag.engine import ProphetEngine

    (tmp_path / "docs").mkdir()
    files = ingest.text_files(write_corpus(tmp_path / "docs", bad=False))
    key = tmp_path / "store.key"
    key.write_text("5a" * 32)
    key.chmod(0o600)

    def shared(local: str) -> StoreConfig:
        return StoreConfig(directory=tmp_path / local, remote_url=redis_url, auth_key_file=key)

    summary = ingest.ingest_files_on_ray(files, str(tiny_model_folder), shared("node-a"), workers=1,
                                         show_progress=False)
    assert summary.computed == len(GOOD) and not summary.failed
    # Another machine: its own empty disk store, the same server. Every chunk is found there before any compute.
    with ProphetEngine.from_pretrained(str(tiny_model_folder), store=shared("node-b")) as engine:
        remote = engine.cache.tier("remote")
        refs = [engine.cache.ref(engine.builder.layout([text], "q").chunk_ids[0], engine.sink_ids)
                for text in GOOD.values()]
        assert all(remote.contains(ref.key) for ref in refs)
        again = ingest.ingest_files(engine, files, show_progress=False)
        assert again.sent == 0 and again.stored == len(GOOD) + 1
        assert len(engine.store) == 0  # nothing computed on this machine, so nothing written to its disk
