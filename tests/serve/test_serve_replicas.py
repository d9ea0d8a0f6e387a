"""`prophet-rag serve --ray`: its settings are checked before anything starts, and (slow) two replicas on Ray Serve
sharing one redis-server, through benchmarks/replicas_check.py over the tiny model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve")

from prophet_rag.cli import _store_config, build_parser, ray_app
from prophet_rag.config import StoreConfig
from prophet_rag.errors import InvalidRequestError, ProphetRAGError
from prophet_rag.serve.cli import ray_application, run_serve_command
from prophet_rag.serve.replicas import Scaling, replica_store

CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "replicas_check.py"
DOC = Path(__file__).resolve().parents[2] / "docs" / "serve.md"


@pytest.mark.parametrize("option", [["--replicas", "2"], ["--max-replicas", "3"], ["--cpus-per-replica", "2"]])
def test_ray_options_without_ray_are_refused(option):
    args = build_parser().parse_args(["serve", *option])
    with pytest.raises(ProphetRAGError, match="need --ray"):
        run_serve_command(args, StoreConfig())


@pytest.mark.parametrize(("scaling", "message"), [({"replicas": 0}, "--replicas"),
                                                  ({"replicas": 2, "max_replicas": 2}, "--max-replicas"),
                                                  ({"cpus_per_replica": 0}, "--cpus-per-replica")])
def test_scaling_is_checked(scaling, message):
    with pytest.raises(InvalidRequestError, match=message):
        Scaling(**scaling)


@pytest.fixture
def deployed(monkeypatch):
    """What `replicas.application` is asked to build, instead of building it."""
    from prophet_rag.serve import replicas

    plans = []
    monkeypatch.setattr(replicas, "application", lambda spec, scaling: plans.append((spec, scaling)) or "app")
    return plans


def test_replicas_get_the_batch_and_prefix_cache_settings_of_the_command(deployed, tmp_path):
    args = build_parser().parse_args(["serve", "--ray", "--replicas", "2", "--max-batch", "4", "--max-in-flight", "6",
                                      "--prefix-cache-bytes", "1000000", "--ratio", "0.3", "--max-new-tokens", "9"])
    assert ray_application(args, StoreConfig(directory=tmp_path)) == "app"
    ((spec, scaling),) = deployed
    assert (spec.batch.max_batch, spec.batch.max_waiting, spec.serve.max_in_flight) == (4, 2, 6)
    assert spec.prefix_cache.max_bytes == 1_000_000 and spec.selection.ratio == 0.3
    assert spec.generation.max_new_tokens == 9 and scaling.replicas == 2


def test_the_serve_config_builder_deploys_what_the_command_deploys(deployed, tmp_path):
    options = {"model": "/models/m", "store": str(tmp_path), "replicas": 2, "max_replicas": 4, "max-batch": 3,
               "remote_url": "redis://cache:6379/0", "key_file": str(tmp_path / "key"), "method": "prophet",
               "gpus_per_replica": None, "log_level": "warning"}
    assert ray_app(options) == "app"
    command = build_parser().parse_args(["serve", "--ray", "--model", "/models/m", "--store", str(tmp_path),
                                         "--replicas", "2", "--max-replicas", "4", "--max-batch", "3",
                                         "--remote-url", "redis://cache:6379/0", "--key-file", str(tmp_path / "key"),
                                         "--method", "prophet"])
    ray_application(command, _store_config(command))
    assert deployed[0] == deployed[1]
    spec, scaling = deployed[0]
    assert spec.store.remote_url == "redis://cache:6379/0" and (scaling.replicas, scaling.max_replicas) == (2, 4)


@pytest.mark.parametrize(("options", "words"), [
    ({"port": 9000}, "http_options"),
    ({"replicas": "two"}, "--replicas"),
    ({"no_such_option": 1}, "unrecognized"),
    ({"backend": "hf"}, "--backend hf"),
])
def test_the_serve_config_builder_refuses_what_it_cannot_deploy(deployed, options, words):
    with pytest.raises(ProphetRAGError, match=words):
        ray_app(options)
    assert not deployed


def test_the_config_file_in_the_docs_deploys_through_the_builder(deployed, tmp_path):
    import yaml

    block = DOC.read_text(encoding="utf-8").split("```yaml\n", 1)[1].split("```", 1)[0]
    (application,) = yaml.safe_load(block)["applications"]
    module, name = application["import_path"].split(":")
    assert (module, name) == ("prophet_rag.cli", "ray_app")
    api_key = tmp_path / "api-key"  # the builder reads the API key file where it runs
    api_key.write_text("a-served-key-0123456789abcdef")
    api_key.chmod(0o600)
    ray_app({**application["args"], "api_key_file": str(api_key)})
    ((spec, scaling),) = deployed
    assert spec.model == application["args"]["model"] and spec.prefix_cache.max_bytes == 268435456
    assert spec.serve.api_key == "a-served-key-0123456789abcdef"
    assert (scaling.replicas, scaling.max_replicas, spec.batch.max_batch) == (2, 8, 8)


def test_each_replica_has_its_own_disk_store_and_the_shared_tier(tmp_path):
    key = tmp_path / "store.key"
    key.write_text("ab" * 32)
    key.chmod(0o600)
    store = StoreConfig(directory=tmp_path / "kv", auth_key_file=key, remote_url="redis://127.0.0.1:6379/0")
    first, second = replica_store(store, 0), replica_store(store, 1)
    assert first.directory != second.directory and first.directory.parent == second.directory.parent == store.directory
    assert first.remote_url == second.remote_url == store.remote_url


def _figure(pattern: str, text: str) -> tuple[str, ...]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return match.groups()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("redis-server") or shutil.which("valkey-server")), reason="no redis-server")
def test_two_replicas_share_the_redis_tier_and_survive_a_killed_replica_and_redis(tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(CHECK), "--model", str(tiny_model_dir), "--docs", "4", "--clients", "2",
                          "--rounds", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    hits, seen, misses, same, asked = _figure(r"\[2\].*?(\d+)/(\d+) documents it had never seen were cache hits.*?"
                                              r"misses (\d+); answers equal to A's (\d+)/(\d+)", out)
    assert hits == seen == "2" and misses == "0" and same == asked
    done, total, other, different = _figure(r"\[3\].*?completed (\d+)/(\d+).*?other errors (\d+); answers differing "
                                            r"from the reference (\d+)", out)
    assert done == total and other == different == "0"
    same, asked = _figure(r"\[4\] Redis killed:.*?(\d+)/(\d+) answers equal", out)
    assert same == asked


def test_replicas_load_the_model_in_the_commands_dtype(deployed, tmp_path, tiny_model_dir):
    args = build_parser().parse_args(["serve", "--ray", "--model", str(tiny_model_dir), "--dtype", "bfloat16"])
    ray_application(args, StoreConfig(directory=tmp_path))
    ((spec, _),) = deployed
    assert spec.dtype == "bfloat16"
    with spec.build_engine() as engine:
        assert engine.adapter.spec.dtype == torch.bfloat16

