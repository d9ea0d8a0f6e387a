"""TTFT of a conversation's last turn with prefix reuse against full prefill of the same prompt.

    python benchmarks/bench_conversation.py                  # embedded SmolLM2-135M, 10 turns, ~2K tokens, CPU
    python benchmarks/bench_conversation.py --device cuda --repeats 5

A 10-turn chat: turn 1 and turn 6 bring documents (through the chunk path, recomputed whole: ratio 1, so every
turn's KV equals full prefill's), the other turns are follow-up questions; every answer is generated (greedy) and
goes into the history, earlier turns' documents as `PlacedDocuments`. Then the last turn's TTFT is timed three ways:

- `prefix`: the engine with a prefix cache (`PrefixCacheConfig`), holding turns 1..9 as a conversation leaves them:
  only the last question and the template around it are computed;
- `full`: an engine without one, `method="full"`: full prefill of the same prompt (logits for the last position);
- `hf_last`: Hugging Face `model(ids, logits_to_keep=1)` on the same prompt ids (the prefill `generate` runs).

Each repeat empties the prefix cache and replays turns 1..9 (untimed) so that the timed turn finds exactly what a
conversation leaves; the methods are interleaved across repeats, so a noisy shared machine slows them alike; the
table shows medians. Then the last turn is answered by `prefix` and `full` and their greedy tokens compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_ttft import make_documents

from prophet_rag import DOCUMENTS, GenerationConfig, PlacedDocuments, PrefixCacheConfig, ProphetEngine, StoreConfig

QUESTIONS = (
    "Which clerk kept the keys to archive room 121?",
    "What did the merchants argue about?",
    "Why was the road to the northern quarry closed?",
    "How many old maps did the library receive?",
    "Summarise the committee meeting in one sentence.",
    "Who recorded every visitor, and where?",
    "What do the new documents add about the harbour?",
    "Which room numbers are mentioned?",
    "What was the weather like that week?",
    "List every person named in the documents.",
)
DOCUMENT_TURNS = (0, 5)
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer from the documents."}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def turn_messages(history: list[dict], question: str, documents: list[str]) -> list[dict]:
    content = ["Documents:\n", DOCUMENTS, f"\nQuestion: {question}"] if documents else question
    return [*history, {"role": "user", "content": content}]


def converse(engine: ProphetEngine, documents: dict[int, list[str]], turns: int, generation: GenerationConfig,
             answers: list[str] | None = None) -> list[dict]:
    """Answer the first `turns` turns; the history they leave. With `answers`, check each turn answers as before."""
    history = [SYSTEM]
    for turn in range(turns):
        docs = documents.get(turn, [])
        answer = engine.chat(turn_messages(history, QUESTIONS[turn], docs), docs, ratio=1.0, generation=generation)
        if answers is not None and answer.text != answers[turn]:
            raise RuntimeError(f"turn {turn + 1} answered differently on replay: greedy decoding must repeat")
        placed = ["Documents:\n", PlacedDocuments([docs[i] for i in answer.chunk_order]), f"\nQuestion: "
                  f"{QUESTIONS[turn]}"] if docs else QUESTIONS[turn]
        history += [{"role": "user", "content": placed}, {"role": "assistant", "content": answer.text}]
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--turns", type=int, default=10, choices=range(2, len(QUESTIONS) + 1))
    parser.add_argument("--doc-tokens", type=int, default=720, help="document tokens each document turn brings")
    parser.add_argument("--answer-tokens", type=int, default=48, help="max new tokens of every answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generation = GenerationConfig(max_new_tokens=args.answer_tokens)
    with tempfile.TemporaryDirectory() as store_dir:
        engine = ProphetEngine.from_pretrained(args.model, device=args.device,
                                               store=StoreConfig(directory=f"{store_dir}/a"),
                                               prefix_cache=PrefixCacheConfig(max_bytes=2 * 2**30))
        reference = ProphetEngine(engine.adapter.model, engine.tokenizer, store=StoreConfig(directory=f"{store_dir}/b"),
                                  model_name=engine.model_name)
        pool = make_documents(engine.tokenizer, args.doc_tokens * len(DOCUMENT_TURNS), 200)
        per_turn = -(-len(pool) // len(DOCUMENT_TURNS))
        documents = {turn: pool[i * per_turn : (i + 1) * per_turn] for i, turn in enumerate(DOCUMENT_TURNS)}
        engine.ingest(pool)
        reference.ingest(pool)
        last = args.turns - 1
        history = converse(engine, documents, last, generation)
        answers = [m["content"] for m in history if m["role"] == "assistant"]
        messages = turn_messages(history, QUESTIONS[last], [])
        ids = engine.builder.chat_layout(messages).joined_ids()[None].to(args.device)
        first = GenerationConfig(max_new_tokens=1)

        reused_tokens = []

        def prefix() -> float:
            engine.prefix_cache.clear()
            converse(engine, documents, last, generation, answers)
            _sync(args.device)
            answer = engine.chat(messages, generation=first)
            _sync(args.device)
            reused_tokens.append(answer.stats.prefix_cache_tokens)
            return answer.stats.ttft_s

        def full() -> float:
            _sync(args.device)
            answer = reference.chat(messages, method="full", generation=first)
            _sync(args.device)
            return answer.stats.ttft_s

        def hf_last() -> float:
            with torch.inference_mode():
                _sync(args.device)
                start = time.perf_counter()
                engine.adapter.model(ids, logits_to_keep=1)
                _sync(args.device)
                return time.perf_counter() - start

        runs = {"prefix": prefix, "full": full, "hf_last": hf_last}
        for run in runs.values():  # warm-up, untimed
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(run())
        # The last turn answered in full by both: greedy output must be identical at ratio 1.
        engine.prefix_cache.clear()
        converse(engine, documents, last, generation, answers)
        reused = engine.chat(messages, generation=generation, return_logits=True)
        plain = reference.chat(messages, method="full", generation=generation, return_logits=True)
        drift = float((reused.first_token_logits - plain.first_token_logits).abs().max())

        cpu = f"CPU, {torch.get_num_threads()} threads"
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
        print(f"model {engine.model_name} on {device}; torch {torch.__version__}")
        print(f"turn {args.turns} of a {args.turns}-turn chat: prompt {ids.shape[1]} tokens, {reused_tokens[-1]} of "
              f"them from the prefix cache; median of {args.repeats} interleaved repeats\n")
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"{'method':<10}{'TTFT s':>10}{'x full':>10}{'x hf_last':>12}")
        for name in runs:
            print(f"{name:<10}{median[name]:>10.4f}{median[name] / median['full']:>10.3f}"
                  f"{median[name] / median['hf_last']:>12.3f}")
        same = reused.token_ids == plain.token_ids
        print(f"\nlast turn, {len(plain.token_ids)} greedy tokens: identical to full prefill: {same}; "
              f"first-token logits max abs difference {drift:.2e}")
        engine.close()
        reference.close()


if __name__ == "__main__":
    main()
