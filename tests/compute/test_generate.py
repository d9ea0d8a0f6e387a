"""Sampling and incremental text with stop strings."""

from __future__ import annotations

import pytest
import torch

from prophet_rag.compute.generate import TextAssembler, sample
from prophet_rag.config import GenerationConfig
from tiny import CHUNKS, QUERY, tiny_tokenizer


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0])
    assert sample(logits, GenerationConfig(), None) == 1


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.randn(50)
    config = GenerationConfig(temperature=1.0, top_k=1)
    assert all(sample(logits, config, torch.Generator().manual_seed(s)) == int(logits.argmax()) for s in range(5))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([10.0, 9.0, -5.0, -5.0])
    config = GenerationConfig(temperature=1.0, top_p=0.9)
    picks = {sample(logits, config, torch.Generator().manual_seed(s)) for s in range(40)}
    assert picks <= {0, 1}


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(100)
    config = GenerationConfig(temperature=1.0)
    a = [sample(logits, config, torch.Generator().manual_seed(3)) for _ in range(3)]
    b = [sample(logits, config, torch.Generator().manual_seed(3)) for _ in range(3)]
    assert a == b


def _feed(assembler, text):
    out = ""
    for token in assembler.tokenizer(text, add_special_tokens=False)["input_ids"]:
        out += assembler.push(token)
        if assembler.stopped:
            break
    return out + assembler.finish()


def test_text_is_cut_at_the_stop_string():
    assembler = TextAssembler(tiny_tokenizer(), ("capital",))
    assert _feed(assembler, "Paris is the capital of France") == "Paris is the "
    assert assembler.stopped


def test_held_back_text_is_flushed_at_the_end():
    assembler = TextAssembler(tiny_tokenizer(), ("capitalism",))
    assert _feed(assembler, "Paris is the capital") == "Paris is the capital"
    assert not assembler.stopped


def test_deltas_concatenate_to_the_decoded_text():
    tok = tiny_tokenizer()
    assembler = TextAssembler(tok, ())
    text = "The vault code of Alpha is 4821."
    assert _feed(assembler, text) == text


def test_stream_yields_the_answer_text(make_engine):
    engine = make_engine("llama")
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=(10**6,))
    stream = engine.stream(CHUNKS, QUERY, method="prophet", generation=config)
    deltas = list(stream)
    assert "".join(deltas) == stream.answer.text
    assert stream.answer.text == engine.answer(CHUNKS, QUERY, method="prophet", generation=config).text
    assert stream.answer.stats.new_tokens == 8


def test_eos_ends_generation(make_engine):
    engine = make_engine("llama")
    first = engine.answer(CHUNKS, QUERY, generation=GenerationConfig(max_new_tokens=1, eos_token_ids=(10**6,)))
    stopped = engine.answer(CHUNKS, QUERY, generation=GenerationConfig(max_new_tokens=8,
                                                                       eos_token_ids=(first.token_ids[0],)))
    assert stopped.token_ids == () and stopped.text == ""


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_generation_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)
