"""Run tasks through the engine for every method and ratio, appending one JSON record per run (resumable)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prophet_rag import selectors
from prophet_rag.bench import scoring
from prophet_rag.bench.tasks import TASKS, Case, load_jsonl
from prophet_rag.config import GenerationConfig, SelectionConfig
from prophet_rag.errors import InvalidRequestError
from prophet_rag.selectors import METHODS


@dataclass(frozen=True)
class BenchConfig:
    tasks: tuple[str, ...] = tuple(TASKS)
    methods: tuple[str, ...] = METHODS
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    num_cases: int = 4
    seed: int = 0
    num_chunks: int = 6
    chunk_tokens: int = 120
    max_new_tokens: int = 24
    output_dir: Path = field(default_factory=lambda: Path("bench-results"))
    jsonl: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown and self.jsonl is None:
            raise InvalidRequestError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}.")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise InvalidRequestError(f"unknown methods {bad}; choose from {', '.join(METHODS)}.")
        if "full" not in self.methods:
            raise InvalidRequestError("methods must include 'full': every score is reported relative to it.")
        if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise InvalidRequestError(f"ratios must be a non-empty list of numbers in [0, 1], got {self.ratios}.")
        if self.num_cases < 1 or self.num_chunks < 1 or self.chunk_tokens < 8 or self.max_new_tokens < 1:
            raise InvalidRequestError("num_cases, num_chunks and max_new_tokens must be >= 1, chunk_tokens >= 8.")

    def runs(self) -> list[tuple[str, float]]:
        """(method, ratio) pairs run for every case; ratio-free methods once, at ratio 1.0 (full) or 0.0 (reuse)."""
        pairs = []
        for method in self.methods:
            entry = selectors.get(method)
            if not entry.uses_ratio:  # once per case, at ratio 1.0 (full prefill) or 0.0 (nothing recomputed)
                pairs.append((method, 0.0 if entry.reuses_cache else 1.0))
            else:
                pairs.extend((method, ratio) for ratio in self.ratios)
        return pairs


def make_cases(config: BenchConfig, tokenizer) -> list[Case]:
    if config.jsonl is not None:
        return load_jsonl(config.jsonl)[: config.num_cases]
    return [case for task in config.tasks
            for case in TASKS[task](config.num_cases, config.seed, config.num_chunks, config.chunk_tokens, tokenizer)]


def _record(case: Case, method: str, ratio: float, answer, reference) -> dict:
    stats = answer.stats
    logits = answer.first_token_logits
    return {
        "task": case.task, "case_id": case.case_id, "method": method, "ratio": ratio,
        "score": scoring.substring_score(answer.text, case.answers),
        "f1": scoring.token_f1(answer.text, case.answers),
        "first_token_agree": scoring.first_token_agreement(reference, logits),
        "kl": scoring.kl_divergence(reference, logits),
        "ttft_s": stats.ttft_s, "load_s": stats.load_s, "rerotate_s": stats.rerotate_s,
        "select_s": stats.select_s, "recompute_s": stats.recompute_s,
        "recomputed_tokens": stats.recomputed_tokens, "context_tokens": stats.context_tokens,
        "text": answer.text,
    }


def _done(path: Path) -> set[tuple[str, str, float]]:
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by an interrupted write is rerun
        done.add((row["case_id"], row["method"], float(row["ratio"])))
    return done


def run_bench(engine, config: BenchConfig, progress: Callable[[str], None] | None = None,
              resume: bool = True) -> Path:
    """Run every case; returns the `results.jsonl` path. With `resume`, runs already recorded are skipped."""
    progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    config.output_dir.mkdir(parents=True, exist_ok=True)
    path = config.output_dir / "results.jsonl"
    if not resume and path.exists():
        path.unlink()
    done = _done(path)
    cases = make_cases(config, engine.tokenizer)
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens)
    runs = config.runs()
    with path.open("a", encoding="utf-8") as out:
        for number, case in enumerate(cases, 1):
            todo = [(m, r) for m, r in runs if (case.case_id, m, float(r)) not in done]
            progress(f"[{number}/{len(cases)}] {case.case_id}: {len(todo)} of {len(runs)} runs to do")
            if not todo:
                continue
            engine.ingest(list(case.chunks))  # warm store: TTFT below never includes a chunk prefill
            # The full-prefill reference logits are recomputed on resume, so every record compares to the same run.
            full = engine.answer(list(case.chunks), case.query, method="full", generation=generation,
                                 return_logits=True)
            for method, ratio in todo:
                answer = full if method == "full" else engine.answer(
                    list(case.chunks), case.query, selection=SelectionConfig(method=method, ratio=ratio),
                    generation=generation, return_logits=True)
                out.write(json.dumps(_record(case, method, ratio, answer, full.first_token_logits)) + "\n")
                out.flush()
    return path
