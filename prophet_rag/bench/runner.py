"""Run tasks through the engine for every method and ratio, appending one JSON record per run (resumable)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prophet_rag import methods
from prophet_rag.bench import fidelity, scoring
from prophet_rag.bench.musique import load_musique
from prophet_rag.bench.tasks import TASKS, Case, Span, load_jsonl, span_bounds
from prophet_rag.config import GenerationConfig, SelectionConfig
from prophet_rag.errors import InvalidRequestError
from prophet_rag.methods import METHODS


@dataclass(frozen=True)
class BenchConfig:
    tasks: tuple[str, ...] = tuple(TASKS)
    methods: tuple[str, ...] = METHODS
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    num_cases: int = 4
    seed: int = 0
    num_chunks: Span = 6
    """Chunks per case: a count, or a range `(low, high)` drawn from per case."""
    chunk_tokens: Span = 120
    """Target tokens per chunk: a count, or a range `(low, high)` drawn from per chunk."""
    max_new_tokens: int = 24
    output_dir: Path = field(default_factory=lambda: Path("bench-results"))
    jsonl: Path | None = None
    model_tag: str | None = None
    """Written into every record's `model` field (default: the engine's model name), so the records of several
    models can share one results file and be reported side by side."""
    musique: Path | None = None
    """CacheBlend's `musique_s.json`: its cases `first_case` to `first_case + num_cases - 1` replace the tasks (run
    them on an engine built with `musique.MUSIQUE_PROMPT`)."""
    first_case: int = 0
    fidelity: bool | None = None
    """Measure fidelity to full prefill per record (`bench.fidelity`); None: on for `musique`, off otherwise."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.fidelity is None:
            object.__setattr__(self, "fidelity", self.musique is not None)
        if self.musique is not None and self.jsonl is not None:
            raise InvalidRequestError("give either musique or jsonl cases, not both.")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown and self.jsonl is None and self.musique is None:
            raise InvalidRequestError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}.")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise InvalidRequestError(f"unknown methods {bad}; choose from {', '.join(METHODS)}.")
        if "full" not in self.methods:
            raise InvalidRequestError("methods must include 'full': every score is reported relative to it.")
        if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise InvalidRequestError(f"ratios must be a non-empty list of numbers in [0, 1], got {self.ratios}.")
        chunks, tokens = span_bounds(self.num_chunks), span_bounds(self.chunk_tokens)
        if self.num_cases < 1 or chunks[0] < 1 or tokens[0] < 8 or self.max_new_tokens < 1:
            raise InvalidRequestError("num_cases, num_chunks and max_new_tokens must be >= 1, chunk_tokens >= 8.")
        if chunks[0] > chunks[1] or tokens[0] > tokens[1]:
            raise InvalidRequestError(f"ranges must run low to high, got {self.num_chunks} and {self.chunk_tokens}.")

    def runs(self) -> list[tuple[str, float]]:
        """(method, ratio) pairs run for every case; ratio-free methods once, at ratio 1.0 (full) or 0.0 (reuse)."""
        pairs = []
        for method in self.methods:
            entry = methods.get(method)
            if not entry.uses_ratio:  # once per case, at ratio 1.0 (full prefill) or 0.0 (nothing recomputed)
                pairs.append((method, 0.0 if entry.reuses_cache else 1.0))
            else:
                pairs.extend((method, ratio) for ratio in self.ratios)
        return pairs


def make_cases(config: BenchConfig, tokenizer) -> list[Case]:
    if config.musique is not None:
        return load_musique(config.musique, range(config.first_case, config.first_case + config.num_cases))
    if config.jsonl is not None:
        return load_jsonl(config.jsonl)[: config.num_cases]
    return [case for task in config.tasks
            for case in TASKS[task](config.num_cases, config.seed, config.num_chunks, config.chunk_tokens, tokenizer)]


def model_tag(engine, config: BenchConfig) -> str:
    """The `model` field of the records: the configured tag, else the engine's model name (a folder's own name)."""
    if config.model_tag:
        return config.model_tag
    name = str(getattr(engine, "model_name", "") or "unknown")
    return Path(name).name if Path(name).is_dir() else name


def chunk_lengths(engine, case: Case) -> list[int] | None:
    """Each chunk's token count as the engine lays it out, when the engine exposes its prompt builder."""
    builder = getattr(engine, "builder", None)
    if builder is None:
        return None
    return [int(ids.numel()) for ids in builder.layout(list(case.chunks), case.query).chunk_ids]


def time_hf_last(engine, case: Case) -> float | None:
    """Seconds of `model(ids, logits_to_keep=1)` over the case's prompt ids as the engine lays them out: the prefill
    `model.generate` runs, which every TTFT ratio is quoted against. None for an engine without a prompt builder."""
    builder, adapter = getattr(engine, "builder", None), getattr(engine, "adapter", None)
    if builder is None or adapter is None:
        return None
    ids = builder.layout(list(case.chunks), case.query).joined_ids()[None].to(adapter.device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        adapter.model(ids, logits_to_keep=1)
        sync()
        return time.perf_counter() - start


def selected_per_chunk(answer, lengths: list[int] | None) -> list[int] | None:
    """How many of each chunk's tokens were recomputed, chunks in request order (the layout may reorder them)."""
    if lengths is None:
        return None
    order = list(answer.chunk_order) or list(range(len(lengths)))
    start = answer.stats.prefix_tokens
    counts = [0] * len(lengths)
    positions = answer.recomputed_positions
    for i in order:
        counts[i] = int(((positions >= start) & (positions < start + lengths[i])).sum())
        start += lengths[i]
    return counts


def _record(case: Case, method: str, ratio: float, answer, reference, model: str,
            lengths: list[int] | None, hf_last_s: float | None) -> dict:
    stats = answer.stats
    logits = answer.first_token_logits
    return {
        "model": model, "task": case.task, "case_id": case.case_id, "method": method, "ratio": ratio,
        "score": scoring.substring_score(answer.text, case.answers),
        "f1": scoring.token_f1(answer.text, case.answers),
        "first_token_agree": scoring.first_token_agreement(reference, logits),
        "kl": scoring.kl_divergence(reference, logits),
        "ttft_s": stats.ttft_s, "load_s": stats.load_s, "rerotate_s": stats.rerotate_s,
        "select_s": stats.select_s, "recompute_s": stats.recompute_s, "hf_last_s": hf_last_s,
        "recomputed_tokens": stats.recomputed_tokens, "context_tokens": stats.context_tokens,
        "evidence_chunks": list(case.evidence_chunks), "chunk_tokens": lengths,
        "selected_per_chunk": selected_per_chunk(answer, lengths), "chunk_order": list(answer.chunk_order),
        "text": answer.text,
    }


def _done(path: Path, model: str) -> set[tuple[str, str, float]]:
    """The (case, method, ratio) runs already recorded for `model` (records without a model count as its own)."""
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by an interrupted write is rerun
        if row.get("model", model) == model:
            done.add((row["case_id"], row["method"], float(row["ratio"])))
    return done


def slug(name: str) -> str:
    """`name` as a safe file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


@dataclass(frozen=True)
class ReferenceLogits:
    """Full prefill's first-token logits per case, one file each, so a resumed run compares with the same run."""

    folder: Path

    def _path(self, case_id: str) -> Path:
        return self.folder / f"{slug(case_id)}.pt"

    def get(self, case_id: str) -> torch.Tensor | None:
        path = self._path(case_id)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a file torn by an interrupted write: recompute it
            return None

    def put(self, case_id: str, logits: torch.Tensor | None) -> None:
        if logits is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._path(case_id).with_suffix(".tmp")
        torch.save(logits.detach().to("cpu", torch.float32).clone(), tmp)
        tmp.replace(self._path(case_id))

    def clear(self) -> None:
        for path in self.folder.glob("*.pt"):
            path.unlink()


def _answer_kwargs(case: Case) -> dict:
    """Retriever scores go to the engine only when the case has them, so engines without the option still run."""
    return {"chunk_scores": case.chunk_scores} if case.chunk_scores else {}


def run_bench(engine, config: BenchConfig, progress: Callable[[str], None] | None = None,
              resume: bool = True) -> Path:
    """Run every case; returns the `results.jsonl` path. With `resume`, runs already recorded are skipped."""
    progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    config.output_dir.mkdir(parents=True, exist_ok=True)
    path = config.output_dir / "results.jsonl"
    if not resume and path.exists():
        path.unlink()
    model = model_tag(engine, config)
    done = _done(path, model)
    references = ReferenceLogits(config.output_dir / "reference" / slug(model))
    if not resume:
        references.clear()
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
            # Every record compares with full prefill's first-token logits (and, with fidelity, its answer). They are
            # kept beside the results, so extending a run with new methods does not pay for full prefill again.
            fid_path = references.folder / f"{slug(case.case_id)}.fidelity.pt"
            reference = references.get(case.case_id) if ("full", 1.0) not in todo else None
            ref = fidelity.Reference.load(fid_path) if config.fidelity and reference is not None else None
            full = None
            if reference is None or (config.fidelity and ref is None):
                full = engine.answer(list(case.chunks), case.query, method="full", generation=generation,
                                     return_logits=True)
                reference = full.first_token_logits
                references.put(case.case_id, reference)
                if config.fidelity:
                    ref = fidelity.reference(engine, list(case.chunks), case.query, case.answers, full.text,
                                             full.token_ids)
                    ref.save(fid_path)
            lengths = chunk_lengths(engine, case)
            hf_last_s = time_hf_last(engine, case)  # once per case, between the runs it is the baseline of
            for method, ratio in todo:
                selection = SelectionConfig(method=method, ratio=ratio)
                answer = full if method == "full" and full is not None else engine.answer(
                    list(case.chunks), case.query, selection=selection, generation=generation, return_logits=True,
                    **_answer_kwargs(case))
                record = _record(case, method, ratio, answer, reference, model, lengths, hf_last_s)
                if config.fidelity:
                    record.update(fidelity.measure(engine, list(case.chunks), case.query, case.answers, selection,
                                                   answer.text, ref))
                out.write(json.dumps(record) + "\n")
                out.flush()
    return path
