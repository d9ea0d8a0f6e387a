"""Spike (issue 22): constrained decoding through the engine's own decode path, on 50 extraction prompts.

    python benchmarks/spike_structured_decode.py                 # embedded SmolLM2-135M
    python benchmarks/spike_structured_decode.py --model "$(/work/shared/tools/build-qwen05 .venv/bin/python)"

Each prompt asks for a JSON object of a short text's fields (25 people, 25 products, deterministic, with gold
values). Both runs prefill with the engine (`prefiller.prefill`, full prefill: a plain chat has no documents) and decode
greedily with `generate.sample` / `generate.decode_one`; the constrained run adds the hook phase 2 puts into
`generate.decode`: `constraint.mask(logits)` before `sample`, `constraint.advance(token)` after the EOS check.
Unconstrained output counts as valid JSON when its first `{...}` parses, and as schema-valid when the Pydantic
model accepts it. Field accuracy: a field is right when it equals the gold value (strings compared case- and
space-insensitively, numbers exactly). The overhead column is the time in `mask` + `advance` per generated token
over the time of the rest of the step (decode_one + sample), from the same constrained runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Literal

import torch
from pydantic import BaseModel, ValidationError

from prophet_rag import GenerationConfig, ProphetEngine, SelectionConfig, StoreConfig
from prophet_rag.compute.generate import decode_one, sample
from prophet_rag.structured import Grammar, TokenConstraint

# ---- the extraction set -----------------------------------------------------------------------------------------

Occupation = Literal["engineer", "doctor", "teacher", "chef", "pilot", "artist", "lawyer", "nurse"]
Category = Literal["electronics", "kitchen", "garden", "toys", "books", "sports"]


class Person(BaseModel):
    name: str
    age: int
    city: str
    occupation: Occupation
    email: str | None


class Product(BaseModel):
    name: str
    price: float
    currency: Literal["USD", "EUR", "GBP"]
    category: Category
    in_stock: bool


_FIRST = ["Maria", "John", "Aisha", "Kenji", "Lena", "Carlos", "Priya", "Tomas", "Grace", "Omar", "Sofia", "Ivan",
          "Emma", "Luca", "Nadia", "Peter", "Yuki", "Hannah", "Diego", "Chloe", "Samuel", "Mei", "Noah", "Fatima",
          "Oscar"]
_LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Berg", "Silva", "Patel", "Novak", "Okafor", "Haddad", "Rossi",
         "Petrov", "Wilson", "Bianchi", "Karimi", "Jensen", "Sato", "Meyer", "Garcia", "Dubois", "Mensah", "Chen",
         "Brown", "Aziz", "Larsen"]
_CITIES = ["Lisbon", "Chicago", "Lahore", "Osaka", "Oslo", "Recife", "Pune", "Prague", "Lagos", "Beirut", "Milan",
           "Kazan", "Leeds", "Turin", "Tehran", "Aarhus", "Kyoto", "Munich", "Seville", "Lyon", "Accra", "Taipei",
           "Denver", "Cairo", "Bergen"]
_JOBS = ["engineer", "doctor", "teacher", "chef", "pilot", "artist", "lawyer", "nurse"]
_PERSON_TEMPLATES = [
    "{first} {last} is a {age}-year-old {job} who lives in {city}.{mail}",
    "Meet {first} {last}, {age}, a {job} based in {city}.{mail}",
    "In {city}, {first} {last} works as a {job}. {pron} is {age} years old.{mail}",
    "{first} {last} ({age}) has worked as a {job} in {city} for years.{mail}",
    "Our new neighbour in {city} is {first} {last}, a {job} aged {age}.{mail}",
]
_PRODUCTS = [
    ("AeroBlend 500", "kitchen"), ("Quantum Earbuds", "electronics"), ("GreenThumb Trowel", "garden"),
    ("RoboPup Jr", "toys"), ("The Silent Orbit", "books"), ("TrailRunner X2", "sports"),
    ("SnapCam Mini", "electronics"),
    ("CopperPro Skillet", "kitchen"), ("BloomMax Planter", "garden"), ("BrickCity Set", "toys"),
    ("Rivers of Ash", "books"), ("PowerGrip Racket", "sports"), ("Nimbus Lamp", "electronics"),
    ("ChefMate Knife", "kitchen"), ("AquaDrip Hose", "garden"), ("Stellar Kite", "toys"), ("Midnight Ledger", "books"),
    ("FlexCore Mat", "sports"), ("PixelPad 8", "electronics"), ("SteamEase Kettle", "kitchen"),
    ("HedgeMaster Shears", "garden"), ("Puzzle Planet", "toys"), ("Glass Harbor", "books"), ("SwiftBall Pro", "sports"),
    ("EchoSpeaker", "electronics"),
]
_SYMBOL = {"USD": "$", "EUR": "€", "GBP": "£"}
_PRODUCT_TEMPLATES = [
    "The {name} ({cat}) sells for {sym}{price}. {stock}",
    "New in our {cat} range: {name}, priced at {price} {cur}. {stock}",
    "{name} is a {cat} product costing {sym}{price}. {stock}",
    "Price check: {name}, {sym}{price}, category {cat}. {stock}",
    "Shop note: {stock} The {name} costs {price} {cur} and belongs to {cat}.",
]


def extraction_set() -> list[tuple[str, type[BaseModel], dict]]:
    """50 (text, schema, gold) triples: 25 people, 25 products; deterministic."""
    items = []
    for i in range(25):
        first, last, city = _FIRST[i], _LAST[(i * 7) % 25], _CITIES[(i * 3) % 25]
        job, age = _JOBS[i % len(_JOBS)], 22 + (i * 13) % 50
        email = f"{first.lower()}.{last.lower()}@example.com" if i % 3 else None
        mail = f" Contact: {email}." if email else ""
        text = _PERSON_TEMPLATES[i % 5].format(first=first, last=last, age=age, job=job, city=city, mail=mail,
                                               pron="She" if i % 2 == 0 else "He")
        gold = {"name": f"{first} {last}", "age": age, "city": city, "occupation": job, "email": email}
        items.append((text, Person, gold))
    for i, (name, cat) in enumerate(_PRODUCTS):
        cur = ("USD", "EUR", "GBP")[i % 3]
        price = round(5 + (i * 17.35) % 300, 2)
        in_stock = i % 4 != 0
        stock = "It is in stock." if in_stock else "It is currently out of stock."
        text = _PRODUCT_TEMPLATES[i % 5].format(name=name, cat=cat, sym=_SYMBOL[cur], price=f"{price:.2f}",
                                                cur=cur, stock=stock)
        gold = {"name": name, "price": price, "currency": cur, "category": cat, "in_stock": in_stock}
        items.append((text, Product, gold))
    return items


def prompt(text: str, schema: type[BaseModel]) -> list[dict]:
    fields = ", ".join(schema.model_fields)
    hint = " Use null for a missing email." if schema is Person else ""
    return [{"role": "user", "content": f"Extract {fields} from the text below as one JSON object with exactly "
                                        f"those keys.{hint}\n\nText: {text}\n\nJSON:"}]


# ---- decoding with the hook --------------------------------------------------------------------------------------


def run(engine: ProphetEngine, messages, max_new: int, constraint: TokenConstraint | None):
    """Greedy decode through the engine's path; returns (text, tokens, hook seconds, step seconds)."""
    layout = engine.builder.chat_layout(messages)
    config = GenerationConfig(max_new_tokens=max_new)
    prefill = engine.prefiller.prefill(layout, SelectionConfig(method="full"), layout.total_tokens + max_new)
    eos = set(engine._default_eos())
    with torch.inference_mode():
        logits = engine.adapter.logits(prefill.hidden[-1:])[0]
        tokens, hook_s, step_s = [], 0.0, 0.0
        for step in range(max_new):
            t0 = time.perf_counter()
            if constraint is not None:
                constraint.mask(logits)
            t1 = time.perf_counter()
            token = sample(logits, config, None)
            t2 = time.perf_counter()
            if token in eos:
                hook_s += t1 - t0
                step_s += t2 - t1
                break
            tokens.append(token)
            if constraint is not None:
                constraint.advance(token)
            t3 = time.perf_counter()
            if step < max_new - 1:
                logits = decode_one(engine.adapter, prefill.cache, token)
            t4 = time.perf_counter()
            hook_s += (t1 - t0) + (t3 - t2)
            step_s += (t2 - t1) + (t4 - t3)
    return engine.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), hook_s, step_s


def first_json(text: str):
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except json.JSONDecodeError:
        return None


def same(value, gold) -> bool:
    if isinstance(gold, str) and isinstance(value, str):
        return " ".join(value.lower().split()) == " ".join(gold.lower().split())
    if isinstance(gold, bool) or gold is None:
        return value is gold
    if isinstance(gold, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return abs(value - gold) < 1e-6
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--show", type=int, default=4, help="print this many outputs of each mode")
    parser.add_argument("--modes", default="unconstrained,constrained", help="which modes to run")
    parser.add_argument("--max-string-chars", type=int, default=None,
                        help="bound the schema's free strings (Grammar.json_schema(max_string_chars=...))")
    parser.add_argument("--show-invalid", action="store_true", help="print every output that is not valid JSON")
    parser.add_argument("--only", default=None, help="comma-separated prompt indices (0-49) to run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = ProphetEngine.from_pretrained(args.model, store=StoreConfig(directory=tempfile.mkdtemp()))
    vocab = int(engine.adapter.model.config.vocab_size)
    eos = engine._default_eos()
    stats = {m: {"valid_json": 0, "schema_valid": 0, "fields": 0, "right": 0, "exact": 0, "tokens": 0}
             for m in ("unconstrained", "constrained")}
    hook, step, compile_s = [], [], []
    data = extraction_set()[: args.limit]
    if args.only:
        data = [data[int(i)] for i in args.only.split(",")]
    for n, (text, schema, gold) in enumerate(data):
        for mode in args.modes.split(","):  # interleaved
            constraint = None
            if mode == "constrained":
                t0 = time.perf_counter()
                grammar = Grammar.json_schema(schema, max_string_chars=args.max_string_chars)
                constraint = TokenConstraint.build(grammar, engine.tokenizer, vocab, eos)
                compile_s.append(time.perf_counter() - t0)
            out, count, hook_s, step_s = run(engine, prompt(text, schema), args.max_new_tokens, constraint)
            s = stats[mode]
            s["tokens"] += count
            if constraint is not None:
                hook.append(hook_s)
                step.append(step_s)
            value = first_json(out) if mode == "unconstrained" else _loads(out)
            if n < args.show or (value is None and args.show_invalid):
                print(f"[{mode}] {text}\n    -> {out!r}")
            if value is None:
                s["fields"] += len(gold)
                continue
            s["valid_json"] += 1
            try:
                schema.model_validate(value)
                s["schema_valid"] += 1
            except ValidationError:
                pass
            right = sum(same(value.get(k) if isinstance(value, dict) else None, g) for k, g in gold.items())
            s["fields"] += len(gold)
            s["right"] += right
            s["exact"] += right == len(gold)
    total = len(data)
    print(f"\n{engine.model_name}, {total} prompts, greedy, max_new_tokens={args.max_new_tokens}, "
          f"max_string_chars={args.max_string_chars}")
    print("| mode | valid JSON | schema-valid | field accuracy | all fields right | tokens generated |")
    print("|---|---|---|---|---|---|")
    for mode, s in stats.items():
        if not s["fields"]:
            continue
        print(f"| {mode} | {s['valid_json']}/{total} | {s['schema_valid']}/{total} | "
              f"{s['right']}/{s['fields']} ({100 * s['right'] / s['fields']:.0f}%) | {s['exact']}/{total} | "
              f"{s['tokens']} |")
    tokens = stats["constrained"]["tokens"]
    print(f"\nconstrained: mask+advance {1e6 * sum(hook) / tokens:.0f} us/token, rest of the step "
          f"{1e3 * sum(step) / tokens:.1f} ms/token: overhead {100 * sum(hook) / sum(step):.2f}% "
          f"(per prompt, median {100 * statistics.median(h / s for h, s in zip(hook, step, strict=True)):.2f}%); "
          f"grammar build (cache hit after the first of each schema) median {1e3 * statistics.median(compile_s):.2f}"
          f" ms, first {1e3 * compile_s[0]:.0f} ms")


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


if __name__ == "__main__":
    main()
