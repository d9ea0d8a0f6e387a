"""Requests are tokenized segment by segment, from the tokenizer's own chat template."""

from __future__ import annotations

import pytest
import torch

from prophet_rag.config import PromptConfig
from prophet_rag.errors import InvalidRequestError
from prophet_rag.layout import PromptBuilder
from tiny import CHUNKS, QUERY, tiny_tokenizer


@pytest.fixture
def builder():
    return PromptBuilder(tiny_tokenizer(), PromptConfig())


def test_chunk_ids_do_not_depend_on_their_neighbours_or_position(builder):
    a = builder.layout([CHUNKS[0], CHUNKS[1]], QUERY)
    b = builder.layout([CHUNKS[2], CHUNKS[1], CHUNKS[0]], "another question")
    assert torch.equal(a.chunk_ids[1], b.chunk_ids[1])
    assert torch.equal(a.chunk_ids[0], b.chunk_ids[2])


def test_joined_prompt_decodes_to_the_chat_template_render(builder):
    layout = builder.layout(CHUNKS, QUERY)
    text = builder.tokenizer.decode(layout.joined_ids())
    assert text.startswith("<|im_start|>system\n")
    assert all(chunk in text for chunk in CHUNKS)
    assert text.endswith(f"Question: {QUERY}<|im_end|>\n<|im_start|>assistant\n")


def test_suffix_holds_the_question_and_the_prefix_does_not(builder):
    layout = builder.layout(CHUNKS, QUERY)
    assert QUERY in builder.tokenizer.decode(layout.suffix_ids)
    assert QUERY not in builder.tokenizer.decode(layout.prefix_ids)


def test_system_prompt_replaces_the_template_default():
    builder = PromptBuilder(tiny_tokenizer(), PromptConfig(system_prompt="Be brief."))
    prefix = builder.tokenizer.decode(builder.layout(CHUNKS, QUERY).prefix_ids)
    assert "Be brief." in prefix and "tiny test model" not in prefix


def test_sink_is_the_bos_token(builder):
    assert builder.sink_ids().tolist() == [builder.tokenizer.bos_token_id]


@pytest.mark.parametrize(
    "chunks, query, message",
    [
        ([], QUERY, "chunks is empty"),
        (["ok", "  "], QUERY, "chunk 1 is empty"),
        ("a string", QUERY, "list of strings"),
        (list(CHUNKS), "   ", "query is empty"),
    ],
)
def test_bad_requests_name_the_problem(builder, chunks, query, message):
    with pytest.raises(InvalidRequestError, match=message):
        builder.layout(chunks, query)


def test_question_template_must_hold_the_query():
    with pytest.raises(InvalidRequestError, match="question_template"):
        PromptConfig(question_template="Question:")
