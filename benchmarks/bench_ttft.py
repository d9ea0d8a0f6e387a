"""TTFT of KV-reuse methods against plain Hugging Face prefill on one long context, with a warm store.

    python benchmarks/bench_ttft.py                       # embedded SmolLM2-135M, ~4K-token context, CPU
    python benchmarks/bench_ttft.py --model PATH --device cuda --tokens 16000
    python benchmarks/bench_ttft.py --random-llama3-8b --device cuda --tokens 16000   # timing shape of an 8B model
    python benchmarks/bench_ttft.py --dtype bf16          # the model in bf16: the engine and the baselines alike

The baselines are what a user would run instead, on exactly the engine's prompt ids: `hf_last` is
`model(input_ids, logits_to_keep=1)`, the prefill `model.generate` runs, and the baseline every ratio is quoted
against (it always runs); `hf`, an extra column when asked for, is a plain forward `model(input_ids)` (logits for
every position, as `model(...)` returns by default), which `generate` never runs. Every method is run once per
repeat, methods interleaved, so a noisy shared machine slows them alike; the table shows medians, the ratio against
`hf_last` first. The store is warmed (every chunk ingested) before timing, so "load" is a store read, not a chunk
prefill.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from prophet_rag import GenerationConfig, ProphetEngine, RequestStats, SelectionConfig, StoreConfig

QUERY = "Which clerk kept the keys to archive room 121?"
_SENTENCES = (
    "The committee met on a grey morning to review the harbour accounts and the ledger of ship repairs.",
    "Several merchants argued that the tariff on imported timber had slowed the building of new warehouses.",
    "A clerk named {name} kept the keys to archive room {num} and recorded every visitor in a blue notebook.",
    "Rain fell for most of the week, and the road to the northern quarry was closed twice by flooding.",
    "The library received a donation of {num} old maps, most of them showing the coast before the new canal.",
)
_NAMES = ("Ada", "Bram", "Cora", "Dax", "Elin", "Finn", "Greta", "Hugo", "Ines", "Jonas")
BASELINES = ("hf_last", "hf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The Hugging Face baselines, the headline (`generate`'s prefill) first."""


def make_documents(tokenizer, total_tokens: int, doc_tokens: int) -> list[str]:
    """Deterministic filler documents of about `doc_tokens` tokens each, `total_tokens` in all."""
    docs, i = [], 0
    while sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs) < total_tokens:
        parts, n = [], 0
        while n < doc_tokens:
            sentence = _SENTENCES[i % len(_SENTENCES)].format(name=_NAMES[i % len(_NAMES)], num=100 + 7 * i)
            parts.append(sentence)
            n += len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
            i += 1
        docs.append(" ".join(parts))
    return docs


def random_llama3_8b(device: str, tokenizer_dir: str | None):
    """A Llama-3-8B-shaped model with random bf16 weights (timing needs no trained weights), and a tokenizer.

    The tokenizer only has to produce ids inside the vocabulary: the embedded model's (49K tokens) is used unless
    `tokenizer_dir` names another.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prophet_rag.embedded import embedded_model_dir

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=32768,
                         rope_theta=500000.0, tie_word_embeddings=False)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or embedded_model_dir())
    return model.eval(), tokenizer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _hf_prefill(model, ids: torch.Tensor, last_only: bool) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids, logits_to_keep=1 if last_only else 0)
        return time.perf_counter() - start


def run_method(engine: ProphetEngine, method: str, docs: list[str], query: str, ids: torch.Tensor,
               ratio: float) -> tuple[float, RequestStats | None]:
    """One run of `method` for one token: a Hugging Face baseline on `ids` (no engine stats) or the engine's answer."""
    if method in BASELINES:
        return _hf_prefill(engine.adapter.model, ids, method == "hf_last"), None
    answer = engine.answer(docs, query, selection=SelectionConfig(method=method, ratio=ratio),
                           generation=GenerationConfig(max_new_tokens=1))
    return answer.stats.ttft_s, answer.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4000, help="context tokens (documents only)")
    parser.add_argument("--doc-tokens", type=int, default=250)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--methods", default="hf_last,full,reuse,prophet,prophet_focus,cacheblend,infoflow,epic",
                        help="comma list; hf_last (always run) and hf are the Hugging Face baselines")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--random-llama3-8b", action="store_true",
                        help="time a Llama-3-8B-shaped model with random bf16 weights instead of --model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-llama3-8b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="load --model in this dtype (default: fp32 on CPU, bf16 on CUDA); the Hugging Face "
                             "baselines run the same weights")
    parser.add_argument("--hot-cache-gb", type=float, default=0.0,
                        help="keep this much chunk KV on the device in front of the disk store (0: disk only)")
    args = parser.parse_args()
    if args.random_llama3_8b and args.dtype not in (None, "bf16"):
        parser.error("--random-llama3-8b builds bf16 weights: drop --dtype or make it bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "hf_last" not in methods:  # every ratio is quoted against generate's prefill
        methods.insert(0, "hf_last")
    with tempfile.TemporaryDirectory() as store_dir:
        # Large enough for every chunk of a 16K-token context of an 8B model (~130 KB of KV per token in bf16).
        store = StoreConfig(directory=store_dir, size_limit_bytes=64 * 2**30, max_entry_bytes=8 * 2**30)
        hot = int(args.hot_cache_gb * 2**30)
        if args.random_llama3_8b:
            model, tokenizer = random_llama3_8b(args.device, args.tokenizer)
            engine = ProphetEngine(model, tokenizer, store=store, model_name="random Llama-3-8B shape (bf16)",
                                   hot_cache_bytes=hot)
        else:
            engine = ProphetEngine.from_pretrained(args.model, device=args.device, dtype=DTYPES.get(args.dtype),
                                                   store=store, hot_cache_bytes=hot)
        docs = make_documents(engine.tokenizer, args.tokens, args.doc_tokens)
        query = QUERY
        engine.ingest(docs)
        ids = engine.builder.layout(docs, query).joined_ids()[None].to(args.device)
        # Warm-up: one run of each, untimed (allocator, kernel selection, page cache).
        for method in methods:
            run_method(engine, method, docs, query, ids, args.ratio)
        cpu = f"CPU, {torch.get_num_threads()} threads"
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
        tier = f"in-memory tier {args.hot_cache_gb:g} GiB" if hot else "disk store only"
        print(f"model {engine.model_name} ({engine.adapter.spec.dtype}) on {device}; {len(docs)} documents; {tier}; "
              f"torch {torch.__version__}")
        times: dict[str, list[float]] = {m: [] for m in methods}
        stats: dict[str, list] = {m: [] for m in methods if m not in BASELINES}
        for _ in range(args.repeats):
            for method in methods:
                _sync(args.device)
                ttft, run_stats = run_method(engine, method, docs, query, ids, args.ratio)
                _sync(args.device)
                times[method].append(ttft)
                if run_stats is not None:
                    stats[method].append(run_stats)
        context = int(ids.numel())
        print(f"prompt {context} tokens, ratio {args.ratio}, median of {args.repeats} interleaved repeats\n")
        median = {m: statistics.median(t) for m, t in times.items()}
        shown = [b for b in BASELINES if b in median]
        header = f"{'method':<13}{'TTFT s':>8}" + "".join(f"{'x ' + b:>10}" for b in shown)
        print(header + f"{'load':>8}{'rerot':>8}{'select':>8}{'recomp':>8}{'recomputed':>12}")
        for method in methods:
            ratios = "".join(f"{median[method] / median[b]:>10.3f}" for b in shown)
            line = f"{method:<13}{median[method]:>8.3f}{ratios}"
            if method in stats:
                s = sorted(stats[method], key=lambda x: x.ttft_s)[len(stats[method]) // 2]
                line += (f"{s.load_s:>8.3f}{s.rerotate_s:>8.3f}{s.select_s:>8.3f}{s.recompute_s:>8.3f}"
                         f"{s.recomputed_tokens:>12}")
            print(line)
        if "prophet" in median and "prophet_focus" in median:
            print(f"\nprophet_focus / prophet: {median['prophet_focus'] / median['prophet']:.3f}")
        engine.close()


if __name__ == "__main__":
    main()
