"""Grammar specs, the compiled-grammar cache, the token mask and its application to logits."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, Field

from prophet_rag.errors import InvalidRequestError
from prophet_rag.structured.grammar import (
    Grammar,
    GrammarCache,
    GrammarViolationError,
    TokenConstraint,
    apply_bitmask_,
    apply_bitmask_cpu_,
)


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    legs: int = Field(ge=0, le=8)  # bounded, so random logits finish the answer within a few tokens
    vaccinated: bool


PET = '{"kind": "dog", "legs": 4, "vaccinated": true}'


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def constraint(tok, grammar: Grammar, cache: GrammarCache | None = None) -> TokenConstraint:
    return TokenConstraint.build(grammar, tok, len(tok), [tok.eos_token_id], cache or GrammarCache())


def test_a_pydantic_model_its_schema_and_the_schema_text_make_one_grammar():
    schema = Pet.model_json_schema()
    assert Grammar.json_schema(Pet) == Grammar.json_schema(schema) == Grammar.json_schema(json.dumps(schema))


def test_schema_key_order_is_kept_since_it_orders_the_generated_fields():
    a = Grammar.json_schema({"properties": {"b": {}, "a": {}}})
    b = Grammar.json_schema({"properties": {"a": {}, "b": {}}})
    assert a != b
    assert a.source.index('"b"') < a.source.index('"a"')


@pytest.mark.parametrize("schema", [["not", "a", "mapping"], "{not json", 42, {"x": float("nan")}, {"x": {1, 2}}])
def test_a_schema_that_is_not_plain_json_is_refused(schema):
    with pytest.raises(InvalidRequestError):
        Grammar.json_schema(schema)


@pytest.mark.parametrize("make", [lambda: Grammar("yaml"), lambda: Grammar.regex(""),
                                  lambda: Grammar.lark("rule: \"x\"")])
def test_malformed_grammar_specs_are_refused(make):
    with pytest.raises(InvalidRequestError):
        make()


def test_the_canonical_answer_is_allowed_token_by_token_and_eos_only_at_its_end(tok):
    c = constraint(tok, Grammar.json_schema(Pet))
    for token in ids(tok, PET):
        assert not c.allows(tok.eos_token_id)
        assert c.allows(token)
        c.advance(token)
    assert c.is_complete()
    assert c.allows(tok.eos_token_id)
    c.advance(tok.eos_token_id)
    assert c.is_finished()


def test_mask_sets_exactly_the_forbidden_logits_to_minus_infinity_in_place(tok):
    c = constraint(tok, Grammar.json_schema(Pet))
    logits = torch.randn(len(tok))
    before = logits.clone()
    out = c.mask(logits)
    assert out is logits
    allowed = [t for t in range(len(tok)) if c.allows(t)]
    assert 0 < len(allowed) < len(tok)
    kept = torch.isfinite(logits).nonzero().flatten().tolist()
    assert kept == allowed
    assert torch.equal(logits[kept], before[kept])


def test_greedy_decoding_over_masked_logits_always_follows_the_grammar(tok):
    c = constraint(tok, Grammar.json_schema(Pet))
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(200):
        logits = c.mask(torch.randn(len(tok), generator=generator))
        token = int(torch.argmax(logits))
        if token == tok.eos_token_id:
            break
        c.advance(token)
        out.append(token)
    else:
        pytest.fail("the grammar never allowed EOS")
    Pet.model_validate_json(tok.decode(out))


def test_advancing_a_token_the_grammar_forbids_raises_and_names_the_fix(tok):
    c = constraint(tok, Grammar.json_schema(Pet))
    bad = ids(tok, "x")[0]
    assert not c.allows(bad)
    with pytest.raises(GrammarViolationError, match="mask the logits"):
        c.advance(bad)


def test_reset_starts_the_answer_over(tok):
    c = constraint(tok, Grammar.json_schema(Pet))
    first = ids(tok, PET)[0]
    c.advance(first)
    assert c.tokens == 1
    c.reset()
    assert c.tokens == 0 and c.allows(first)


def test_logits_of_another_size_are_refused(tok):
    c = constraint(tok, Grammar.json_schema(Pet))
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        c.mask(torch.zeros(len(tok) + 1))


def test_regex_and_any_json_grammars(tok):
    c = constraint(tok, Grammar.regex("(yes|no)"))
    for token in ids(tok, "no"):
        c.advance(token)
    assert c.is_complete()
    c = constraint(tok, Grammar.any_json())
    for token in ids(tok, '[1, {"a": null}]'):
        c.advance(token)
    assert c.is_complete()


def test_a_schema_that_cannot_compile_is_a_request_error(tok):
    with pytest.raises(InvalidRequestError, match="cannot compile"):
        constraint(tok, Grammar.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}))


def test_a_grammar_is_compiled_once_per_tokenizer_and_stop_ids(tok):
    cache = GrammarCache()
    grammar = Grammar.json_schema(Pet)
    for _ in range(3):
        TokenConstraint.build(grammar, tok, len(tok), [tok.eos_token_id], cache)
    assert cache.compiles == 1
    TokenConstraint.build(grammar, tok, len(tok), [tok.eos_token_id, tok.pad_token_id], cache)
    assert cache.compiles == 2


def test_the_cache_keeps_the_most_recently_used_grammars_within_its_bound(tok):
    cache = GrammarCache(max_entries=2)
    grammars = [Grammar.regex(word) for word in ("ab", "cd", "ef")]
    for g in (*grammars, grammars[2]):
        TokenConstraint.build(g, tok, len(tok), [tok.eos_token_id], cache)
    assert cache.compiles == 3
    TokenConstraint.build(grammars[0], tok, len(tok), [tok.eos_token_id], cache)  # evicted: compiled again
    assert cache.compiles == 4


def test_constraints_need_a_stop_token(tok):
    with pytest.raises(InvalidRequestError, match="stop"):
        TokenConstraint.build(Grammar.any_json(), tok, len(tok), [], GrammarCache())


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 400, 49152 + 7])
def test_the_numpy_cpu_mask_application_matches_the_torch_reference(vocab):
    generator = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (words,), dtype=torch.int32, generator=generator)
    logits = torch.randn(vocab, generator=generator)
    reference, fast = logits.clone(), logits.clone()
    apply_bitmask_(reference, bitmask)
    apply_bitmask_cpu_(fast, bitmask)
    assert torch.equal(reference, fast)
    expected = [bool((int(bitmask[i // 32]) >> (i % 32)) & 1) for i in range(vocab)]
    assert torch.isfinite(reference).tolist() == expected


def test_constrained_decoding_through_the_engines_own_decode_step(make_engine):
    """The phase-2 hook on a tiny random model: mask before `sample`, advance after the EOS check."""
    from prophet_rag.compute.generate import decode_one, sample
    from prophet_rag.config import GenerationConfig, SelectionConfig

    engine = make_engine("qwen2")
    tok = engine.tokenizer
    layout = engine.builder.chat_layout([{"role": "user", "content": "Describe a pet as JSON."}])
    prefill = engine.prefiller.prefill(layout, SelectionConfig(method="full"), layout.total_tokens + 200)
    vocab = int(engine.adapter.model.config.vocab_size)
    c = TokenConstraint.build(Grammar.json_schema(Pet), tok, vocab, [tok.eos_token_id], GrammarCache())
    with torch.inference_mode():
        logits = engine.adapter.logits(prefill.hidden[-1:])[0]
    out = []
    for _ in range(200):
        token = sample(c.mask(logits), GenerationConfig(), None)
        if token == tok.eos_token_id:
            break
        c.advance(token)
        out.append(token)
        logits = decode_one(engine.adapter, prefill.cache, token)
    else:
        pytest.fail("the grammar never allowed EOS")
    Pet.model_validate_json(tok.decode(out))


def test_bounds_cap_the_strings_and_arrays_a_schema_leaves_free():
    schema = {"type": "object", "properties": {
        "free": {"type": "string"}, "short": {"type": "string", "maxLength": 3}, "pick": {"type": "string",
                                                                                        "enum": ["a"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 5}}}
    props = json.loads(Grammar.json_schema(schema, max_string_chars=8, max_items=2).source)["properties"]
    assert props["free"]["maxLength"] == 8 and props["short"]["maxLength"] == 3 and "maxLength" not in props["pick"]
    assert props["tags"]["maxItems"] == 5 and props["tags"]["items"]["maxLength"] == 8
    assert Grammar.json_schema(schema) != Grammar.json_schema(schema, max_string_chars=8)


def test_a_string_bound_ends_a_runaway_string(tok):
    c = constraint(tok, Grammar.json_schema({"type": "object", "properties": {"s": {"type": "string"}},
                                             "required": ["s"]}, max_string_chars=4))
    for token in ids(tok, '{"s": "abcd'):
        c.advance(token)
    assert not c.allows(ids(tok, "e")[0]) and c.allows(ids(tok, '"')[0])


@pytest.mark.parametrize("bound", [0, -1, 2.5, True, "8"])
def test_bounds_must_be_positive_integers(bound):
    with pytest.raises(InvalidRequestError, match="integer >= 1"):
        Grammar.json_schema({"type": "string"}, max_string_chars=bound)


def test_objects_are_strict_unless_the_schema_opens_them():
    source = json.loads(Grammar.json_schema({"type": "object", "properties": {"a": {"type": "object", "properties": {},
                                             "additionalProperties": {"type": "integer"}}}}).source)
    assert source["additionalProperties"] is False
    assert source["properties"]["a"]["additionalProperties"] == {"type": "integer"}
