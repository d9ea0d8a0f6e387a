"""Spike (issue 22): xgrammar, llguidance and outlines-core side by side, to pick the grammar engine.

    pip install xgrammar==0.2.8 llguidance==1.9.1 outlines-core==0.2.14   # only xgrammar stays installed
    python benchmarks/spike_grammar_engines.py                            # embedded SmolLM2-135M, and Qwen2.5 if given
    python benchmarks/spike_grammar_engines.py --qwen "$(/work/shared/tools/build-qwen05 .venv/bin/python)"

Per model: tokenizer preparation, compile time of a 6-field Pydantic schema (nested object, array, enum, optional),
time to the first mask, and per generated token the mask fill, its application to `[vocab]` fp32 logits (the
library's own CPU kernel, and prophet-rag's two: pure torch, and numpy's unpackbits) and the state advance,
driven along the schema's canonical answer; then one decode step of the same model (`generate.decode_one` over a
~500-token prompt), in the same rounds, so the overhead column is a ratio from one interleaved run. Then the
JSON-schema features of LangChain / LlamaIndex tool schemas, and a "free text or a tool call" grammar, each checked
by feeding a valid and an invalid output token by token.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel

from prophet_rag.structured.grammar import apply_bitmask_, apply_bitmask_cpu_

# ---- the schema under test ------------------------------------------------------------------------------------


class Address(BaseModel):
    city: str
    country: str


class Person(BaseModel):
    name: str
    age: int
    occupation: Literal["engineer", "doctor", "teacher", "chef", "pilot", "artist"]
    email: str | None = None
    skills: list[str]
    address: Address


PERSON = Person.model_json_schema()
PERSON_TEXT = json.dumps({"name": "Maria Lopez", "age": 34, "occupation": "pilot", "email": None,
                          "skills": ["navigation", "radio"], "address": {"city": "Lisbon", "country": "Portugal"}})


# ---- the three engines behind one small interface ---------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table (byte-level BPE vocabularies spell tokens with it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class XGrammar:
    name = "xgrammar 0.2.8"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema))

    def compile_tool_text(self, tools: list[dict]):
        st = {"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": ["<tool_call>"],
            "tags": [{"begin": '<tool_call>\n{"name": "' + t["name"] + '", "arguments": ',
                      "content": {"type": "json_schema", "json_schema": t["parameters"]},
                      "end": "}\n</tool_call>"} for t in tools]}}
        return self.xgr.GrammarCompiler(self.info, cache_enabled=False).compile_structural_tag(json.dumps(st))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(1, self.vocab_size)

    def fill(self, m, bitmask) -> None:
        m.fill_next_token_bitmask(bitmask)

    def advance(self, m, token: int) -> bool:
        return m.accept_token(token)

    def apply(self, logits, bitmask) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class LLGuidance:
    name = "llguidance 1.9.1"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self.added = tokenizer.get_added_vocab()

    def _matcher(self, grammar: str):
        m = self.ll.LLMatcher(self.info, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def compile(self, schema: dict):
        return self._matcher(self.ll.LLMatcher.grammar_from_json_schema(schema))

    def compile_tool_text(self, tools: list[dict]):
        # An added token (Qwen2.5's <tool_call>) is not text to llguidance: the grammar names it by id.
        opener, closer = (f"<[{self.added[t]}]>" if t in self.added else json.dumps(t)
                          for t in ("<tool_call>", "</tool_call>"))
        rules = "\n".join(
            f'call{i}: "\\n{{\\"name\\": \\"{t["name"]}\\", \\"arguments\\": " args{i} "}}\\n" {closer}\n'
            f"args{i}: %json {json.dumps(t['parameters'])}" for i, t in enumerate(tools))
        heads = " | ".join(f"call{i}" for i in range(len(tools)))
        if opener.startswith("<["):
            lark = f"start: (TEXT {opener} ({heads}))* TEXT\nTEXT: /(.|\\n)*/\n{rules}\n"
        else:
            lark = f"start: (head ({heads}))* TEXT\nhead[lazy]: TEXT {opener}\nTEXT: /(.|\\n)*/\n{rules}\n"
        return self._matcher(self.ll.LLMatcher.grammar_from_lark(lark))

    def matcher(self, compiled):
        return compiled.deep_copy()

    def bitmask(self) -> torch.Tensor:
        return self.ll.torch.allocate_token_bitmask(1, self.vocab_size)

    def fill(self, m, bitmask) -> None:
        self.ll.torch.fill_next_token_bitmask(m, bitmask)

    def advance(self, m, token: int) -> bool:
        return m.consume_token(token)

    def apply(self, logits, bitmask) -> None:
        self.ll.torch.apply_token_bitmask_inplace(logits, bitmask)


class OutlinesCore:
    name = "outlines-core 0.2.14"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import outlines_core

        self.oc = outlines_core
        decode = {c: b for b, c in _bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids) | {i for i in tokenizer.added_tokens_decoder}
        table: dict[bytes, list[int]] = {}
        for token, i in tokenizer.get_vocab().items():
            if i in special or i >= vocab_size:
                continue
            table.setdefault(bytes(decode[c] for c in token), []).append(i)
        self.eos = tokenizer.eos_token_id
        self.vocabulary = outlines_core.Vocabulary(self.eos, table)
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def compile_tool_text(self, tools: list[dict]):
        calls = "|".join(
            "<tool_call>\\n\\{\"name\": \"" + t["name"] + "\", \"arguments\": "
            + self.oc.json_schema.build_regex_from_schema(json.dumps(t["parameters"])) + "\\}\\n</tool_call>"
            for t in tools)
        # Free text is approximated by text without '<' ("any text not containing <tool_call>" is what the other
        # two express directly), and must be non-empty: with an alternative matching the empty string, the first
        # mask drops '<' (outlines-core 0.2.14: `[a-z]*|<b>` refuses '<', `[a-z]+|<b>` takes it).
        return self.oc.Index(f"[^<]+|[^<]*({calls})(\\n({calls}))*", self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def bitmask(self) -> torch.Tensor:
        return torch.full((1, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def fill(self, m, bitmask) -> None:
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def advance(self, m, token: int) -> bool:
        try:
            m.advance(token)
            return True
        except ValueError:
            return False

    def apply(self, logits, bitmask) -> None:
        from outlines_core.kernels.torch import apply_token_bitmask_inplace

        apply_token_bitmask_inplace(logits[None], bitmask)


ENGINES = (XGrammar, LLGuidance, OutlinesCore)


def apply_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    apply_bitmask_(logits, bitmask.view(-1))


def apply_numpy(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    apply_bitmask_cpu_(logits, bitmask.view(-1))


def allowed(bitmask: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask.view(-1)[token // 32]) >> (token % 32)) & 1)


# ---- measurements -----------------------------------------------------------------------------------------------


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def walk(engine, compiled, tokens: list[int], eos: int) -> dict[str, list[float]]:
    """Drive a fresh matcher along `tokens` then EOS, timing each step's fill, apply and advance."""
    m = engine.matcher(compiled)
    bitmask = engine.bitmask()
    logits = torch.randn(engine.vocab_size)
    times: dict[str, list[float]] = {"fill": [], "apply_native": [], "apply_torch": [], "apply_numpy": [],
                                     "advance": []}
    for token in [*tokens, eos]:
        _, t = timed(engine.fill, m, bitmask)
        times["fill"].append(t)
        assert allowed(bitmask, token), f"{engine.name}: token {token} not allowed"
        work = logits.clone()
        _, t = timed(engine.apply, work, bitmask)
        times["apply_native"].append(t)
        work2 = logits.clone()
        _, t = timed(apply_torch, work2, bitmask)
        times["apply_torch"].append(t)
        assert torch.equal(torch.isinf(work), torch.isinf(work2))
        work3 = logits.clone()
        _, t = timed(apply_numpy, work3, bitmask)
        times["apply_numpy"].append(t)
        assert torch.equal(work2, work3)
        if token != eos:
            ok, t = timed(engine.advance, m, token)
            assert ok, f"{engine.name}: token {token} refused"
            times["advance"].append(t)
    return times


def decode_steps(model_dir: str | None, steps: int):
    """A closure timing `steps` decode steps of the model over a ~500-token RAG prompt; returns seconds per step."""
    from bench_ttft import make_documents  # sibling script

    from prophet_rag import ProphetEngine, StoreConfig
    from prophet_rag.compute.generate import decode_one
    from prophet_rag.prefill import prefill_full

    store = tempfile.mkdtemp(prefix="spike-store-")
    engine = ProphetEngine.from_pretrained(model_dir, store=StoreConfig(directory=store))
    docs = make_documents(engine.tokenizer, 500, 250)
    layout = engine.builder.layout(docs, "Which clerk kept the keys to archive room 121?")

    def run() -> float:
        with torch.inference_mode():
            cache, _ = prefill_full(engine.adapter, layout.joined_ids(), int(layout.prefix_ids.numel()),
                                    layout.total_tokens + steps + 1, engine.kv_dtype)
            token = 42
            start = time.perf_counter()
            for _ in range(steps):
                decode_one(engine.adapter, cache, token)
            return (time.perf_counter() - start) / steps

    return run, engine


def us(values) -> str:
    return f"{statistics.median(values) * 1e6:.0f}"


def measure(label: str, model_dir: str | None, rounds: int) -> None:
    run_decode, engine = decode_steps(model_dir, 16)
    tokenizer = engine.tokenizer
    vocab = int(engine.adapter.model.config.vocab_size)
    tokens = tokenizer(PERSON_TEXT, add_special_tokens=False)["input_ids"]
    print(f"\n## {label}: vocab {vocab} (tokenizer {len(tokenizer)}), canonical answer {len(tokens)} tokens + EOS")
    engines, prep, compile_s, first_mask = [], {}, {}, {}
    for cls in ENGINES:
        e, prep[cls.name] = timed(cls, tokenizer, vocab)
        compiled, compile_s[cls.name] = timed(e.compile, PERSON)
        m, bm = e.matcher(compiled), e.bitmask()
        _, first_mask[cls.name] = timed(e.fill, m, bm)
        engines.append((e, compiled))
    run_decode()  # warm-up
    step_s, per = [], {e.name: {} for e, _ in engines}
    first_apply = {}
    for r in range(rounds + 1):
        step_s.append(run_decode())
        for e, compiled in engines:
            if r == 0:  # the libraries' torch.compile kernels build on their first call: timed apart
                bm = e.bitmask()
                _, first_apply[e.name] = timed(e.apply, torch.randn(vocab), bm)
            times = walk(e, compiled, tokens, tokenizer.eos_token_id)
            if r:
                for k, v in times.items():
                    per[e.name].setdefault(k, []).extend(v)
    step = statistics.median(step_s[1:])
    print(f"decode step (decode_one, median of {rounds} rounds x 16 steps): {step * 1e3:.2f} ms")
    print("| engine | tokenizer prep s | compile s | first mask ms | first apply call s | fill us | apply (own "
          "kernel) us | apply (torch) us | apply (numpy) us | advance us | fill + numpy apply + advance, % of a "
          "decode step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for e, _ in engines:
        t = per[e.name]
        total = statistics.median(t["fill"]) + statistics.median(t["apply_numpy"]) + statistics.median(t["advance"])
        print(f"| {e.name} | {prep[e.name]:.2f} | {compile_s[e.name]:.3f} | {first_mask[e.name] * 1e3:.2f} | "
              f"{first_apply[e.name]:.2f} | {us(t['fill'])} | {us(t['apply_native'])} | {us(t['apply_torch'])} | "
              f"{us(t['apply_numpy'])} | "
              f"{us(t['advance'])} | {100 * total / step:.2f}% |")
    features(engines, tokenizer)
    tool_text(engines, tokenizer)
    del engine, engines
    gc.collect()


# ---- JSON-schema features of tool schemas ------------------------------------------------------------------------

_FEATURES: list[tuple[str, dict, str, str]] = [
    ("optional: anyOf [T, null] + default", {"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"},
     {"type": "null"}], "default": None}}}, '{"a": null}', '{"a": "x"}'),
    ("enum", {"type": "object", "properties": {"u": {"enum": ["c", "f"]}}, "required": ["u"]}, '{"u": "f"}',
     '{"u": "k"}'),
    ("$defs + $ref (nested model)", {"$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}},
     "required": ["x"]}}, "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"]},
     '{"p": {"x": 1}}', '{"p": {"x": "1"}}'),
    ("allOf wrapping $ref", {"$defs": {"E": {"enum": ["a", "b"]}}, "type": "object", "properties": {
     "e": {"allOf": [{"$ref": "#/$defs/E"}], "description": "d"}}, "required": ["e"]}, '{"e": "a"}', '{"e": "z"}'),
    ("recursive $ref", {"$defs": {"N": {"type": "object", "properties": {"kids": {"type": "array", "items": {
     "$ref": "#/$defs/N"}}}, "required": ["kids"]}}, "$ref": "#/$defs/N"}, '{"kids": [{"kids": []}]}',
     '{"kids": [{}]}'),
    ("array minItems/maxItems", {"type": "object", "properties": {"t": {"type": "array", "items": {"type": "string"},
     "minItems": 1, "maxItems": 2}}, "required": ["t"]}, '{"t": ["a"]}', '{"t": []}'),
    ("integer minimum/maximum", {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
     "maximum": 10}}, "required": ["n"]}, '{"n": 7}', '{"n": 11}'),
    ("number exclusiveMinimum", {"type": "object", "properties": {"x": {"type": "number", "exclusiveMinimum": 0}},
     "required": ["x"]}, '{"x": 0.5}', '{"x": -1}'),
    ("string minLength/maxLength", {"type": "object", "properties": {"s": {"type": "string", "minLength": 2,
     "maxLength": 3}}, "required": ["s"]}, '{"s": "ab"}', '{"s": "abcd"}'),
    ("string maxLength: JSON escapes in, raw control characters out", {"type": "object", "properties": {"s": {
     "type": "string", "maxLength": 8}}, "required": ["s"]}, '{"s": "a\\u0001b"}', '{"s": "a\x01b"}'),
    ("string pattern", {"type": "object", "properties": {"z": {"type": "string", "pattern": "^[0-9]{5}$"}},
     "required": ["z"]}, '{"z": "12345"}', '{"z": "1234a"}'),
    ("format date", {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]},
     '{"d": "2024-05-01"}', '{"d": "May 1"}'),
    ("format date-time", {"type": "object", "properties": {"d": {"type": "string", "format": "date-time"}},
     "required": ["d"]}, '{"d": "2024-05-01T10:00:00Z"}', '{"d": "tomorrow"}'),
    ("format email", {"type": "object", "properties": {"m": {"type": "string", "format": "email"}},
     "required": ["m"]}, '{"m": "a@b.com"}', '{"m": "nope"}'),
    ("const", {"type": "object", "properties": {"k": {"const": "v1"}}, "required": ["k"]}, '{"k": "v1"}',
     '{"k": "v2"}'),
    ("oneOf (discriminated union)", {"type": "object", "properties": {"pet": {"oneOf": [
     {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
      "required": ["kind", "lives"]},
     {"type": "object", "properties": {"kind": {"const": "dog"}, "bark": {"type": "boolean"}},
      "required": ["kind", "bark"]}]}}, "required": ["pet"]}, '{"pet": {"kind": "dog", "bark": true}}',
     '{"pet": {"kind": "dog", "lives": 9}}'),
    ("type list [string, null]", {"type": "object", "properties": {"s": {"type": ["string", "null"]}},
     "required": ["s"]}, '{"s": null}', '{"s": 3}'),
    ("additionalProperties schema (dict[str, int])", {"type": "object", "properties": {"m": {"type": "object",
     "additionalProperties": {"type": "integer"}}}, "required": ["m"]}, '{"m": {"x": 1, "y": 2}}',
     '{"m": {"x": "1"}}'),
    ("additionalProperties false", {"type": "object", "properties": {"a": {"type": "integer"}},
     "additionalProperties": False}, '{"a": 1}', '{"a": 1, "b": 2}'),
    ("no-argument tool {properties: {}}", {"type": "object", "properties": {}}, "{}", '{"a": 1}'),
    ("any value ({} schema)", {"type": "object", "properties": {"v": {}}, "required": ["v"]},
     '{"v": [1, {"a": "b"}]}', '{"v": }'),
]


def _feed(engine, compiled, tokens: list[int], eos: int) -> bool:
    """True when the matcher takes every token and then allows EOS (the output is complete)."""
    m = engine.matcher(compiled)
    bitmask = engine.bitmask()
    for token in tokens:
        engine.fill(m, bitmask)
        if not allowed(bitmask, token) or not engine.advance(m, token):
            return False
    engine.fill(m, bitmask)
    return allowed(bitmask, eos)


def features(engines, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    print("\nJSON-schema features (ok: compiles, takes the valid output, refuses the invalid one; 'loose': takes "
          "both; 'err': does not compile; 'refuses valid': too strict)")
    print("| feature | " + " | ".join(e.name for e, _ in engines) + " |")
    print("|---|" + "---|" * len(engines))
    for feature, schema, good, bad in _FEATURES:
        cells = []
        for e, _ in engines:
            try:
                compiled = e.compile(schema)
            except Exception as error:  # the table records any refusal
                cells.append(f"err ({str(error).splitlines()[0][:50]})")
                continue
            ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
            takes_good, takes_bad = _feed(e, compiled, ids(good), eos), _feed(e, compiled, ids(bad), eos)
            cells.append({(True, False): "ok", (True, True): "loose", (False, False): "refuses valid",
                          (False, True): "refuses valid, takes invalid"}[takes_good, takes_bad])
        print(f"| {feature} | " + " | ".join(cells) + " |")


# ---- free text or a tool call ------------------------------------------------------------------------------------

TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}},
    {"name": "search_docs", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "k": {"type": "integer", "minimum": 1}}, "required": ["query"]}},
]
_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
TOOL_CASES = [
    ("free text", "It is sunny in Oslo today.", True),
    ("one tool call", _CALL, True),
    ("text, then a tool call", "Let me check. " + _CALL, True),
    ("two tool calls", _CALL + "\n" + _CALL.replace("Oslo", "Rome"), True),
    ("unknown tool name", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', False),
    ("arguments off-schema", _CALL.replace('"celsius"', '"kelvin"'), False),
]


def tool_text(engines, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    print("\nFree text or a Hermes-style tool call (<tool_call>{...}</tool_call>, two tools): compile time, then "
          "whether each output is taken (expected in brackets)")
    print("| engine | compile s | " + " | ".join(f"{n} ({'y' if ok else 'n'})" for n, _, ok in TOOL_CASES) + " |")
    print("|---|---|" + "---|" * len(TOOL_CASES))
    for e, _ in engines:
        try:
            compiled, t = timed(e.compile_tool_text, TOOLS)
        except Exception as error:  # the table records any refusal
            print(f"| {e.name} | err ({str(error).splitlines()[0][:60]}) |")
            continue
        cells = []
        for _, text, _ in TOOL_CASES:
            cells.append("y" if _feed(e, compiled, tokenizer(text, add_special_tokens=False)["input_ids"], eos)
                         else "n")
        print(f"| {e.name} | {t:.3f} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qwen", default=None, help="Qwen2.5 model folder (build-qwen05 prints it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--features-only", action="store_true", help="only the feature tables, no timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.features_only:
        from transformers import AutoTokenizer

        from prophet_rag.embedded import embedded_model_dir

        for path in filter(None, (str(embedded_model_dir()), args.qwen)):
            tokenizer = AutoTokenizer.from_pretrained(path)
            vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
            print(f"\n## {Path(path).name}")
            engines = [(cls(tokenizer, vocab), None) for cls in ENGINES]
            features(engines, tokenizer)
            tool_text(engines, tokenizer)
        return
    measure("SmolLM2-135M-Instruct (embedded)", None, args.rounds)
    if args.qwen:
        measure(f"Qwen2.5 ({Path(args.qwen).name})", args.qwen, args.rounds)


if __name__ == "__main__":
    main()
