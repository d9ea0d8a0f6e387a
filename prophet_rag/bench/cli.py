"""`prophet-rag bench`: arguments and the command, kept beside the harness so the main CLI only delegates."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from prophet_rag.bench.musique import MUSIQUE_PROMPT
from prophet_rag.bench.report import write_reports
from prophet_rag.bench.runner import BenchConfig, run_bench
from prophet_rag.bench.tasks import TASKS, parse_span
from prophet_rag.errors import InvalidRequestError
from prophet_rag.methods import METHODS


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=_names, default=tuple(TASKS), help=f"comma list of {', '.join(TASKS)}")
    parser.add_argument("--methods", type=_names, default=METHODS, help="comma list of methods (must include full)")
    parser.add_argument("--ratios", type=lambda s: tuple(float(x) for x in _names(s)), default=(0.1, 0.2, 0.3))
    parser.add_argument("--cases", type=int, default=4, help="cases per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunks", type=parse_span, default=6, help="chunks per case: N, or a range like 8-10")
    parser.add_argument("--chunk-tokens", type=parse_span, default=120,
                        help="target tokens per chunk: N, or a range like 150-300 drawn per chunk")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--jsonl", type=Path, default=None, help="your own cases: {chunks, query, answers} per line")
    parser.add_argument("--dataset", nargs=2, metavar=("NAME", "PATH"), default=None,
                        help="real cases instead of the tasks: 'musique PATH' (CacheBlend's musique_s.json; --cases "
                             "counts from --first-case; cases 0-99 are for development)")
    parser.add_argument("--first-case", type=int, default=0, help="the dataset's first case index")
    parser.add_argument("--fidelity", action=argparse.BooleanOptionalAction, default=None,
                        help="measure fidelity to full prefill (gold log-likelihood, KL, answer agreement); "
                             "on by default with --dataset")
    parser.add_argument("--model-tag", default=None,
                        help="the records' model field (default: the model's name); lets models share --out")
    parser.add_argument("--baseline", default="prophet", help="method the report pairs every method against")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start over instead of resuming")
    parser.add_argument("--no-plot", dest="plot", action="store_false")


def _dataset(args: argparse.Namespace) -> Path | None:
    if args.dataset is None:
        return None
    name, path = args.dataset
    if name != "musique":
        raise InvalidRequestError(f"unknown dataset {name!r}; the one supported is 'musique PATH'.")
    return Path(path)


def run_bench_command(args: argparse.Namespace, engine_factory: Callable) -> int:
    """Run the bench; `engine_factory(prompt)` opens the engine with that `PromptConfig` (None: the default)."""
    musique = _dataset(args)
    config = BenchConfig(tasks=args.tasks, methods=args.methods, ratios=args.ratios, num_cases=args.cases,
                         seed=args.seed, num_chunks=args.chunks, chunk_tokens=args.chunk_tokens,
                         max_new_tokens=args.max_new_tokens, output_dir=args.out, jsonl=args.jsonl,
                         model_tag=args.model_tag, musique=musique, first_case=args.first_case,
                         fidelity=args.fidelity)
    with engine_factory(MUSIQUE_PROMPT if musique is not None else None) as engine:
        results = run_bench(engine, config, resume=args.resume)
    write_reports(results, config.output_dir, with_plot=args.plot, baseline=args.baseline)
    print((config.output_dir / "results.md").read_text(encoding="utf-8"))
    print(f"Wrote {results}, summary.json, results.md" + (" and the plot(s)" if args.plot else "") +
          f" in {config.output_dir}")
    return 0
