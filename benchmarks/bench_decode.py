"""Decode speed after the first token: the engine's own loop against `model.generate` on the same prompt ids.

    python benchmarks/bench_decode.py                      # embedded SmolLM2-135M, ~1K-token prompt, 64 tokens, CPU
    python benchmarks/bench_decode.py --tokens 4000 --new-tokens 128

Both decode greedily and exactly `--new-tokens` tokens (EOS ignored). The engine's decode time is its own
`RequestStats.decode_s`; `model.generate`'s is its total time minus a plain prefill of the same ids
(`logits_to_keep=1`, what generate runs first), timed in the same repeat. Runs are interleaved across repeats and
the table shows medians; both produce the same tokens (checked up to the first EOS, which generate's
`min_new_tokens` bans).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_ttft import make_documents  # sibling script: python puts this folder on sys.path

from prophet_rag import GenerationConfig, ProphetEngine, StoreConfig

_NEVER = 10**9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=1000, help="context tokens (documents only)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--method", default="full", help="how the engine builds the first token's cache")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as store_dir:
        engine = ProphetEngine.from_pretrained(args.model, store=StoreConfig(directory=store_dir))
        model = engine.adapter.model
        docs = make_documents(engine.tokenizer, args.tokens, 250)
        query = "Which clerk kept the keys to archive room 121?"
        engine.ingest(docs)
        ids = engine.builder.layout(docs, query).joined_ids()[None]
        generation = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=(_NEVER,))
        hf_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                         pad_token_id=engine.tokenizer.eos_token_id)
        engine_runs, hf_runs = [], []
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            answer = engine.answer(docs, query, method=args.method, generation=generation)
            with torch.inference_mode():
                start = time.perf_counter()
                model(ids, logits_to_keep=1)
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                out = model.generate(ids, **hf_kwargs)
                total = time.perf_counter() - start
            if args.method == "full":
                # generate's min_new_tokens bans EOS where the engine (EOS ignored) emits it: compare up to there.
                eos = set(engine._default_eos())
                same = next((i for i, t in enumerate(answer.token_ids) if t in eos), len(answer.token_ids))
                assert tuple(out[0, ids.shape[1]:].tolist())[:same] == answer.token_ids[:same], "greedy tokens differ"
            if repeat:
                engine_runs.append(answer.stats.decode_s / (answer.stats.new_tokens - 1))
                hf_runs.append((total - prefill) / (args.new_tokens - 1))
        engine_step, hf_step = statistics.median(engine_runs), statistics.median(hf_runs)
        print(f"{engine.model_name} on CPU, {torch.get_num_threads()} threads; prompt {ids.shape[1]} tokens, "
              f"{args.new_tokens} new tokens, median of {args.repeats}")
        print(f"{'decoder':<16}{'ms/token':>10}{'tokens/s':>10}{'x generate':>12}")
        for name, step in (("model.generate", hf_step), (f"engine ({args.method})", engine_step)):
            print(f"{name:<16}{1e3 * step:>10.2f}{1 / step:>10.1f}{hf_step / step:>12.2f}")
        engine.close()


if __name__ == "__main__":
    main()
