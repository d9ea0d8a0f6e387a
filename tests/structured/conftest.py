"""Fixtures of the structured-output tests."""

from __future__ import annotations

import pytest

from structured_helpers import family_tokenizer


@pytest.fixture
def tok():
    """The tiny ChatML tokenizer (a copy: tests may add tokens)."""
    return family_tokenizer(None)
