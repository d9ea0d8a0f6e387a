"""`prophet-rag`: the demo (the main job), a question over a folder of documents, the chunk-cache tools, the bench,
the server."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from prophet_rag.config import (
    MODEL_DTYPES,
    STORAGES,
    GenerationConfig,
    PromptConfig,
    SelectionConfig,
    StoreConfig,
    default_store_dir,
)
from prophet_rag.errors import InvalidRequestError, ProphetRAGError
from prophet_rag.ingest import RAY_INSTALL, read_document, text_files
from prophet_rag.methods import METHODS


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _store_config(args: argparse.Namespace) -> StoreConfig:
    options = {"auth_key_file": args.key_file, "auth_key_env": args.key_env, "kv_storage": args.kv_storage}
    return StoreConfig(directory=args.store, **options) if args.store else StoreConfig(**options)


def _engine(args: argparse.Namespace, prompt: PromptConfig | None = None):
    from prophet_rag.engine import ProphetEngine
    from prophet_rag.engine.loading import model_dtype

    _progress(f"Loading model {args.model or 'embedded SmolLM2-135M-Instruct'} ...")
    return ProphetEngine.from_pretrained(args.model, dtype=model_dtype(args.dtype), store=_store_config(args),
                                         prompt=prompt)


def _read_text(path: Path) -> str:
    try:
        return read_document(path)
    except ProphetRAGError as error:
        raise ProphetRAGError(f"{path} is {error} or move it out of the folder.") from None


def _read_folder(folder: Path) -> list[str]:
    texts = [text for text in map(_read_text, text_files(folder)) if text]
    if not texts:
        raise ProphetRAGError(f"{folder} has no non-empty .txt or .md files.")
    return texts


def cmd_demo(args: argparse.Namespace) -> int:
    data = json.loads(resources.files("prophet_rag.data").joinpath("demo_docs.json").read_text(encoding="utf-8"))
    docs, questions = data["documents"], data["questions"][: args.questions]
    with _engine(args) as engine:
        _progress(f"Caching {len(docs)} documents in {engine.store.directory} ...")
        computed = engine.ingest(docs)
        _progress(f"  {computed} computed, {len(docs) - computed} already cached")
        generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
        engine.answer(docs, questions[0]["question"], method="full", generation=generation)  # warm-up
        rows = []
        for i, item in enumerate(questions, 1):
            _progress(f"Question {i}/{len(questions)}: {item['question']}")
            full = engine.answer(docs, item["question"], method="full", generation=generation)
            fast = engine.answer(docs, item["question"], method=args.method, ratio=args.ratio, generation=generation)
            rows.append((item, full, fast))
        context = rows[0][1].stats.context_tokens
        print(f"\n{len(docs)} documents, {context} context tokens; "
              f"{args.method} recomputes {args.ratio:.0%} of them.\n")
        width = max(len("full"), len(args.method))
        for item, full, fast in rows:
            print(f"Q: {item['question']}   (expected: {item['answer']})")
            print(f"  {'full':<{width}} TTFT {full.stats.ttft_s * 1000:7.0f} ms  {full.text.strip()!r}")
            print(f"  {args.method:<{width}} TTFT {fast.stats.ttft_s * 1000:7.0f} ms  {fast.text.strip()!r}"
                  f"  ({fast.stats.ttft_s / full.stats.ttft_s:.2f}x of full's TTFT)")
        full_t = sum(r[1].stats.ttft_s for r in rows) / len(rows)
        fast_t = sum(r[2].stats.ttft_s for r in rows) / len(rows)
        hits = sum(r[0]["answer"].lower() in r[1].text.lower() for r in rows)
        fast_hits = sum(r[0]["answer"].lower() in r[2].text.lower() for r in rows)
        print(f"\nMean TTFT: full {full_t * 1000:.0f} ms, {args.method} {fast_t * 1000:.0f} ms "
              f"({fast_t / full_t:.2f}x of full). Expected answer found: full {hits}/{len(rows)}, "
              f"{args.method} {fast_hits}/{len(rows)}.")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    docs = _read_folder(Path(args.docs))
    with _engine(args) as engine:
        stream = engine.stream(docs, args.question, method=args.method, ratio=args.ratio,
                               generation=GenerationConfig(max_new_tokens=args.max_new_tokens))
        for delta in stream:
            print(delta, end="", flush=True)
        stats = stream.answer.stats
        print(f"\n[{stats.method} ratio {stats.ratio}: TTFT {stats.ttft_s * 1000:.0f} ms, "
              f"{stats.recomputed_tokens}/{stats.context_tokens} context tokens recomputed, "
              f"{stats.cache_hits}/{stats.cache_hits + stats.cache_misses} documents from the cache]", file=sys.stderr)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    if args.action == "ingest":
        return _cache_ingest(args)
    from prophet_rag.cache.store import KVStore

    # create=False: inspecting a mistyped path must say so, not create an empty store there.
    with KVStore(_store_config(args), create=False) as store:
        if args.action == "stats":
            stats = store.stats()
            print(f"store: {store.directory}\nentries: {stats.entries}\nbytes: {stats.volume_bytes}\n"
                  f"orphaned value files reclaimed on open: {stats.orphans_reclaimed}")
            if store.read_only is not None:
                print(f"read-only: {store.read_only}")
        elif args.action == "verify":
            report = store.verify()
            if report.index_repaired:
                print("the store's index (cache.db) was damaged: repaired or rebuilt from the value files")
            print(f"checked {report.checked}: {report.ok} ok, {report.removed} damaged or inconsistent entries "
                  f"removed, {report.other_version} of another format version and {report.unverifiable} "
                  f"authenticated with a key this store lacks kept; {report.orphans} orphaned value files removed")
        elif args.action == "clear":
            print(f"removed {store.clear()} entries from {store.directory}")
    return 0


def _cache_ingest(args: argparse.Namespace) -> int:
    """Store every file's KV, in this process or with --ray on a Ray actor pool (ingest.py); a file that cannot be
    (undecodable, too long, refused text) is reported by name and skipped, and the command fails at the end if any
    was."""
    from prophet_rag import ingest

    files = text_files(Path(args.folder))
    if args.ray:
        summary = ingest.ingest_files_on_ray(files, args.model, _store_config(args), dtype=args.dtype,
                                             workers=args.workers, address=args.address,
                                             cpus_per_worker=args.cpus_per_worker, log=_progress)
    else:
        if args.address or args.workers != 1 or args.cpus_per_worker:
            raise ProphetRAGError("--address, --workers and --cpus-per-worker need --ray; add --ray or drop them.")
        with _engine(args) as engine:
            summary = ingest.ingest_files(engine, files)
    print(summary.line())
    if summary.failed:
        print(f"prophet-rag: error: {len(summary.failed)} of {summary.files} files could not be cached "
              "(listed above).", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from prophet_rag.bench.cli import run_bench_command

    return run_bench_command(args, lambda prompt: _engine(args, prompt))


def cmd_serve(args: argparse.Namespace) -> int:
    from prophet_rag.serve.cli import run_serve_command

    return run_serve_command(args, _store_config(args))


def _add_common(parser: argparse.ArgumentParser) -> None:
    """The options of every command that opens a store: the model, the store and the store's key."""
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *MODEL_DTYPES),
                        help="the model's weights and KV (default auto: float32 on a CPU, bfloat16 on CUDA); "
                             "bfloat16 is 2-3x faster on CPUs with AMX. The store keeps each dtype's KV apart")
    parser.add_argument("--store", default=None, help=f"KV store folder (default: {default_store_dir()})")
    parser.add_argument("--kv-storage", default=StoreConfig.kv_storage, choices=STORAGES,
                        help="how chunk KV is stored: lossless (default) or compact (StoreConfig.kv_storage)")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--key-file", help="the store's authentication key file (StoreConfig.auth_key_file)")
    keys.add_argument("--key-env", help="environment variable holding the store's authentication key")


def _add_selection(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--method", default=SelectionConfig.method, choices=METHODS)
    parser.add_argument("--ratio", type=float, default=SelectionConfig.ratio,
                        help="share of context tokens to recompute")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prophet-rag", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="answer bundled questions with full prefill and with KV reuse")
    _add_common(demo)
    _add_selection(demo, 32)
    demo.add_argument("--questions", type=int, default=6)
    demo.set_defaults(run=cmd_demo)

    ask = commands.add_parser("ask", help="answer a question over a folder of text files")
    _add_common(ask)
    _add_selection(ask, 128)
    ask.add_argument("--docs", required=True, help="folder of .txt/.md files, one document each")
    ask.add_argument("question")
    ask.set_defaults(run=cmd_ask)

    cache = commands.add_parser("cache", help="manage the chunk KV store")
    cache_actions = cache.add_subparsers(dest="action", required=True)
    for action, text in (("stats", "entries and size"), ("verify", "check every entry, drop damaged ones"),
                         ("clear", "remove every entry"), ("ingest", "compute and store the KV of every file")):
        sub = cache_actions.add_parser(action, help=text)
        _add_common(sub)
        if action == "ingest":
            sub.add_argument("folder")
            sub.add_argument("--ray", action="store_true",
                             help=f"prefill on a Ray actor pool (local instance, or --address); needs `{RAY_INSTALL}`")
            sub.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
            sub.add_argument("--workers", type=int, default=1, help="Ray workers, one model load each (default 1)")
            sub.add_argument("--cpus-per-worker", type=int, default=None,
                             help="CPUs each worker reserves and runs torch on (default: local CPUs / workers; 1 on "
                                  "a cluster)")
    cache.set_defaults(run=cmd_cache)

    serve = commands.add_parser("serve", help="an OpenAI-compatible chat-completions server over the engine")
    _add_common(serve)
    _add_selection(serve, 256)
    from prophet_rag.serve.cli import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(run=cmd_serve)

    bench = commands.add_parser("bench", help="accuracy and TTFT of every method across ratios")
    _add_common(bench)
    from prophet_rag.bench.cli import add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(run=cmd_bench)
    return parser


RAY_SERVE_OWNED = ("host", "port", "address", "ray")
"""`prophet-rag serve` options a Serve config does not take: Ray Serve's own `http_options` and cluster decide."""


def ray_app(args: Mapping[str, Any]):
    """Ray Serve's application builder, so `serve run` and Serve config files deploy the replicas that
    `prophet-rag serve --ray` deploys: `serve run prophet_rag.cli:ray_app model=/models/qwen replicas=2`, or a
    config's `import_path: prophet_rag.cli:ray_app` with `args:` (docs/serve.md).

    `args` holds `prophet-rag serve`'s options by name (`max_batch` or `max-batch`): `true` sets a flag, `false` or
    null leaves it out, any other value is the option's value, checked as the command checks it. Host, port and
    cluster address are Serve's own settings (`http_options`, `RAY_ADDRESS`), not these options.
    """
    from prophet_rag.serve.cli import ray_application

    if not isinstance(args, Mapping):
        raise InvalidRequestError(f"ray_app takes prophet-rag serve's options as a mapping, got {type(args).__name__}.")
    argv = ["serve", "--ray"]
    for name, value in args.items():
        option = str(name).replace("_", "-")
        if option.replace("-", "_") in RAY_SERVE_OWNED:
            raise InvalidRequestError(f"ray_app does not take {name!r}: set it in the Serve config (http_options: "
                                      "host, port) or RAY_ADDRESS.")
        if value is True:
            argv.append(f"--{option}")
        elif value is not False and value is not None:
            argv.append(f"--{option}={value}")
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            parsed = build_parser().parse_args(argv)
    except SystemExit:
        said = complaint.getvalue().strip().splitlines()
        raise InvalidRequestError(f"ray_app args: {said[-1] if said else 'not valid'}; the options are those of "
                                  "`prophet-rag serve --help`.") from None
    return ray_application(parsed, _store_config(parsed))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ProphetRAGError as exc:
        print(f"prophet-rag: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
