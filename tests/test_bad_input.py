"""Every bad input names the problem and the fix (issue 11): configuration values, model paths, document files."""

from __future__ import annotations

import pytest
import torch

from prophet_rag import GenerationConfig, InvalidRequestError, ModelLoadError, PromptConfig, SelectionConfig
from prophet_rag.cli import main
from prophet_rag.engine import ProphetEngine


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
        ({"seed": "x"}, "seed must be an integer >= 0"),
        ({"temperature": "hot"}, "temperature must be a number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a number >= 0"),
        ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
        ({"stop": ["ok", ""]}, "stop must be a string or a list of non-empty strings"),
        ({"stop": 3}, "stop must be a string or a list of non-empty strings"),
        ({"eos_token_ids": (1.5,)}, "eos_token_ids must be a tuple of token ids"),
    ],
)
def test_bad_generation_settings_are_refused(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationConfig(**kwargs)


def test_a_single_stop_string_is_one_stop_string():
    assert GenerationConfig(stop="e ").stop == ("e ",)
    assert GenerationConfig(stop=["a", "bc"]).stop == ("a", "bc")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": True}, "ratio must be a number in"),
        ({"ratio": "0.2"}, "ratio must be a number in"),
        ({"infoflow_layers": (1.5,)}, "infoflow_layers must be a non-empty tuple of layer indices"),
        ({"infoflow_layers": ()}, "infoflow_layers must be a non-empty tuple of layer indices"),
        ({"cacheblend_check_layer": 1.0}, "cacheblend_check_layer must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"reorder_chunks": "yes"}, "reorder_chunks must be True or False"),
    ],
)
def test_bad_selection_settings_are_refused(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SelectionConfig(**kwargs)


def test_layer_lists_become_tuples():
    assert SelectionConfig(infoflow_layers=[3, 4]).infoflow_layers == (3, 4)


@pytest.mark.parametrize("kwargs", [{"instruction": None}, {"system_prompt": 3}, {"chunk_separator": b"\n"}])
def test_bad_prompt_settings_are_refused(kwargs):
    with pytest.raises(InvalidRequestError, match="must be a string"):
        PromptConfig(**kwargs)


@pytest.mark.parametrize("path", ["/nonexistent/model", "./missing", "~/no-such-model", "a/b/c"])
def test_a_missing_model_folder_is_named_without_a_hub_lookup(path):
    with pytest.raises(ModelLoadError, match="is not a model folder"):
        ProphetEngine.from_pretrained(path)


def test_a_folder_without_a_model_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load a causal LM"):
        ProphetEngine.from_pretrained(str(tmp_path))


def test_cli_reports_a_missing_model_in_one_line(capsys):
    assert main(["ask", "--model", "/nonexistent", "--docs", ".", "q?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("prophet-rag: error: '/nonexistent' is not a model folder")


def test_cli_names_a_document_that_is_not_utf8(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("fine", encoding="utf-8")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert main(["ask", "--docs", str(docs), "q?"]) == 2
    err = capsys.readouterr().err
    assert "latin1.txt is not UTF-8 text" in err and "Traceback" not in err


def test_a_kv_dtype_other_than_the_models_is_refused_with_the_fix(make_engine):
    engine = make_engine("llama")
    assert engine.kv_dtype == torch.float32
    with pytest.raises(InvalidRequestError, match=r"kv_dtype torch.bfloat16 differs from the model's torch.float32.*"
                                                  r"dtype=torch.bfloat16.*kv_storage"):
        ProphetEngine(engine.adapter.model, engine.tokenizer, store=engine.store, kv_dtype=torch.bfloat16)


def test_the_models_own_kv_dtype_is_accepted(make_engine):
    engine = make_engine("llama")
    again = ProphetEngine(engine.adapter.model, engine.tokenizer, store=engine.store, kv_dtype=torch.float32)
    assert again.kv_dtype == torch.float32
    docs, question = ["Paris is in France."], "Where is Paris?"
    assert again.answer(docs, question).text == engine.answer(docs, question).text
