"""`ProphetEngine`, the public face of the engine, and `AnswerStream`, what its streaming calls return.

Owns the request's life around its prefill: the public calls (`answer`, `stream`, `chat`, `stream_chat`,
`continuation_logits`, `ingest`), checking a request before it starts (its selection, the context window, its grammar
and tools), a place among the requests decoded together (`DecodeBatcher.admit`), the decode loop's text and the
`Answer` with its `RequestStats`. The prefill itself is `pipeline.Prefiller`'s, the model's loading `loading`'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import replace
from functools import partial

import torch

from prophet_rag import methods
from prophet_rag.cache.chunk_cache import ChunkCache, build_tiers
from prophet_rag.cache.codec import EntryMeta
from prophet_rag.cache.hot_cache import HotCache
from prophet_rag.cache.prefix_cache import PrefixCache
from prophet_rag.cache.store import KVStore, kv_storage
from prophet_rag.compute.batcher import Admission, DecodeBatcher
from prophet_rag.compute.generate import Decoding, TextAssembler
from prophet_rag.compute.lock import ComputeLock
from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.prefill import prefill_isolated
from prophet_rag.compute.stitched import forward_rows
from prophet_rag.config import (
    BatchConfig,
    GenerationConfig,
    PrefixCacheConfig,
    PromptConfig,
    SelectionConfig,
    StoreConfig,
)
from prophet_rag.engine.loading import load_pretrained
from prophet_rag.engine.pipeline import Prefiller
from prophet_rag.errors import ContextWindowError, InvalidRequestError
from prophet_rag.layout import PromptBuilder, RequestLayout
from prophet_rag.results import Answer, RequestStats
from prophet_rag.structured import Grammar, GrammarCache, TokenConstraint, Tool, ToolFormat, as_tools, tool_format
from prophet_rag.structured import tool_choice as parse_tool_choice
from prophet_rag.structured.render import chat_layout as tool_chat_layout
from prophet_rag.structured.render import uses_tools


class AnswerStream:
    """Iterate for text deltas as they are generated; `answer` holds the full `Answer` once iteration ends."""

    def __init__(self, deltas: Iterator[str]) -> None:
        self._deltas = deltas
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        self.answer = yield from self._deltas

    def result(self) -> Answer:
        """Run the stream to its end; the `Answer`."""
        for _ in self:
            pass
        assert self.answer is not None
        return self.answer


class ProphetEngine:
    """Chunk-KV reuse with query-aware selective recomputation over a Hugging Face causal LM.

    `ProphetEngine(model=..., tokenizer=...)` wraps a loaded model; `ProphetEngine.from_pretrained()` loads one (the
    embedded SmolLM2-135M-Instruct by default). `store` is a `StoreConfig`, an open `KVStore`, or None for the
    default store directory. Defaults for `answer` come from `selection` and `generation`. `hot_cache_bytes` keeps
    that many bytes of recently used chunk KV on the model's device in front of the store, and `host_cache_bytes`
    that many in (pinned) host memory behind it (see `hot_cache`): set them when serving on a GPU. `prefix_cache`
    keeps finished requests' KV for the next turn of their conversations (see `cache.prefix_cache`; off by default).
    `batch` bounds how many requests run at once and are decoded together (`BatchConfig`: 8, and 64 waiting).
    `kv_dtype`, when given, must be the model's dtype: KV is kept as the layers compute it (`StoreConfig.kv_storage`
    compacts what is stored).
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
        host_cache_bytes: int = 0,
        prefix_cache: PrefixCacheConfig | None = None,
        batch: BatchConfig | None = None,
    ) -> None:
        self.adapter = ModelAdapter(model)
        self.tokenizer = tokenizer
        self.builder = PromptBuilder(tokenizer, prompt or PromptConfig())
        self.selection = selection or SelectionConfig()
        self.generation = generation or GenerationConfig()
        if kv_dtype is not None and kv_dtype != self.adapter.spec.dtype:
            # The stitched cache holds what the model's layers compute and attend over, in the model's dtype.
            raise InvalidRequestError(
                f"kv_dtype {kv_dtype} differs from the model's {self.adapter.spec.dtype}: the engine keeps KV in the "
                f"model's dtype. Load the model in {kv_dtype} (from_pretrained(..., dtype={kv_dtype})), or keep the "
                "model and store its KV compacted with StoreConfig(kv_storage=\"bfloat16\")."
            )
        self.kv_dtype = self.adapter.spec.dtype
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or model.config.model_type
        self.sink_ids = self.builder.sink_ids()
        meta = EntryMeta.for_model(model, tokenizer, self.adapter.spec, self.kv_dtype, kv_storage(store))
        self._compute = ComputeLock()
        self.batcher = DecodeBatcher(self.adapter, self._compute, batch)
        compute = self._locked(partial(prefill_isolated, self.adapter, kv_dtype=self.kv_dtype))
        tiers = build_tiers(store, hot_cache_bytes, host_cache_bytes, meta)
        self.cache = ChunkCache(tiers, meta, self.sink_ids, compute)
        self.prefix_cache = PrefixCache(prefix_cache or PrefixCacheConfig())
        self.prefiller = Prefiller(self.adapter, self.cache, self.prefix_cache, self.sink_ids, self.kv_dtype,
                                   self._compute, self.batcher)
        """Each request's prefill, up to its first token's logits (`engine.pipeline`)."""
        self._check_selection(self.selection)
        self.grammars = GrammarCache()
        """Grammars prepared for this engine's tokenizer (constrained decoding)."""
        self.tool_format: ToolFormat = tool_format(tokenizer)
        """How this model's tools are rendered and its calls written (`structured.formats`)."""

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        **kwargs,
    ) -> ProphetEngine:
        """Load a causal LM and its tokenizer; None or "embedded" loads the embedded SmolLM2-135M-Instruct."""
        model, tokenizer, name = load_pretrained(name_or_path, device, dtype)
        return cls(model, tokenizer, model_name=kwargs.pop("model_name", name), **kwargs)

    @property
    def store(self) -> KVStore:
        """The persistent disk tier."""
        return self.cache.tier("disk")

    @property
    def hot(self) -> HotCache:
        """The in-memory tier on the model's device (`hot_cache_bytes`)."""
        return self.cache.tier("memory")

    @property
    def meta(self) -> EntryMeta:
        return self.cache.meta

    @property
    def context_window(self) -> int:
        """The most tokens one request may hold: prompt plus generated tokens."""
        return self.adapter.spec.max_positions

    def close(self) -> None:
        self.cache.close()
        self.prefix_cache.clear()

    def __enter__(self) -> ProphetEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- public API -------------------------------------------------------------------------------------------

    def ingest(self, chunks: Sequence[str]) -> int:
        """Compute and store the KV of every chunk not stored yet; returns how many were computed."""
        layout = self.builder.layout(chunks, "ingest")
        self._check_chunk_lengths(layout)
        with torch.inference_mode():
            return self.cache.ingest(layout.chunk_ids)

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
        grammar: Grammar | None = None,
        tools: Sequence[Tool | Mapping] = (),
        tool_choice: object = None,
    ) -> Answer:
        """Answer `query` over `chunks` (retrieved documents, in retrieval order).

        `grammar` constrains the answer (a `structured.Grammar`: a JSON schema, a regex, a Lark grammar): each
        token is chosen among those the grammar allows, so the answer matches it whenever it ends by the grammar's
        own end rather than `max_new_tokens`. `tools` (OpenAI-format mappings or `structured.Tool`s) are rendered
        in the model's own tool format; `tool_choice` (`"auto"`, the default, `"none"`, `"required"` or a tool's
        name) picks the grammar of the answer unless `grammar` is given. With tools, the answer's text keeps the
        special tokens of the call format; `engine.tool_format.parse(answer.text, tools)` splits out the calls.
        """
        return self.stream(chunks, query, method=method, ratio=ratio, selection=selection, generation=generation,
                           return_logits=return_logits, grammar=grammar, tools=tools,
                           tool_choice=tool_choice).result()

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
        grammar: Grammar | None = None,
        tools: Sequence[Tool | Mapping] = (),
        tool_choice: object = None,
    ) -> AnswerStream:
        """Like `answer`, but iterate the returned stream for text deltas. Bad input raises here, not mid-stream."""
        selection = self._selection(selection, method, ratio)
        layout = self.builder.layout(chunks, query)
        tools = as_tools(tools) if tools else ()
        if tools:  # the same messages, with the tools rendered too
            layout = tool_chat_layout(self.builder, self.builder.rag_messages(query), chunks, tools, self.tool_format)
        return self._start(layout, selection, generation, return_logits,
                           self._grammar(grammar, tools, tool_choice), bool(tools))

    def chat(
        self,
        messages: Sequence[Mapping],
        documents: Sequence[str] = (),
        *,
        transient: Sequence[bool] = (),
        transient_prefix: bool = False,
        method: str | None = None,
        ratio: float | None = None,
        selection: SelectionConfig | None = None,
        generation: GenerationConfig | None = None,
        return_logits: bool = False,
        grammar: Grammar | None = None,
        tools: Sequence[Tool | Mapping] = (),
        tool_choice: object = None,
    ) -> Answer:
        """Answer chat `messages` (`{"role", "content"}` mappings) rendered with the model's chat template.

        With `documents`, one message's content is a list holding `layout.DOCUMENTS` where they go (for example
        `["Context:\n", DOCUMENTS, "\nQuestion: ..."]`): each document is a cached chunk, the text before that
        place the prefix and the text after it the suffix. `transient[i]` marks document i as one-off text
        (computed, never stored); `transient_prefix=True` does the same for the prefix, for a prefix that holds
        per-call text (a refine step's answer so far, a question placed before the documents). Without documents
        the prompt is answered with plain full prefill.

        `grammar`, `tools` and `tool_choice` are as for `answer`. An assistant message may carry `tool_calls`
        (OpenAI-format calls) and a `tool` message its `tool_call_id` and `name`: such a conversation is rendered
        in the model's tool format (`structured.render`), tools bound or not.
        """
        return self.stream_chat(messages, documents, transient=transient, transient_prefix=transient_prefix,
                                method=method, ratio=ratio, selection=selection, generation=generation,
                                return_logits=return_logits, grammar=grammar, tools=tools,
                                tool_choice=tool_choice).result()

    def stream_chat(
        self,
        messages: Sequence[Mapping],
        documents: Sequence[str] = (),
        *,
        transient: Sequence[bool] = (),
        transient_prefix: bool = False,
        method: str | None = None,
        ratio: float | None = None,
        selection: SelectionConfig | None = None,
        generation: GenerationConfig | None = None,
        return_logits: bool = False,
        grammar: Grammar | None = None,
        tools: Sequence[Tool | Mapping] = (),
        tool_choice: object = None,
    ) -> AnswerStream:
        """Like `chat`, but iterate the returned stream for text deltas."""
        selection = self._selection(selection, method, ratio)
        tools = as_tools(tools) if tools else ()
        if tools or uses_tools(messages):
            layout = tool_chat_layout(self.builder, messages, documents, tools, self.tool_format, transient,
                                      transient_prefix)
        else:
            layout = self.builder.chat_layout(messages, documents, transient, transient_prefix)
        return self._start(layout, selection, generation, return_logits,
                           self._grammar(grammar, tools, tool_choice), bool(tools))

    def _grammar(self, grammar: Grammar | None, tools: Sequence[Tool], choice: object) -> Grammar | None:
        """The request's grammar: `grammar`, else that of `choice` over `tools`, else none."""
        if grammar is not None and not isinstance(grammar, Grammar):
            raise InvalidRequestError(
                f"grammar must be a structured.Grammar (Grammar.json_schema(schema), Grammar.regex(...)), got "
                f"{type(grammar).__name__}."
            )
        if not tools:
            if choice is not None:
                raise InvalidRequestError(f"tool_choice {choice!r} was given without tools; pass the tools too.")
            return grammar
        choice = parse_tool_choice(choice, tools)
        return grammar if grammar is not None else self.tool_format.grammar(tools, choice)

    def continuation_logits(
        self,
        chunks: Sequence[str],
        query: str,
        continuations: Sequence[Sequence[int]],
        *,
        method: str | None = None,
        ratio: float | None = None,
        selection: SelectionConfig | None = None,
    ) -> list[torch.Tensor]:
        """Teacher forcing: the `[n, vocab]` fp32 logits the model gives each token of every continuation (token
        ids of n >= 1 tokens) after the prompt of `answer(chunks, query)` prefilled by the selected method.

        Row i of a result predicts `continuation[i]`: row 0 comes from the prompt, row i from the prompt and the
        continuation's first i tokens. The prompt is prefilled once; every continuation is forced on top of it.
        For evaluation (log-likelihood of a gold answer, divergence from full prefill along the same tokens).
        """
        selection = self._selection(selection, method, ratio)
        if not continuations or any(len(c) == 0 for c in continuations):
            raise InvalidRequestError("continuations must be a non-empty list of non-empty token id lists.")
        layout = self.builder.layout(chunks, query)
        longest = max(len(c) for c in continuations)
        self._check_window(layout, replace(self.generation, max_new_tokens=longest))
        prefill = self.prefiller.prefill(layout, selection, layout.total_tokens + longest)
        cache = prefill.cache
        out = []
        with self._compute, torch.inference_mode():
            first = self.adapter.logits(prefill.hidden[-1:]).float()
            end = cache.length
            for continuation in continuations:
                forced = torch.as_tensor(list(continuation)[:-1], dtype=torch.long, device=self.adapter.device)
                rows = [first]
                if forced.numel():
                    hidden, _ = forward_rows(self.adapter, cache, cache.append_tokens(forced))
                    rows.append(self.adapter.logits(hidden).float())
                out.append(torch.cat(rows).cpu())
                cache.length = end  # the next continuation is forced on the prompt alone
        return out

    def _start(self, layout: RequestLayout, selection: SelectionConfig, generation: GenerationConfig | None,
               return_logits: bool, grammar: Grammar | None = None, special_tokens: bool = False) -> AnswerStream:
        generation = generation or self.generation
        self._check_window(layout, generation)
        constraint = None
        if grammar is not None:  # built here, so that a grammar that cannot compile fails before the stream starts
            constraint = TokenConstraint.build(grammar, self.tokenizer, self.adapter.spec.vocab_size,
                                               self._eos(generation), self.grammars)
        return AnswerStream(self._admitted(partial(self._run, layout, selection, generation, return_logits, constraint,
                                                   special_tokens)))

    def _admitted(self, pipeline) -> Iterator[str]:
        """`pipeline(admission)`'s deltas, once the request has a place among the requests decoded together
        (`DecodeBatcher.admit`, when iteration starts; its statistics' times start there); the place is given back
        when the pipeline ends or is closed."""
        with self.batcher.admit() as admission:
            return (yield from pipeline(admission))

    # ---- validation -------------------------------------------------------------------------------------------

    def _selection(self, selection: SelectionConfig | None, method: str | None, ratio: float | None) -> SelectionConfig:
        selection = selection or self.selection
        overrides = {k: v for k, v in (("method", method), ("ratio", ratio)) if v is not None}
        selection = replace(selection, **overrides) if overrides else selection
        self._check_selection(selection)
        return selection

    def _check_selection(self, selection: SelectionConfig) -> None:
        layers = self.adapter.spec.num_layers
        if selection.infoflow_layers and max(selection.infoflow_layers) >= layers:
            raise InvalidRequestError(
                f"infoflow_layers {selection.infoflow_layers} name a layer >= {layers}, the model's layer count."
            )
        if selection.reorder_chunks and not methods.get(selection.method).query_scored:
            scored = ", ".join(m.name for m in methods.REGISTRY.values() if m.query_scored)
            raise InvalidRequestError(
                f"reorder_chunks needs a query-scored method ({scored}), got {selection.method!r}."
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

    # ---- the request pipeline ---------------------------------------------------------------------------------

    def _locked(self, compute):
        """`compute` run under the engine's compute lock."""

        def locked(*args, **kwargs):
            with self._compute:
                return compute(*args, **kwargs)

        return locked

    def _run(self, layout: RequestLayout, selection: SelectionConfig, generation: GenerationConfig,
             return_logits: bool, constraint: TokenConstraint | None, special_tokens: bool,
             admission: Admission) -> Iterator[str]:
        t0 = time.perf_counter()
        # The first token's logits in the same hold of the lock as the prefill's end: a prefill whose passes ran in
        # the batcher's steps waits in line for the lock once after its last pass, not twice.
        with self._compute, torch.inference_mode():
            prefill = self.prefiller.prefill(layout, selection, layout.total_tokens + generation.max_new_tokens)
            logits = self.adapter.logits(prefill.hidden[-1:])[0]
        first_logits = logits.clone() if return_logits else None
        ttft = time.perf_counter() - t0
        eos = self._eos(generation)
        text = TextAssembler(self.tokenizer, generation.stop, skip_special_tokens=not special_tokens)
        t_decode = time.perf_counter()
        # Closed however the loop ends (a stop string, the consumer closing the stream): the request leaves the batch.
        with closing(admission.decode(prefill.cache, logits, Decoding(generation, eos, constraint))) as tokens:
            for token in tokens:
                delta = text.push(token)
                if delta:
                    yield delta
                if text.stopped:
                    break
        tail = text.finish()
        if tail:
            yield tail
        self.prefiller.keep(prefill.cache)
        reused = methods.get(selection.method).reuses_cache and bool(layout.chunk_ids)
        stats = RequestStats(
            method=selection.method if reused else "full",
            ratio=selection.ratio if reused else 1.0,
            prefix_tokens=int(layout.prefix_ids.numel()),
            context_tokens=layout.context_tokens,
            suffix_tokens=int(layout.suffix_ids.numel()),
            recomputed_tokens=int(prefill.selected.numel()),
            cache_hits=prefill.cache_hits,
            cache_misses=prefill.cache_misses,
            ttft_s=ttft,
            load_s=prefill.load_s,
            rerotate_s=prefill.rerotate_s,
            select_s=prefill.select_s,
            recompute_s=prefill.recompute_s,
            new_tokens=len(text.ids),
            decode_s=time.perf_counter() - t_decode,
            cached_tokens=prefill.cached_tokens,
            prefix_cache_tokens=prefill.prefix_cache_tokens,
        )
        return Answer(
            text=text.emitted,
            token_ids=tuple(text.ids),
            stats=stats,
            recomputed_positions=prefill.cache.positions[prefill.selected].cpu(),
            first_token_logits=first_logits,
            chunk_order=prefill.order,
        )

    def _eos(self, generation: GenerationConfig) -> set[int]:
        """The ids that end an answer (`eos_token_ids`, else the model's own)."""
        return set(generation.eos_token_ids or self._default_eos())

    def _default_eos(self) -> list[int]:
        ids = self.adapter.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids
