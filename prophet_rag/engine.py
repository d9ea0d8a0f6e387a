"""ProphetEngine: answer a question over retrieved documents, reusing each document's cached KV.

Per request: tokenize `prefix | chunks | suffix` segment by segment; load each chunk's isolated KV from the store
(computing and storing what is missing); stitch the blocks behind the exact prefix, re-rotate the keys to their global
positions and recompute layer 0's K/V exactly; let the selector pick the context tokens to recompute; run the
selective forward over those tokens and the suffix; decode. `method="full"` is plain full prefill over the same ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from prophet_rag.chunk_kv import ChunkKV
from prophet_rag.codec import EntryMeta
from prophet_rag.config import GenerationConfig, PromptConfig, SelectionConfig, StoreConfig
from prophet_rag.errors import ContextWindowError, InvalidRequestError
from prophet_rag.generate import TextAssembler, sample
from prophet_rag.hot_cache import HotCache
from prophet_rag.kernels import rope_shift
from prophet_rag.keys import chunk_key, kv_spec, model_fingerprint, tokenizer_fingerprint
from prophet_rag.layout import PromptBuilder, RequestLayout
from prophet_rag.model_adapter import ModelAdapter
from prophet_rag.prefill import prefill_isolated
from prophet_rag.results import Answer, RequestStats
from prophet_rag.selectors import (
    Plan,
    budget_for,
    default_infoflow_layers,
    lexical_relevance,
    plan,
    query_relevance,
    top_slots,
)
from prophet_rag.stitched import StitchedCache, forward_rows
from prophet_rag.store import KVStore

SCORED_METHODS = ("prophet", "infoflow")


@dataclass
class _Loaded:
    prefix: ChunkKV
    chunks: list[ChunkKV]
    hits: int
    misses: int


class AnswerStream:
    """Iterate for text deltas as they are generated; `answer` holds the full `Answer` once iteration ends."""

    def __init__(self, deltas: Iterator[str]) -> None:
        self._deltas = deltas
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        self.answer = yield from self._deltas


class ProphetEngine:
    """Chunk-KV reuse with query-aware selective recomputation over a Hugging Face causal LM.

    `ProphetEngine(model=..., tokenizer=...)` wraps a loaded model; `ProphetEngine.from_pretrained()` loads one (the
    embedded SmolLM2-135M-Instruct by default). `store` is a `StoreConfig`, an open `KVStore`, or None for the
    default store directory. Defaults for `answer` come from `selection` and `generation`. `hot_cache_bytes` keeps
    that many bytes of recently used chunk KV on the model's device in front of the store (see `hot_cache`): set it
    when serving on a GPU, where a disk read costs more than recomputing the chunk.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        store: StoreConfig | KVStore | None = None,
        prompt: PromptConfig | None = None,
        selection: SelectionConfig | None = None,
        generation: GenerationConfig | None = None,
        kv_dtype: torch.dtype | None = None,
        model_name: str | None = None,
        hot_cache_bytes: int = 0,
    ) -> None:
        self.adapter = ModelAdapter(model)
        self.tokenizer = tokenizer
        self.builder = PromptBuilder(tokenizer, prompt or PromptConfig())
        self.selection = selection or SelectionConfig()
        self.generation = generation or GenerationConfig()
        self.kv_dtype = kv_dtype or self.adapter.spec.dtype
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or model.config.model_type
        self.sink_ids = self.builder.sink_ids()
        self.meta = EntryMeta(model_fingerprint(model), tokenizer_fingerprint(tokenizer), kv_spec(self.kv_dtype))
        self.store = store if isinstance(store, KVStore) else KVStore(store or StoreConfig())
        self.hot = HotCache(hot_cache_bytes)
        self._check_selection(self.selection)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        **kwargs,
    ) -> ProphetEngine:
        """Load a causal LM and its tokenizer; None or "embedded" loads the embedded SmolLM2-135M-Instruct."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prophet_rag.embedded import EMBEDDED_NAME, embedded_model_dir

        if name_or_path in (None, "embedded", EMBEDDED_NAME):
            path, name = embedded_model_dir(), EMBEDDED_NAME
        else:
            path, name = name_or_path, str(name_or_path)
        dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, model_name=kwargs.pop("model_name", name), **kwargs)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ProphetEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- public API -------------------------------------------------------------------------------------------

    def ingest(self, chunks: Sequence[str]) -> int:
        """Compute and store the KV of every chunk not stored yet; returns how many were computed."""
        layout = self.builder.layout(chunks, "ingest")
        self._check_chunk_lengths(layout)
        return self._load(layout).misses

    def answer(
        self,
        chunks: Sequence[str],
        query: str,
        *,
        method: str | None = None,
        ratio: float | None = None,
        selection: SelectionConfig | None = None,
        generation: GenerationConfig | None = None,
        return_logits: bool = False,
    ) -> Answer:
        """Answer `query` over `chunks` (retrieved documents, in retrieval order)."""
        stream = self.stream(chunks, query, method=method, ratio=ratio, selection=selection, generation=generation,
                             return_logits=return_logits)
        for _ in stream:
            pass
        assert stream.answer is not None
        return stream.answer

    def stream(
        self,
        chunks: Sequence[str],
        query: str,
        *,
        method: str | None = None,
        ratio: float | None = None,
        selection: SelectionConfig | None = None,
        generation: GenerationConfig | None = None,
        return_logits: bool = False,
    ) -> AnswerStream:
        """Like `answer`, but iterate the returned stream for text deltas. Bad input raises here, not mid-stream."""
        selection = selection or self.selection
        overrides = {k: v for k, v in (("method", method), ("ratio", ratio)) if v is not None}
        selection = replace(selection, **overrides) if overrides else selection
        self._check_selection(selection)
        generation = generation or self.generation
        layout = self.builder.layout(chunks, query)
        self._check_window(layout, generation)
        return AnswerStream(self._run(layout, selection, generation, return_logits))

    # ---- validation -------------------------------------------------------------------------------------------

    def _check_selection(self, selection: SelectionConfig) -> None:
        layers = self.adapter.spec.num_layers
        if selection.infoflow_layers and max(selection.infoflow_layers) >= layers:
            raise InvalidRequestError(
                f"infoflow_layers {selection.infoflow_layers} name a layer >= {layers}, the model's layer count."
            )
        if selection.reorder_chunks and selection.method not in SCORED_METHODS:
            raise InvalidRequestError(
                f"reorder_chunks needs a query-scored method ({', '.join(SCORED_METHODS)}), got {selection.method!r}."
            )

    def _check_chunk_lengths(self, layout: RequestLayout) -> None:
        limit = self.adapter.spec.max_positions - int(self.sink_ids.numel())
        for i, ids in enumerate(layout.chunk_ids):
            if ids.numel() > limit:
                raise ContextWindowError(
                    f"chunk {i} has {ids.numel()} tokens but the model's context window fits {limit}; "
                    "split the document into smaller chunks."
                )

    def _check_window(self, layout: RequestLayout, generation: GenerationConfig) -> None:
        self._check_chunk_lengths(layout)
        window = self.adapter.spec.max_positions
        needed = layout.total_tokens + generation.max_new_tokens
        if needed > window:
            raise ContextWindowError(
                f"the request needs {layout.total_tokens} prompt tokens + {generation.max_new_tokens} new tokens = "
                f"{needed}, over the model's context window of {window}; retrieve fewer or shorter chunks or lower "
                "max_new_tokens."
            )

    # ---- load, assemble, select, recompute ----------------------------------------------------------------------

    def _load(self, layout: RequestLayout) -> _Loaded:
        """The prefix's exact KV and each chunk's isolated KV: from the store, else computed and stored."""
        empty = self.sink_ids[:0]
        wanted = [(layout.prefix_ids, empty)] + [(ids, self.sink_ids) for ids in layout.chunk_ids]
        keys = [chunk_key(self.meta.model_fp, self.meta.tokenizer_fp, self.meta.kv_spec, ids.tolist(), sink.tolist())
                for ids, sink in wanted]
        found: dict[str, ChunkKV] = {}
        for key, (ids, _) in zip(keys, wanted, strict=True):
            if key in found:
                continue
            kv = self.hot.get(key)
            if kv is None:
                kv = self.store.get(key, self.meta, ids)
                if kv is not None:
                    device = self.adapter.device
                    kv = ChunkKV(kv.token_ids.to(device), kv.positions.to(device), kv.kv.to(device))
                    self.hot.put(key, kv)
            if kv is not None:
                found[key] = kv
        misses = 0
        for sink_group in (empty, self.sink_ids):
            missing = {key: ids for key, (ids, sink) in zip(keys, wanted, strict=True)
                       if key not in found and sink.numel() == sink_group.numel()}
            if missing:
                computed = prefill_isolated(self.adapter, sink_group, list(missing.values()), self.kv_dtype)
                for key, kv in zip(missing, computed, strict=True):
                    found[key] = kv
                    self.store.put(key, kv, self.meta)
                    self.hot.put(key, kv)
                misses += sum(1 for key in missing if key != keys[0])
        chunks = [found[key] for key in keys[1:]]
        return _Loaded(found[keys[0]], chunks, len(set(keys[1:])) - misses, misses)

    def _assemble(self, layout: RequestLayout, loaded: _Loaded, order: Sequence[int], capacity: int,
                  global_positions: bool) -> StitchedCache:
        """Stitch prefix and chunk blocks in `order`, then the suffix tokens (not yet computed).

        With `global_positions`, chunk keys are delta-rotated to their slots' positions and layer 0's K/V is
        recomputed for every chunk token (it depends only on token and position, so this is exact and cheap).
        Without, each chunk keeps the positions it was computed at (the parallel geometry used to score chunks
        before reordering them).
        """
        cache = StitchedCache.empty(self.adapter, capacity, self.kv_dtype)
        prefix = loaded.prefix
        cache.append_tokens(prefix.token_ids)
        cache.kv[:, :, : prefix.num_tokens] = prefix.kv
        cache.prefix_len = prefix.num_tokens
        spans, stored = [], []
        for i in order:
            chunk = loaded.chunks[i]
            slots = cache.append_tokens(chunk.token_ids)
            start, end = int(slots[0]), int(slots[-1]) + 1
            cache.kv[:, :, start:end] = chunk.kv
            spans.append((start, end))
            stored.append(chunk.positions)
        cache.chunk_spans = tuple(spans)
        context = slice(cache.prefix_len, cache.context_end)
        stored_positions = torch.cat(stored)
        if global_positions:
            rope_shift(cache.kv[:, 0, context], cache.positions[context] - stored_positions, self.adapter.inv_freq)
            ids, positions = cache.token_ids[context], cache.positions[context]
            _, k, v = self.adapter.qkv(0, self.adapter.embed(ids), positions)
            cache.kv[0, 0, context], cache.kv[0, 1, context] = k, v
        else:
            cache.positions[context] = stored_positions
        return cache

    def _density_order(self, layout: RequestLayout, loaded: _Loaded, selection: SelectionConfig,
                       capacity: int) -> list[int]:
        """Chunk order by selected-token density, densest last (next to the question): InfoFlow's reordering.

        Scores come from the parallel geometry, where no chunk is favoured for sitting near the question.
        """
        identity = list(range(len(layout.chunk_ids)))
        cache = self._assemble(layout, loaded, identity, capacity, global_positions=False)
        suffix_rows = cache.append_tokens(layout.suffix_ids)
        layers = self._infoflow_layers(selection) if selection.method == "infoflow" else None
        with torch.inference_mode():
            scores = query_relevance(self.adapter, cache, suffix_rows, selection.method, layers)
        budget = budget_for(selection.ratio, layout.context_tokens)
        if budget == 0:
            return identity
        chosen = top_slots(scores, budget, cache.prefix_len)
        density = [float(((chosen >= s) & (chosen < e)).sum()) / (e - s) for s, e in cache.chunk_spans]
        return sorted(identity, key=lambda i: density[i])

    def _infoflow_layers(self, selection: SelectionConfig) -> tuple[int, ...]:
        return selection.infoflow_layers or default_infoflow_layers(self.adapter.spec.num_layers)

    @torch.inference_mode()
    def _prefill(self, layout: RequestLayout, selection: SelectionConfig, capacity: int):
        """Everything up to the first token's logits. Returns (cache, last hidden, stats fields, order, selected)."""
        t0 = time.perf_counter()
        order = list(range(len(layout.chunk_ids)))
        if selection.method == "full":
            cache = StitchedCache.empty(self.adapter, capacity, self.kv_dtype)
            rows = cache.append_tokens(layout.joined_ids().to(self.adapter.device))
            cache.prefix_len = int(layout.prefix_ids.numel())
            hidden, _ = forward_rows(self.adapter, cache, rows)
            elapsed = time.perf_counter() - t0
            timings = dict(load_s=0.0, rerotate_s=0.0, select_s=0.0, recompute_s=elapsed)
            counts = dict(recomputed_tokens=layout.context_tokens, cache_hits=0, cache_misses=0)
            context = torch.arange(cache.prefix_len, cache.prefix_len + layout.context_tokens)
            return cache, hidden, timings, counts, order, context
        loaded = self._load(layout)
        t1 = time.perf_counter()
        if selection.method == "prophet_plus":
            # The chunks sharing the query's rare tokens go last, next to the question (see selectors.prophet_plus).
            relevance = lexical_relevance(list(layout.chunk_ids), layout.suffix_ids)
            order = sorted(order, key=lambda i: float(relevance[i]))
        elif selection.reorder_chunks:
            order = self._density_order(layout, loaded, selection, capacity)
        cache = self._assemble(layout, loaded, order, capacity, global_positions=True)
        suffix_rows = cache.append_tokens(layout.suffix_ids.to(self.adapter.device))
        t2 = time.perf_counter()
        if selection.method == "infoflow":
            selection = replace(selection, infoflow_layers=self._infoflow_layers(selection))
        recompute_plan: Plan = plan(self.adapter, cache, suffix_rows, selection)
        t3 = time.perf_counter()
        hidden, rows = forward_rows(self.adapter, cache, recompute_plan.rows, row_filter=recompute_plan.row_filter)
        t4 = time.perf_counter()
        selected = recompute_plan.selected
        if selected is None:
            selected = rows[rows < cache.context_end]
        timings = dict(load_s=t1 - t0, rerotate_s=t2 - t1, select_s=t3 - t2, recompute_s=t4 - t3)
        counts = dict(recomputed_tokens=int(selected.numel()), cache_hits=loaded.hits, cache_misses=loaded.misses)
        return cache, hidden, timings, counts, order, selected

    def _run(self, layout: RequestLayout, selection: SelectionConfig, generation: GenerationConfig,
             return_logits: bool) -> Iterator[str]:
        t0 = time.perf_counter()
        capacity = layout.total_tokens + generation.max_new_tokens
        cache, hidden, timings, counts, order, selected = self._prefill(layout, selection, capacity)
        with torch.inference_mode():
            logits = self.adapter.logits(hidden[-1:])[0]
        first_logits = logits.clone() if return_logits else None
        ttft = time.perf_counter() - t0
        eos = set(generation.eos_token_ids or self._default_eos())
        generator = torch.Generator().manual_seed(generation.seed) if generation.seed is not None else None
        text = TextAssembler(self.tokenizer, generation.stop)
        t_decode = time.perf_counter()
        for step in range(generation.max_new_tokens):
            token = sample(logits, generation, generator)
            if token in eos:
                break
            delta = text.push(token)
            if delta:
                yield delta
            if text.stopped or step == generation.max_new_tokens - 1:
                break
            with torch.inference_mode():
                rows = cache.append_tokens(torch.tensor([token], device=self.adapter.device))
                hidden, _ = forward_rows(self.adapter, cache, rows)
                logits = self.adapter.logits(hidden)[-1]
        tail = text.finish()
        if tail:
            yield tail
        stats = RequestStats(
            method=selection.method,
            ratio=1.0 if selection.method == "full" else selection.ratio,
            prefix_tokens=int(layout.prefix_ids.numel()),
            context_tokens=layout.context_tokens,
            suffix_tokens=int(layout.suffix_ids.numel()),
            ttft_s=ttft,
            new_tokens=len(text.ids),
            decode_s=time.perf_counter() - t_decode,
            **timings,
            **counts,
        )
        return Answer(
            text=text.emitted,
            token_ids=tuple(text.ids),
            stats=stats,
            recomputed_positions=cache.positions[selected].cpu(),
            first_token_logits=first_logits,
            chunk_order=tuple(order),
        )

    def _default_eos(self) -> list[int]:
        ids = self.adapter.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids
