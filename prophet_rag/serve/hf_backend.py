"""`prophet-rag serve --backend hf`: the same server over plain Hugging Face `generate`, the baseline of
`benchmarks/bench_serve.py`.

A request is laid out exactly as the engine lays it out (the engine's `PromptBuilder`, the same chat template,
documents and question), then flattened into one prompt and answered by `model.generate` on it: full prefill of
every prompt token, no cached KV, no reuse, one request at a time (a lock; `generate` batches nothing across
callers). Tokens reach the client as `generate` produces them (a streamer), so time to first token is honest too.
Decoding follows the request: greedy at temperature 0, else sampling with its temperature, top-k, top-p and seed;
EOS ids and stop strings end it as they end the engine's answers.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import torch

from prophet_rag.compute.generate import TextAssembler
from prophet_rag.config import GenerationConfig
from prophet_rag.engine import AnswerStream, ProphetEngine
from prophet_rag.errors import ContextWindowError
from prophet_rag.results import Answer, RequestStats

_END = object()


class _NoTiers:
    """The backend keeps no KV: no cache tier to report in /metrics."""

    tiers = ()


class _Tokens:
    """A `generate` streamer: hands each new token id to the request's thread; `put` after `stop` ends `generate`
    early (a stop string, or the client went away)."""

    def __init__(self) -> None:
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = threading.Event()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands the prompt over first
            self._prompt_seen = True
            return
        if self.stop.is_set():
            raise _Stopped()
        for token in value.reshape(-1).tolist():
            self.out.put(int(token))

    def end(self) -> None:
        self.out.put(_END)


class _Stopped(Exception):
    pass


class HFGenerateBackend:
    """What the server needs of an engine (`stream_chat`, `generation`, `builder`, `model_name`, `context_window`,
    `cache.tiers`, `close`), answered by `model.generate` over the flattened prompt. Built from a loaded engine,
    whose model, tokenizer, prompt layout and defaults it uses; the engine's store is never read or written."""

    def __init__(self, engine: ProphetEngine) -> None:
        self._engine = engine
        self.model, self.tokenizer = engine.adapter.model, engine.tokenizer
        self.builder, self.generation = engine.builder, engine.generation
        self.model_name = engine.model_name
        self.context_window = engine.context_window
        self.cache = _NoTiers()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> HFGenerateBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream_chat(self, messages: Sequence[Mapping], documents: Sequence[str] = (), *, method: str | None = None,
                    ratio: float | None = None, generation: GenerationConfig | None = None,
                    transient: Sequence[bool] = (), transient_prefix: bool = False) -> AnswerStream:
        """Like `ProphetEngine.stream_chat`; `method` and `ratio` are ignored (every token is computed), and so are
        the one-off marks (`transient`, `transient_prefix`): this backend stores nothing."""
        generation = generation or self.generation
        layout = self.builder.chat_layout(messages, documents, (), False)
        window = self.context_window
        if layout.total_tokens + generation.max_new_tokens > window:
            raise ContextWindowError(
                f"the request needs {layout.total_tokens} prompt tokens + {generation.max_new_tokens} new tokens, "
                f"over the model's context window of {window}; send fewer or shorter documents or lower max_tokens.")
        return AnswerStream(self._run(layout.joined_ids(), layout, generation))

    def _run(self, ids: torch.Tensor, layout, generation: GenerationConfig) -> Iterator[str]:
        t0 = time.perf_counter()
        eos = list(generation.eos_token_ids or self._engine._default_eos())
        sampled = generation.temperature > 0
        options = dict(max_new_tokens=generation.max_new_tokens, do_sample=sampled, eos_token_id=eos,
                       pad_token_id=eos[0], temperature=generation.temperature if sampled else None,
                       top_k=generation.top_k if sampled and generation.top_k else None,
                       top_p=generation.top_p if sampled else None)
        tokens, failure = _Tokens(), []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if generation.seed is not None:
                        torch.manual_seed(generation.seed)
                    device = self.model.device
                    self.model.generate(input_ids=ids[None].to(device), attention_mask=torch.ones(1, ids.numel(),
                                        dtype=torch.long, device=device), streamer=tokens, **options)
            except _Stopped:
                tokens.end()
            except Exception as error:
                failure.append(error)
                tokens.end()

        worker = threading.Thread(target=run, name="prophet-rag-hf-generate", daemon=True)
        worker.start()
        text = TextAssembler(self.tokenizer, generation.stop)
        ttft = None
        try:
            while (token := tokens.out.get()) is not _END:
                if token in eos:
                    break
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                delta = text.push(token)
                if delta:
                    yield delta
                if text.stopped:
                    break
        finally:
            tokens.stop.set()
        if failure:
            raise failure[0]
        tail = text.finish()
        if tail:
            yield tail
        context = layout.context_tokens
        stats = RequestStats(method="hf_generate", ratio=1.0, prefix_tokens=int(layout.prefix_ids.numel()),
                             context_tokens=context, suffix_tokens=int(layout.suffix_ids.numel()),
                             recomputed_tokens=context, cache_hits=0, cache_misses=len(layout.chunk_ids),
                             ttft_s=ttft if ttft is not None else time.perf_counter() - t0, load_s=0.0,
                             rerotate_s=0.0, select_s=0.0, recompute_s=0.0, new_tokens=len(text.ids),
                             decode_s=time.perf_counter() - t0 - (ttft or 0.0))
        return Answer(text=text.emitted, token_ids=tuple(text.ids), stats=stats,
                      recomputed_positions=torch.arange(layout.prefix_ids.numel(),
                                                        layout.prefix_ids.numel() + context))
