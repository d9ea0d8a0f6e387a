"""Bad configuration and bad CLI input: a ProphetRAGError naming the problem and the fix (the CLI: one line, a
non-zero exit, no traceback), nothing created by mistake, nothing stored lost."""

import os
import secrets
from pathlib import Path

import pytest

from kvstore_helpers import put, rewrite, value_path
from prophet_rag.cache.store import KVStore
from prophet_rag.cli import build_parser, main
from prophet_rag.config import StoreConfig, default_store_dir
from prophet_rag.errors import InvalidRequestError, StoreError


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prophet-rag: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(size_limit_bytes="1000"), "size_limit_bytes must be an int"),
        (dict(size_limit_bytes=True), "size_limit_bytes must be an int"),
        (dict(max_entry_bytes=0), "max_entry_bytes must be an integer >= 1"),
        (dict(max_entry_bytes=2**40), "max_entry_bytes must be in"),
        (dict(directory="kv\x00store"), "NUL byte"),
        (dict(directory=""), "empty"),
        (dict(directory=3), "must be a path"),
        (dict(directory="~nosuchuser-prophet/kv"), "names no known user"),
        (dict(kv_storage="int4"), "kv_storage must be one of"),
        (dict(auth_key_env="A", auth_key_file="k"), "not both"),
        (dict(auth_key_env="MY-KEY"), "environment variable"),
        (dict(eviction_policy="none"), "eviction_policy"),
    ],
    ids=["size-str", "size-bool", "entry-zero", "entry-over-limit", "nul", "empty", "int-path", "unknown-user",
         "storage", "two-keys", "env-name", "policy"],
)
def test_malformed_store_config_names_the_field(options, match):
    with pytest.raises(InvalidRequestError, match=match):
        StoreConfig(**options)


def test_relative_store_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert StoreConfig(directory="kv").directory == tmp_path / "kv"


def test_an_empty_prophet_rag_home_means_the_default_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PROPHET_RAG_HOME", "")
    assert default_store_dir() == tmp_path / ".cache" / "prophet_rag" / "kv"
    assert StoreConfig().directory == tmp_path / ".cache" / "prophet_rag" / "kv"


def test_a_home_of_an_unknown_user_is_one_error_line(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROPHET_RAG_HOME", "~nosuchuser-prophet/x")
    assert main(["cache", "stats"]) == 2
    assert "names no known user" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_nul_byte_in_the_store_path_is_one_error_line(capsys):
    assert main(["cache", "stats", "--store", "kv\x00x"]) == 2
    assert "NUL byte" in _one_error_line(capsys)


@pytest.mark.parametrize("action", ["stats", "verify", "clear"])
def test_cache_commands_on_a_mistyped_store_fail_and_create_nothing(tmp_path, capsys, action):
    typo = tmp_path / "typo" / "a" / "b"
    assert main(["cache", action, "--store", str(typo)]) == 2
    assert "there is no KV store at" in _one_error_line(capsys)
    assert not (tmp_path / "typo").exists()


def test_cache_verify_reports_what_it_removed(tmp_path, capsys):
    with KVStore(StoreConfig(directory=tmp_path / "kv")) as store:
        good, _, _ = put(store, seed=0)
        bad, _, _ = put(store, seed=1)
        path = value_path(store.directory, bad.key)
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        rewrite(path, bytes(data))
    assert main(["cache", "verify", "--store", str(tmp_path / "kv")]) == 0
    assert "checked 2: 1 ok, 1 damaged or inconsistent entries removed" in capsys.readouterr().out
    assert main(["cache", "stats", "--store", str(tmp_path / "kv")]) == 0
    assert "entries: 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setup, option, value, match",
    [
        (None, "env", "PR_NO_SUCH_KEY", "holds 0 bytes"),
        (lambda tmp, env: env.setenv("PR_SHORT_KEY", "short"), "env", "PR_SHORT_KEY",
         "holds 5 bytes; an authentication key needs at least 32"),
        (None, "file", "missing.key", "cannot read the key file"),
        (lambda tmp, env: os.mkfifo(tmp / "fifo.key"), "file", "fifo.key", "not a regular file"),
    ],
    ids=["unset-env", "short-env", "missing-file", "fifo-file"],
)
def test_key_problems_are_one_error_line(tmp_path, capsys, monkeypatch, setup, option, value, match):
    KVStore(StoreConfig(directory=tmp_path / "kv")).close()
    if setup:
        setup(tmp_path, monkeypatch)
    value = str(tmp_path / value) if option == "file" else value
    assert main(["cache", "verify", "--store", str(tmp_path / "kv"), f"--key-{option}", value]) == 2
    assert match in _one_error_line(capsys)
    with pytest.raises(StoreError, match=match):
        KVStore(StoreConfig(directory=tmp_path / "kv", **{f"auth_key_{option}": value}))


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    from tiny import tiny_model, tiny_tokenizer

    folder = tmp_path / "tiny-model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cache_ingest_names_the_files_it_cannot_cache_and_caches_the_rest(tmp_path, capsys, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The vault code of Alpha is 4821.")
    (docs / "b-too-long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    (docs / "c.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    (docs / "d.md").write_text("Paris is the capital of France.")
    store = tmp_path / "kv"
    assert main(["cache", "ingest", "--model", str(tiny_model_dir), "--store", str(store), str(docs)]) == 1
    out = capsys.readouterr()
    assert "b-too-long.txt: skipped: chunk 0 has" in out.err and "c.txt: skipped: not UTF-8 text" in out.err
    assert "4 files: 2 chunks computed (" in out.out and "0 skipped (already stored), 0 empty, 2 failed" in out.out
    assert out.err.strip().splitlines()[-1] == "prophet-rag: error: 2 of 4 files could not be cached (listed above)."
    with KVStore(StoreConfig(directory=store), create=False) as kv:
        assert len(kv) == 2  # the files after the oversized one were cached too


@pytest.mark.parametrize("command", [["demo"], ["ask", "--docs", "d", "q?"], ["bench"], ["cache", "stats"],
                                     ["cache", "verify"], ["cache", "clear"], ["cache", "ingest", "d"]])
def test_every_command_that_opens_a_store_takes_its_key(command):
    parser = build_parser()
    assert parser.parse_args([*command, "--key-file", "k.key"]).key_file == "k.key"
    assert parser.parse_args([*command, "--key-env", "STORE_KEY"]).key_env == "STORE_KEY"


def test_ask_reads_a_store_filled_by_keyed_ingest_and_writes_only_keyed_entries(tmp_path, capsys, tiny_model_dir):
    docs, store, key = tmp_path / "docs", tmp_path / "kv", tmp_path / "store.key"
    docs.mkdir()
    (docs / "a.txt").write_text("The vault code of Alpha is 4821.")
    (docs / "b.txt").write_text("Paris is the capital of France.")
    key.write_text(secrets.token_hex(32))
    common = ["--model", str(tiny_model_dir), "--store", str(store), "--key-file", str(key)]
    assert main(["cache", "ingest", *common, str(docs)]) == 0
    assert main(["ask", *common, "--docs", str(docs), "--max-new-tokens", "2", "What is the code?"]) == 0
    assert "2/2 documents from the cache]" in capsys.readouterr().err
    with KVStore(StoreConfig(directory=store, auth_key_file=key), create=False) as kv:
        report = kv.verify()
    assert (report.checked, report.ok, report.removed) == (3, 3, 0)  # the two documents and the prompt's prefix


def test_model_dtype_names_the_dtypes_and_refuses_others():
    import torch

    from prophet_rag.engine.loading import model_dtype
    from prophet_rag.errors import ModelLoadError

    assert (model_dtype("bfloat16"), model_dtype("float16"), model_dtype("float32")) == (
        torch.bfloat16, torch.float16, torch.float32)
    assert model_dtype("auto") is None and model_dtype(None) is None
    with pytest.raises(ModelLoadError, match="auto, float32, bfloat16, float16"):
        model_dtype("int8")


@pytest.mark.parametrize("command", [["demo"], ["ask", "--docs", "d", "q?"], ["bench"], ["serve"],
                                     ["cache", "ingest", "d"]])
def test_every_command_that_loads_the_model_takes_its_dtype(command, capsys):
    parser = build_parser()
    assert parser.parse_args(command).dtype == "auto"
    assert parser.parse_args([*command, "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_a_store_keeps_each_dtypes_kv_apart(tmp_path, capsys, tiny_model_dir):
    """KV ingested in fp32 is not served to a bf16 engine (its entries are another dtype's); the bf16 engine computes
    and stores its own, which it then reads."""
    docs, store = tmp_path / "docs", tmp_path / "kv"
    docs.mkdir()
    (docs / "a.txt").write_text("The vault code of Alpha is 4821.")
    (docs / "b.txt").write_text("Paris is the capital of France.")
    common = ["--model", str(tiny_model_dir), "--store", str(store)]
    assert main(["cache", "ingest", *common, str(docs)]) == 0
    ask = ["ask", *common, "--dtype", "bfloat16", "--docs", str(docs), "--max-new-tokens", "2", "What is the code?"]
    assert main(ask) == 0
    assert "0/2 documents from the cache]" in capsys.readouterr().err
    assert main(ask) == 0
    assert "2/2 documents from the cache]" in capsys.readouterr().err
    with KVStore(StoreConfig(directory=store), create=False) as kv:
        assert len(kv) == 5  # the two documents in each dtype, and the bf16 prompt prefix `ask` stored
