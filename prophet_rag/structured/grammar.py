"""Constrained decoding: what an answer must match (`Grammar`) and the per-request token mask (`TokenConstraint`).

The grammar engine is llguidance (chosen by measurement, see notes/22-design.md): a grammar is checked and prepared
once per tokenizer and kept in a bounded process-wide cache; each request drives its own copy of the prepared
matcher. The decode loop calls, per step:

    constraint.mask(logits)        # in place: tokens the grammar forbids get -inf
    token = sample(logits, ...)
    constraint.advance(token)      # after the EOS check: an EOS token ends decoding and is never advanced

so selection, reuse and recomputation are untouched: only the logits of the step change.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from prophet_rag.errors import InvalidRequestError, ProphetRAGError

_KINDS = ("json_schema", "regex", "lark", "any_json")

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How generated JSON is spaced: like `json.dumps` (`{"a": 1, "b": [2, 3]}`), no free whitespace. A small model
given free whitespace can spend its whole budget on newlines inside an object."""


class GrammarViolationError(ProphetRAGError):
    """A token the grammar does not allow reached `TokenConstraint.advance`: the logits were not masked with this
    constraint before sampling (a bug in the decode loop, never a model error)."""


@dataclass(frozen=True)
class Grammar:
    """What a constrained answer must match; build it with `json_schema`, `regex`, `lark` or `any_json`.

    `source` is what llguidance compiles (a Lark grammar, which may embed JSON schemas as `%json {...}`), compact
    and deterministic, so equal grammars share one cache entry. Key order is kept: the order of `properties` is the
    order the answer's fields are generated in.
    """

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidRequestError(f"grammar kind must be one of {', '.join(_KINDS)}, got {self.kind!r}.")
        if not isinstance(self.source, str):
            raise InvalidRequestError(f"grammar source must be a string, got {type(self.source).__name__}.")

    @classmethod
    def json_schema(cls, schema: Mapping | str | type, *, max_string_chars: int | None = None,
                    max_items: int | None = None) -> Grammar:
        """A JSON value matching `schema`: a JSON-schema mapping, its JSON text, or a Pydantic model class.

        Strict, as OpenAI's structured outputs: an object lists only its `properties` unless the schema says
        otherwise (`additionalProperties: {...}`); a Pydantic model's schema does not say `additionalProperties:
        false`, and a small model left free adds keys of its own.

        `max_string_chars` / `max_items` bound the free-form strings and arrays the schema leaves unbounded (no
        `maxLength` / `maxItems`, `enum`, `const`, `pattern` or `format`): a greedy model can repeat itself inside a
        string forever (SmolLM2 writing `"john-john-john-...` for a missing email), and only a bound makes every
        answer end within a token budget."""
        bounded = bound_schema(strict_schema(schema_dict(schema)), max_string_chars, max_items)
        return cls("json_schema", json_text(bounded))

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequestError(f"regex must be a non-empty string, got {pattern!r}.")
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (`%json {...}` for a schema, `<[id]>` for a special token)."""
        if not isinstance(grammar, str) or "start" not in grammar:
            raise InvalidRequestError("a Lark grammar must be a string defining the rule 'start'.")
        return cls("lark", grammar)

    @classmethod
    def any_json(cls) -> Grammar:
        """Any JSON object or array (JSON mode without a schema)."""
        return cls("any_json")


def schema_dict(schema: Mapping | str | type) -> dict:
    """`schema` as a JSON-schema dict: a mapping, JSON text of an object, or a Pydantic model class."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {error}.") from None
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(
            f"a JSON schema must be a mapping, JSON text of an object or a Pydantic model class, got "
            f"{type(schema).__name__}."
        )
    return dict(schema)


def strict_schema(node: object) -> object:
    """`node` with `additionalProperties: false` on every object schema that lists `properties` and says nothing
    about other keys (a copy; the caller's schema is not changed)."""
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    if not isinstance(node, Mapping):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if isinstance(node.get("properties"), Mapping) and not {"additionalProperties", "patternProperties",
                                                            "unevaluatedProperties"} & set(node):
        out["additionalProperties"] = False
    return out


def bound_schema(node: object, max_string_chars: int | None, max_items: int | None) -> object:
    """`node` with `maxLength` / `maxItems` on the strings / arrays it leaves unbounded (see `Grammar.json_schema`)."""
    for name, bound in (("max_string_chars", max_string_chars), ("max_items", max_items)):
        if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool) or bound < 1):
            raise InvalidRequestError(f"{name} must be an integer >= 1 or None, got {bound!r}.")
    if max_string_chars is None and max_items is None:
        return node

    def walk(n: object) -> object:
        if isinstance(n, list):
            return [walk(v) for v in n]
        if not isinstance(n, Mapping):
            return n
        out = {k: walk(v) for k, v in n.items()}
        free = not {"enum", "const", "pattern", "format"} & set(n)
        if max_string_chars and n.get("type") == "string" and free and "maxLength" not in n:
            out["maxLength"] = max_string_chars
        if max_items and n.get("type") == "array" and "maxItems" not in n:
            out["maxItems"] = max(max_items, n.get("minItems", 0))
        return out

    return walk(node)


def json_text(value: object) -> str:
    """Compact JSON of plain data; an `InvalidRequestError` for anything JSON cannot hold."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"a JSON schema must be plain JSON data: {error}.") from None


def embedded_json(schema: Mapping) -> str:
    """`schema`, strict and with `JSON_STYLE`, as JSON text for `%json {...}` inside a Lark grammar."""
    return json_text({"x-guidance": JSON_STYLE, **strict_schema(dict(schema))})


def _llguidance_source(grammar: Grammar) -> str:
    import llguidance

    if grammar.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(json.loads(grammar.source), overrides=JSON_STYLE)
    if grammar.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(grammar.source)
    if grammar.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(grammar.source)
    return llguidance.LLMatcher.grammar_from_json_schema({"type": ["object", "array"]}, overrides=JSON_STYLE)


# ---- prepared grammars, cached per tokenizer -----------------------------------------------------------------


class GrammarCache:
    """Prepared matchers keyed by (tokenizer fingerprint, vocabulary size, stop ids, grammar), least recently used
    dropped past `max_entries`; requests get copies. Thread-safe; two threads preparing the same grammar at once
    both prepare it, one copy is kept."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._prepared: OrderedDict[tuple, object] = OrderedDict()
        self._tokenizers: dict[tuple, object] = {}
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.compiles = 0

    def fingerprint(self, tokenizer) -> str:
        with self._lock:
            known = self._fingerprints.get(tokenizer)
        if known is None:
            from prophet_rag.cache.keys import tokenizer_fingerprint

            known = tokenizer_fingerprint(tokenizer)
            with self._lock:
                self._fingerprints[tokenizer] = known
        return known

    def _tokenizer(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
        import llguidance.hf

        key = (self.fingerprint(tokenizer), vocab_size, stop_ids)
        with self._lock:
            prepared = self._tokenizers.get(key)
        if prepared is None:
            try:  # ~1-3 s: the token trie of the whole vocabulary
                prepared = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_ids))
            except ValueError as error:
                raise InvalidRequestError(f"constrained decoding needs a fast (Rust) tokenizer: {error}") from None
            with self._lock:
                prepared = self._tokenizers.setdefault(key, prepared)
        return prepared

    def matcher(self, tokenizer, vocab_size: int, stop_ids: Collection[int], grammar: Grammar):
        """A fresh llguidance `LLMatcher` of `grammar` for this tokenizer; the grammar is prepared on first use."""
        import llguidance

        stop = tuple(sorted({int(i) for i in stop_ids}))
        if not stop:
            raise InvalidRequestError("constrained decoding needs at least one stop (EOS) token id.")
        key = (self.fingerprint(tokenizer), vocab_size, stop, grammar)
        with self._lock:
            found = self._prepared.get(key)
            if found is not None:
                self._prepared.move_to_end(key)
        if found is None:
            found = llguidance.LLMatcher(self._tokenizer(tokenizer, vocab_size, stop), _llguidance_source(grammar),
                                         log_level=0)
            # One mask on the kept matcher builds the lexer states its copies start from: a copy's first mask then
            # takes ~0.25 ms instead of 2-12 ms (SmolLM2, a 6-field schema).
            first = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)
            if not found.is_error():
                found.unsafe_compute_mask_ptr(first.data_ptr(), first.numel() * 4)
            if found.is_error():
                raise InvalidRequestError(
                    f"cannot compile the {grammar.kind.replace('_', ' ')} into a grammar: "
                    f"{found.get_error().strip()[:300]}"
                )
            with self._lock:
                self.compiles += 1
                self._prepared[key] = found
                while len(self._prepared) > self.max_entries:
                    self._prepared.popitem(last=False)
        return found.deep_copy()


DEFAULT_CACHE = GrammarCache()


# ---- the per-request object the decode loop drives ---------------------------------------------------------------


_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set `logits[i] = -inf` wherever bit i of `bitmask` is 0, in place, and return `logits`. `logits` is
    `[vocab]`, `bitmask` `[ceil(vocab / 32)]` int32 with token i at bit `i % 32` of word `i // 32` (llguidance's
    and xgrammar's layout), on the logits' device. Pure torch: the reference, and the path for accelerator logits."""
    allowed = (bitmask.view(-1, 1) & _BITS.to(bitmask.device)).ne(0).view(-1)[: logits.numel()]
    return logits.masked_fill_(~allowed, float("-inf"))


def apply_bitmask_cpu_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`apply_bitmask_` for contiguous CPU logits through numpy: one single-threaded unpack and one masked store,
    no torch parallel region: 46-49 us at 49K tokens and 120-154 us at 152K, where the torch path takes ~100 and
    ~280 us (benchmarks/spike_grammar_engines.py, one thread)."""
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: logits.numel()].view(bool)
    logits.numpy()[~allowed] = -np.inf
    return logits


class TokenConstraint:
    """One request's constrained decoding state.

    `mask(logits)` sets forbidden tokens' `[vocab]` logits to -inf in place (and returns them); `advance(token)`
    moves past a sampled token; `is_finished()` says the grammar takes no further token; `reset()` starts over.
    Stop tokens (the EOS ids the grammar was prepared with) are allowed exactly where the output is complete.
    """

    def __init__(self, matcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._bitmask = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)
        self.vocab_size = vocab_size
        self.tokens = 0

    @classmethod
    def build(cls, grammar: Grammar, tokenizer, vocab_size: int, stop_ids: Collection[int],
              cache: GrammarCache | None = None) -> TokenConstraint:
        """A fresh constraint for one request; the grammar is prepared once per tokenizer (`cache`)."""
        return cls((cache or DEFAULT_CACHE).matcher(tokenizer, vocab_size, stop_ids, grammar), vocab_size)

    def _fill(self) -> None:
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape != (self.vocab_size,):
            raise InvalidRequestError(
                f"logits must be [{self.vocab_size}] (the model's vocabulary), got {list(logits.shape)}."
            )
        self._fill()
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            return apply_bitmask_cpu_(logits, self._bitmask)
        return apply_bitmask_(logits, self._bitmask.to(logits.device, non_blocking=True))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise GrammarViolationError(
                f"token {token} is not allowed by the grammar after {self.tokens} tokens; mask the logits with "
                "this constraint before sampling each token."
            )
        self.tokens += 1

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (fills the mask; for checks and tests, not the decode loop)."""
        self._fill()
        return bool((int(self._bitmask[token // 32]) >> (token % 32)) & 1)

    def is_finished(self) -> bool:
        """True once a stop token was taken or the grammar can take nothing more."""
        return self._matcher.is_stopped()

    def is_complete(self) -> bool:
        """True when the output so far is a whole match (a stop token may come now)."""
        return self._matcher.is_accepting()

    def reset(self) -> None:
        self._matcher.reset()
        self.tokens = 0
