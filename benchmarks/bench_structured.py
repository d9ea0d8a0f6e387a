"""Structured output through the engine's own API (issue 22): the 50 extraction prompts of
`spike_structured_decode.py`, answered by `engine.chat(messages, grammar=Grammar.json_schema(schema))` and, for the
comparison, by `engine.chat(messages)` with no grammar (prompted only).

    python benchmarks/bench_structured.py                        # embedded SmolLM2-135M, both modes
    python benchmarks/bench_structured.py --modes constrained --max-string-chars 64

Printed per mode: valid JSON (constrained: the whole answer parses; unconstrained: its first `{...}` does),
schema-valid (the Pydantic model accepts it), field accuracy against the gold values (as in the spike) and answers
cut by `max_new_tokens`. Then each mode's decode time per generated token (`stats.decode_s / stats.new_tokens`,
summed over the run), and their ratio: the grammar's cost per decode step on this machine, in this run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from pydantic import ValidationError
from spike_structured_decode import extraction_set, first_json, prompt, same

from prophet_rag import GenerationConfig, ProphetEngine, StoreConfig
from prophet_rag.structured import Grammar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--modes", default="unconstrained,constrained")
    parser.add_argument("--max-string-chars", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = ProphetEngine.from_pretrained(args.model, store=StoreConfig(directory=tempfile.mkdtemp()))
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    modes = args.modes.split(",")
    stats = {m: {"valid": 0, "schema": 0, "right": 0, "fields": 0, "cut": 0, "tokens": 0, "decode_s": 0.0}
             for m in modes}
    data = extraction_set()[: args.limit]
    t0 = time.perf_counter()
    for text, schema, gold in data:
        for mode in modes:  # interleaved, so both modes see the same load
            grammar = Grammar.json_schema(schema, max_string_chars=args.max_string_chars) \
                if mode == "constrained" else None
            answer = engine.chat(prompt(text, schema), grammar=grammar, generation=generation)
            s = stats[mode]
            s["tokens"] += answer.stats.new_tokens
            s["decode_s"] += answer.stats.decode_s
            s["cut"] += answer.stats.new_tokens >= args.max_new_tokens
            s["fields"] += len(gold)
            value = _loads(answer.text) if grammar is not None else first_json(answer.text)
            if value is None:
                continue
            s["valid"] += 1
            try:
                schema.model_validate(value)
                s["schema"] += 1
            except ValidationError:
                pass
            s["right"] += sum(same(value.get(k) if isinstance(value, dict) else None, g) for k, g in gold.items())
    n = len(data)
    print(f"{engine.model_name}, {n} prompts, greedy, max_new_tokens={args.max_new_tokens}, "
          f"max_string_chars={args.max_string_chars}, torch threads {torch.get_num_threads()}, "
          f"{time.perf_counter() - t0:.0f} s")
    print("| mode | valid JSON | schema-valid | field accuracy | cut by the budget | decode ms/token |")
    print("|---|---|---|---|---|---|")
    for mode, s in stats.items():
        print(f"| {mode} | {s['valid']}/{n} | {s['schema']}/{n} | {s['right']}/{s['fields']} "
              f"({100 * s['right'] / s['fields']:.0f}%) | {s['cut']}/{n} | "
              f"{1e3 * s['decode_s'] / max(1, s['tokens']):.1f} |")
    if len(stats) == 2:
        per = {m: s["decode_s"] / max(1, s["tokens"]) for m, s in stats.items()}
        print(f"\nconstrained / unconstrained decode time per token: {per['constrained'] / per['unconstrained']:.3f}")


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


if __name__ == "__main__":
    main()
