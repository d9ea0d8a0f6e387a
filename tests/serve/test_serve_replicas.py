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

pytest.importorskip("ray.serve")

from prophet_rag.cli import build_parser
from prophet_rag.config import StoreConfig
from prophet_rag.errors import InvalidRequestError, ProphetRAGError
from prophet_rag.serve.cli import run_serve_command
from prophet_rag.serve.replicas import Scaling, replica_store

CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "replicas_check.py"


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
