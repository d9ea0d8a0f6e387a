"""Spike (issue 21, phase 1): one forward pass for the decode steps (and the few-row passes) of N requests at once.

    python benchmarks/spike_batched_decode.py                  # embedded SmolLM2-135M, 2 threads, N = 1 2 4 8
    python benchmarks/spike_batched_decode.py --threads 1 --steps 32 --repeats 3
    python benchmarks/spike_batched_decode.py --threads 1 --dtype bfloat16 --sizes 1,4   # a bf16 server worker

Not shipped code: a prototype to measure before phase 2 builds the engine's scheduler. Each request is a real RAG
request over the demo's documents (a different question and document subset each, so the caches differ in length),
prefilled by the engine (`prophet_focus`, ratio 0.2); then, from copies of the same caches:

- decode, `serial`: each request's `--steps` greedy tokens one request after another, as the engine decodes today
  (`generate.decode_one`: `forward_rows` over one row of one `StitchedCache`);
- decode, `batched`: one pass per step for all N requests: embedding, norms, QKV, O and MLP over N rows, each row's
  K/V written into its own cache, attention per request over its own cache (`sparse_attention`, as today);
- decode, `padded`: the same, but the caches live in one pool `[layers, 2, N, kv_heads, capacity, head_dim]` (as a
  scheduler would allocate them) and attention is one SDPA call per layer over `[N, kv_heads, longest, head_dim]`
  with a length mask;
- few-row passes, `serial` vs `batched`: each request's Stage II rows (its selected context tokens and its suffix)
  and its suffix alone (the rows of a Stage I pass), recomputed through all layers over its cache, one request after
  another vs all requests' rows in one pass (linear layers over the concatenated rows, attention per request).

Runs are interleaved (serial, batched, padded for each repeat) and the tables show medians. Every batched run's
greedy tokens are checked against serial's, and the few-row passes' hidden states compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from importlib import resources

import torch
import torch.nn.functional as F

from prophet_rag import ProphetEngine, SelectionConfig, StoreConfig
from prophet_rag.compute.generate import decode_one
from prophet_rag.compute.stitched import StitchedCache, forward_rows
from prophet_rag.config import MODEL_DTYPES
from prophet_rag.engine.loading import model_dtype
from prophet_rag.kernels import attention_plan, sparse_attention


def demo_requests(engine: ProphetEngine, n: int, steps: int):
    """n prefilled requests: (cache, first-token logits, suffix slots, Stage II rows)."""
    data = json.loads(resources.files("prophet_rag.data").joinpath("demo_docs.json").read_text(encoding="utf-8"))
    docs, questions = data["documents"], data["questions"]
    selection = SelectionConfig()
    out = []
    for i in range(n):
        chosen = docs[: 3 + i % 4] if i % 2 == 0 else docs[i % 3:]
        layout = engine.builder.layout(chosen, questions[i % len(questions)]["question"])
        prefill = engine.prefiller.prefill(layout, selection, layout.total_tokens + steps + 1)
        with torch.inference_mode():
            logits = engine.adapter.logits(prefill.hidden[-1:])[0]
        cache = prefill.cache
        suffix = torch.arange(cache.length - int(layout.suffix_ids.numel()), cache.length)
        stage2 = torch.cat([prefill.selected.cpu(), suffix])
        out.append((cache, logits, suffix, stage2))
    return out


def copy(cache: StitchedCache) -> StitchedCache:
    return replace(cache, kv=cache.kv.clone(), token_ids=cache.token_ids.clone(), positions=cache.positions.clone(),
                   layer_ready=None)


# ---- decode ---------------------------------------------------------------------------------------------------------

def decode_serial(adapter, states, steps: int) -> list[list[int]]:
    tokens = []
    for cache, logits in states:
        seq = [int(torch.argmax(logits))]
        for _ in range(steps - 1):
            seq.append(int(torch.argmax(decode_one(adapter, cache, seq[-1]))))
        tokens.append(seq)
    return tokens


@torch.inference_mode()
def step_batched(adapter, caches: list[StitchedCache], tokens: list[int]) -> torch.Tensor:
    """One decode step of every request: linear layers over N rows, attention per request. `[N, vocab]` logits."""
    rows = [cache.append_tokens(torch.tensor([t])) for cache, t in zip(caches, tokens, strict=True)]
    hidden = adapter.embed(torch.tensor(tokens))
    pos = torch.cat([cache.positions[r] for cache, r in zip(caches, rows, strict=True)])
    rope = adapter.rope_tables(pos, hidden.dtype)
    group = adapter.spec.num_heads // adapter.spec.num_kv_heads
    plans = [attention_plan(cache.positions[r], cache.positions[: cache.length], hidden.dtype, group,
                            adapter.spec.num_kv_heads)
             for cache, r in zip(caches, rows, strict=True)]
    for layer in range(adapter.spec.num_layers):
        q, k, v = adapter.qkv(layer, hidden, rope)
        outs = []
        for i, (cache, r, plan) in enumerate(zip(caches, rows, plans, strict=True)):
            cache.kv[layer, 0, r], cache.kv[layer, 1, r] = k[i : i + 1], v[i : i + 1]
            n = cache.length
            outs.append(sparse_attention(q[i : i + 1], cache.kv[layer, 0, :n], cache.kv[layer, 1, :n], pos[i : i + 1],
                                         cache.positions[:n], adapter.scale, plan))
        hidden = adapter.finish_layer(layer, hidden, torch.cat(outs))
    return adapter.logits(hidden)


def greedy(step, states, steps: int) -> list[list[int]]:
    """`steps` greedy tokens per request, every request advanced by one `step(tokens) -> [N, vocab]` call."""
    seqs = [[int(torch.argmax(logits))] for _, logits in states]
    for _ in range(steps - 1):
        logits = step([seq[-1] for seq in seqs])
        for seq, row in zip(seqs, logits, strict=True):
            seq.append(int(torch.argmax(row)))
    return seqs


def decode_batched(adapter, states, steps: int) -> list[list[int]]:
    caches = [cache for cache, _ in states]
    return greedy(lambda tokens: step_batched(adapter, caches, tokens), states, steps)


class Pool:
    """The requests' caches in one tensor `[layers, 2, N, kv_heads, capacity, head_dim]`, head-major so that a
    layer's keys for all requests are one strided view SDPA reads directly."""

    def __init__(self, caches: list[StitchedCache]) -> None:
        capacity = max(cache.capacity for cache in caches)
        layers, _, _, kv_heads, dim = caches[0].kv.shape
        self.kv = torch.zeros(layers, 2, len(caches), kv_heads, capacity, dim, dtype=caches[0].kv.dtype)
        for i, cache in enumerate(caches):
            self.kv[:, :, i, :, : cache.length] = cache.kv[:, :, : cache.length].transpose(2, 3)
        self.lengths = torch.tensor([cache.length for cache in caches])
        # After re-positioning, slot i holds position i (the suffix and generated tokens follow the context).
        assert all(torch.equal(c.positions[: c.length], torch.arange(c.length)) for c in caches)


@torch.inference_mode()
def step_padded(adapter, pool: Pool, tokens: list[int]) -> torch.Tensor:
    n = len(tokens)
    slots = pool.lengths.clone()
    pool.lengths += 1
    longest = int(pool.lengths.max())
    hidden = adapter.embed(torch.tensor(tokens))
    rope = adapter.rope_tables(slots, hidden.dtype)
    kv_heads, group = adapter.spec.num_kv_heads, adapter.spec.num_heads // adapter.spec.num_kv_heads
    visible = torch.arange(longest)[None, :] < pool.lengths[:, None]
    mask = torch.zeros(n, 1, 1, longest, dtype=hidden.dtype).masked_fill_(~visible[:, None, None], float("-inf"))
    batch = torch.arange(n)
    for layer in range(adapter.spec.num_layers):
        q, k, v = adapter.qkv(layer, hidden, rope)
        pool.kv[layer, 0, batch, :, slots], pool.kv[layer, 1, batch, :, slots] = k, v
        keys, values = pool.kv[layer, 0, :, :, :longest], pool.kv[layer, 1, :, :, :longest]
        out = F.scaled_dot_product_attention(q.view(n, kv_heads, group, -1), keys, values, attn_mask=mask,
                                             scale=adapter.scale)
        hidden = adapter.finish_layer(layer, hidden, out.reshape(n, kv_heads * group, -1))
    return adapter.logits(hidden)


def decode_padded(adapter, states, steps: int) -> list[list[int]]:
    pool = Pool([cache for cache, _ in states])
    return greedy(lambda tokens: step_padded(adapter, pool, tokens), states, steps)


# ---- few-row passes -------------------------------------------------------------------------------------------------

def rows_serial(adapter, caches, rows_list) -> list[torch.Tensor]:
    return [forward_rows(adapter, cache, rows)[0] for cache, rows in zip(caches, rows_list, strict=True)]


@torch.inference_mode()
def rows_batched(adapter, caches, rows_list) -> list[torch.Tensor]:
    """`forward_rows` of every request in one pass: linear layers over all rows, attention per request."""
    sizes = [int(rows.numel()) for rows in rows_list]
    hidden = adapter.embed(torch.cat([c.token_ids[r] for c, r in zip(caches, rows_list, strict=True)]))
    pos = [c.positions[r] for c, r in zip(caches, rows_list, strict=True)]
    rope = adapter.rope_tables(torch.cat(pos), hidden.dtype)
    group = adapter.spec.num_heads // adapter.spec.num_kv_heads
    plans = [attention_plan(p, c.positions[: c.length], hidden.dtype, group, adapter.spec.num_kv_heads)
             for c, p in zip(caches, pos, strict=True)]
    for layer in range(adapter.spec.num_layers):
        q, k, v = adapter.qkv(layer, hidden, rope)
        outs = []
        for cache, rows, p, plan, qi, ki, vi in zip(caches, rows_list, pos, plans, q.split(sizes), k.split(sizes),
                                                    v.split(sizes), strict=True):
            cache.kv[layer, 0, rows], cache.kv[layer, 1, rows] = ki, vi
            n = cache.length
            outs.append(sparse_attention(qi, cache.kv[layer, 0, :n], cache.kv[layer, 1, :n], p, cache.positions[:n],
                                         adapter.scale, plan))
        hidden = adapter.finish_layer(layer, hidden, torch.cat(outs))
    return list(hidden.split(sizes))


# ---- measurement ----------------------------------------------------------------------------------------------------

def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32, help="greedy tokens per request (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--dtype", choices=("auto", *MODEL_DTYPES), default="auto",
                        help="the model's dtype, as `prophet-rag serve --dtype` takes it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as store:
        engine = ProphetEngine.from_pretrained(store=StoreConfig(directory=store), dtype=model_dtype(args.dtype))
        adapter = engine.adapter
        requests = demo_requests(engine, max(sizes), args.steps)
        decode_one(adapter, copy(requests[0][0]), 1)  # warm-up
        print(f"{engine.adapter.spec.dtype}, threads {args.threads}, {args.steps} tokens per request, medians of "
              f"{args.repeats} interleaved repeats; prompt lengths {[r[0].length for r in requests]}")
        print("\ndecode: N | serial tok/s | batched tok/s (x serial) | padded tok/s (x serial) | same tokens")
        for n in sizes:
            chosen = requests[:n]
            times: dict[str, list[float]] = {"serial": [], "batched": [], "padded": []}
            outputs = {}
            for _ in range(args.repeats):
                for name, fn in (("serial", decode_serial), ("batched", decode_batched), ("padded", decode_padded)):
                    states = [(copy(cache), logits) for cache, logits, _, _ in chosen]
                    seconds, outputs[name] = timed(fn, adapter, states, args.steps)
                    times[name].append(seconds)
            rate = {k: n * args.steps / statistics.median(v) for k, v in times.items()}
            same = "yes" if outputs["serial"] == outputs["batched"] == outputs["padded"] else (
                f"batched {outputs['serial'] == outputs['batched']}, padded {outputs['serial'] == outputs['padded']}")
            print(f"{n} | {rate['serial']:.1f} | {rate['batched']:.1f} ({rate['batched'] / rate['serial']:.2f}x) | "
                  f"{rate['padded']:.1f} ({rate['padded'] / rate['serial']:.2f}x) | {same}")
        for label, index in (("suffix rows (a Stage I pass)", 2), ("Stage II rows (selected + suffix)", 3)):
            print(f"\n{label}: N | rows | serial s | batched s (x serial) | max |hidden diff|")
            for n in sizes:
                chosen = requests[:n]
                rows_list = [r[index] for r in chosen]
                times = {"serial": [], "batched": []}
                outputs = {}
                for _ in range(args.repeats):
                    for name, fn in (("serial", rows_serial), ("batched", rows_batched)):
                        caches = [copy(r[0]) for r in chosen]
                        seconds, outputs[name] = timed(fn, adapter, caches, rows_list)
                        times[name].append(seconds)
                serial, batched = statistics.median(times["serial"]), statistics.median(times["batched"])
                diff = max(float((a - b).abs().max()) for a, b in zip(outputs["serial"], outputs["batched"],
                                                                     strict=True))
                print(f"{n} | {sum(int(r.numel()) for r in rows_list)} | {serial:.3f} | {batched:.3f} "
                      f"({serial / batched:.2f}x) | {diff:.2e}")
        engine.close()


if __name__ == "__main__":
    main()
