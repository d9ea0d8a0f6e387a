"""Fixtures of the ingestion tests: a tiny model saved as a folder (what a Ray worker loads) and a small corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from ingest_helpers import write_corpus


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    return write_corpus(folder)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    from tiny import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
