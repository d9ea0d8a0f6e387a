"""ProphetEngine: answer a question over retrieved documents, reusing each document's cached KV.

A request runs as a pipeline: lay out `prefix | chunks | suffix` (layout.py); get every segment's KV from the
chunk cache, computing what no tier holds (cache/chunk_cache.py); let the selection method order the chunks and
stitch their blocks behind the exact prefix, re-rotated to their global positions (compute/stitched.py); let the
method pick the context tokens to recompute (selection/); recompute them with the suffix (stitched.forward_rows);
decode with the other running requests (compute/batcher.py). A method that reuses no cached KV (`full`) is plain
full prefill over the same ids. With a prefix cache (cache/prefix_cache.py), a finished request's KV is kept, and a
later request starting with the same tokens (the next turn of a conversation) copies it in and computes only what
follows.

One engine serves many threads: requests are laid out, checked and detokenized concurrently, and their model
computation (each prefill's assembly, each batched step, each chunk ingested) runs one at a time under the engine's
compute lock (compute/lock.py), first come first served. Up to `BatchConfig.max_batch` requests hold a place at once;
each is prefilled on its caller's thread, its forward passes run in the batcher's steps with those of the requests
prefilling at the same time (`BatchConfig.batch_prefills`), then decoded together with the others, one forward pass
per step for all of them (continuous batching), its tokens handed to its thread through a queue, so a slow or
abandoned consumer blocks nobody.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from prophet_rag import methods
from prophet_rag.cache.chunk_cache import ChunkCache, LoadStats, StaleBlocksError, build_tiers
from prophet_rag.cache.codec import EntryMeta
from prophet_rag.cache.hot_cache import HotCache
from prophet_rag.cache.prefix_cache import PrefixCache
from prophet_rag.cache.store import KVStore, kv_storage
from prophet_rag.compute import batch as batched
from prophet_rag.compute.batcher import Admission, DecodeBatcher
from prophet_rag.compute.generate import Decoding, TextAssembler
from prophet_rag.compute.lock import ComputeLock
from prophet_rag.compute.model_adapter import ModelAdapter
from prophet_rag.compute.prefill import prefill_full, prefill_isolated
from prophet_rag.compute.stitched import (
    LayerGate,
    StitchedCache,
    forward_rows,
    reorder,
    reposition,
    stitched_layout,
)
from prophet_rag.config import (
    BatchConfig,
    GenerationConfig,
    PrefixCacheConfig,
    PromptConfig,
    SelectionConfig,
    StoreConfig,
)
from prophet_rag.errors import ContextWindowError, InvalidRequestError, ModelLoadError
from prophet_rag.layout import PromptBuilder, RequestLayout
from prophet_rag.results import Answer, RequestStats
from prophet_rag.selection.request import Selection
from prophet_rag.selection.request import plan as plan_recompute
from prophet_rag.structured import Grammar, GrammarCache, TokenConstraint, Tool, ToolFormat, as_tools, tool_format
from prophet_rag.structured import tool_choice as parse_tool_choice
from prophet_rag.structured.render import chat_layout as tool_chat_layout
from prophet_rag.structured.render import uses_tools


def _model_location(name_or_path: str | os.PathLike) -> str:
    """A local folder, or a hub id. Something written as a path (absolute, relative, home) must exist: it is never
    looked up on a model hub, where it could only fail slowly."""
    text = os.fspath(name_or_path)
    local = Path(text).expanduser()
    if local.is_dir():
        return str(local)
    hub_id = not text.startswith(("/", ".", "~")) and text.count("/") <= 1  # "name" or "org/name"
    if not hub_id or local.exists():
        raise ModelLoadError(f"{text!r} is not a model folder; pass a folder with config.json and the weights.")
    return text


def _check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device this process can use; else a `ModelLoadError` naming the fix."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(f"device {device!r} is not a device: {error}; pass 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= (device.index or 0):
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else f"{count} CUDA device(s) are visible")
            raise ModelLoadError(
                f"device {str(device)!r} was asked for, but {why}; pass device='cpu' (the framework adapters' "
                "device='auto' picks CUDA only where it is there), or install a CUDA build of torch on a GPU machine."
            )
    return device


def _reachable(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout_s` (name lookup included). True behind a
    proxy, which only the hub client itself can go through."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
            opened.append(True)
        except OSError:
            pass

    # A thread bounds the name lookup too, which no socket timeout covers.
    thread = threading.Thread(target=probe, daemon=True, name="prophet-rag-hub-probe")
    thread.start()
    thread.join(timeout_s)
    return bool(opened)


def _hub_options(hub_id: str) -> dict:
    """`from_pretrained` options for a model named by hub id: the local Hugging Face cache only when it holds the
    model; else the hub, when it can be reached. The hub client retries an unreachable hub for ~25 s before failing,
    so an offline machine (HF_HUB_OFFLINE, or no connection within a second) is told at once instead."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return {"local_files_only": True}
    where = f"{hub_id!r} is not a model folder and not in the Hugging Face cache"
    fix = f"download it where the hub can be reached (`hf download {hub_id}`) or pass a model folder"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{where}, and HF_HUB_OFFLINE is set; {fix}.")
    if not _reachable(constants.ENDPOINT):
        raise ModelLoadError(f"{where}, and {constants.ENDPOINT} cannot be reached; {fix}.")
    return {}


@dataclass
class Prefill:
    """Everything up to the first token's logits."""

    cache: StitchedCache
    hidden: torch.Tensor
    """`[rows, hidden]` last-layer states of the rows recomputed last; the final row gives the first token."""
    selected: torch.Tensor
    """`[k]` sorted context slots recomputed through all layers."""
    order: tuple[int, ...]
    load_s: float
    rerotate_s: float
    select_s: float
    recompute_s: float
    cache_hits: int
    cache_misses: int
    cached_tokens: int = 0
    """Prompt tokens whose KV came from a tier or the prefix cache, not from compute (`LoadStats.cached_tokens`)."""
    prefix_cache_tokens: int = 0
    """Leading prompt tokens whose KV came from the conversation prefix cache."""


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
        self.kv_dtype = kv_dtype or self.adapter.spec.dtype
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or model.config.model_type
        self.sink_ids = self.builder.sink_ids()
        meta = EntryMeta.for_model(model, tokenizer, self.adapter.spec, self.kv_dtype, kv_storage(store))
        self._compute = ComputeLock()
        self.batcher = DecodeBatcher(self.adapter, self._compute, batch)
        compute = self._locked(partial(prefill_isolated, self.adapter, kv_dtype=self.kv_dtype))
        tiers = build_tiers(store, hot_cache_bytes, host_cache_bytes, meta)
        self.cache = ChunkCache(tiers, meta, self.sink_ids, compute)
        self.prefix_cache = PrefixCache(prefix_cache or PrefixCacheConfig())
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
        from prophet_rag.embedded import EMBEDDED_NAME, embedded_model_dir

        device = _check_device(device)
        if name_or_path in (None, "embedded", EMBEDDED_NAME):
            path, name = embedded_model_dir(), EMBEDDED_NAME
        else:
            path, name = _model_location(name_or_path), str(name_or_path)
        hub = _hub_options(path) if not Path(path).is_dir() else {}  # before importing transformers: fails fast
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hub).to(device)
            tokenizer = AutoTokenizer.from_pretrained(path, **hub)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"cannot load a causal LM and its tokenizer from {name!r}: {error}. Pass a model folder with "
                "config.json, the weights and the tokenizer files, or no model for the embedded SmolLM2-135M."
            ) from None
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
        prefill = self._prefill(layout, selection, layout.total_tokens + longest)
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

    def _assemble(self, layout: RequestLayout, order: Sequence[int], capacity: int, global_positions: bool = True,
                  prefix: torch.Tensor | None = None) -> tuple[StitchedCache, LoadStats]:
        """The request's stitched cache with its chunks in `order`, every block filled from the chunk cache (the
        prefix from `prefix` when given) and placed (see `stitched.reposition`); the suffix is not added yet."""
        cache = stitched_layout(self.adapter, layout.prefix_ids, layout.chunk_ids, order, capacity, self.kv_dtype)
        loaded = self.cache.load(layout, cache, prefix=prefix)
        reposition(self.adapter, cache, int(self.sink_ids.numel()), global_positions)
        return cache, loaded

    def _locked(self, compute):
        """`compute` run under the engine's compute lock."""

        def locked(*args, **kwargs):
            with self._compute:
                return compute(*args, **kwargs)

        return locked

    @torch.inference_mode()
    def _prefill(self, layout: RequestLayout, selection: SelectionConfig, capacity: int) -> Prefill:
        # With batch_prefills, the passes of prefills under way together run as one, in the batcher's steps.
        joined = batched.joined(self.batcher.run_pass) if self.batcher.config.batch_prefills else nullcontext()
        with self._compute, joined:
            try:
                return self._prefill_once(layout, selection, capacity, pipeline=True)
            except StaleBlocksError:
                # A stored block failed its check after the request had started on it. Its tier has dropped it, and
                # a second assembly reads every block whole before use, so a failing one is recomputed on the spot.
                return self._prefill_once(layout, selection, capacity, pipeline=False)

    def _prefill_once(self, layout: RequestLayout, selection: SelectionConfig, capacity: int,
                      pipeline: bool) -> Prefill:
        method = methods.get(selection.method)
        t0 = time.perf_counter()
        full = not method.reuses_cache or not layout.chunk_ids
        past = self._history(layout, method.reuses_cache, full)
        reused = sum(int(block.shape[2]) for block in past)
        if full:
            cache, hidden = prefill_full(self.adapter, layout.joined_ids(), int(layout.prefix_ids.numel()), capacity,
                                         self.kv_dtype, past)
            context = torch.arange(cache.prefix_len, cache.prefix_len + layout.context_tokens)
            return Prefill(cache, hidden, context, tuple(range(len(layout.chunk_ids))), 0.0, 0.0, 0.0,
                           time.perf_counter() - t0, 0, 0, reused, reused)
        # A conversation's history: the stored turns, then the rest of the prefix, computed once for every assembly.
        prefix = None
        if past:
            prefix = prefill_full(self.adapter, layout.prefix_ids, int(layout.prefix_ids.numel()),
                                  int(layout.prefix_ids.numel()), self.kv_dtype, past)[0].kv
        t_prefix = time.perf_counter()  # the history's time counts as load: it stands in for the prefix's
        request = Selection(self.adapter, selection, layout.chunk_ids, layout.suffix_ids)
        first: list[tuple[StitchedCache, LoadStats, bool]] = []

        def assemble(order: Sequence[int], global_positions: bool) -> StitchedCache:
            if global_positions:
                cache, loaded = self._assemble(layout, order, capacity, prefix=prefix)
            else:  # blocks as stored: the ordering step's pass waits for each layer, nothing to place
                cache = stitched_layout(self.adapter, layout.prefix_ids, layout.chunk_ids, order, capacity,
                                        self.kv_dtype)
                loaded = self.cache.load(layout, cache, pipeline, prefix)
                reposition(self.adapter, cache, int(self.sink_ids.numel()), False)
                if loaded.pending is not None:
                    cache.layer_ready = loaded.pending.wait
            first.append((cache, loaded, global_positions))
            return cache

        order = method.order(request, assemble) if method.order else None
        t1 = time.perf_counter()
        layout_order = range(len(layout.chunk_ids)) if order is None else order
        sink = int(self.sink_ids.numel())
        # The ordering step assembled the blocks as stored (parallel geometry): they are laid out again in place.
        in_place = bool(first) and not first[0][2]
        if in_place:
            cache, counted, _ = first[0]
            if counted.pending is not None:
                for layer in range(self.adapter.spec.num_layers):
                    counted.pending.wait(layer)
            loaded = LoadStats(counted.hits, counted.misses)
        else:
            cache = stitched_layout(self.adapter, layout.prefix_ids, layout.chunk_ids, layout_order, capacity,
                                    self.kv_dtype)
            loaded = self.cache.load(layout, cache, pipeline, prefix)
            counted = first[0][1] if first else loaded
        t2 = time.perf_counter()
        if in_place:
            reorder(self.adapter, cache, layout_order, sink)
        elif loaded.pending is None:
            reposition(self.adapter, cache, sink)
        else:  # stored blocks arrive layer by layer: each pass waits for, and places, the layers it reaches
            cache.layer_ready = LayerGate(loaded.pending.wait, partial(reposition, self.adapter, cache, sink, True))
        suffix_rows = cache.append_tokens(layout.suffix_ids.to(self.adapter.device))
        t3 = time.perf_counter()
        plan = plan_recompute(self.adapter, cache, suffix_rows, selection, request)
        t4 = time.perf_counter()
        hidden, rows = batched.forward(self.adapter, cache, plan.rows, row_filter=plan.row_filter)
        t5 = time.perf_counter()
        selected = plan.selected if plan.selected is not None else rows[rows < cache.context_end]
        # The ordering step is a method's scoring (prophet_focus's Stage I): it counts as selection.
        return Prefill(cache, hidden, selected, cache.order, (t2 - t1) + (t_prefix - t0), t3 - t2,
                       (t1 - t_prefix) + (t4 - t3), t5 - t4, counted.hits, counted.misses,
                       counted.cached_tokens(cache, selected) + reused, reused)

    def _history(self, layout: RequestLayout, reuses_cache: bool, full: bool) -> list[torch.Tensor]:
        """KV blocks of the longest stored prefix of the request's prompt (see `cache.prefix_cache`), leaving at
        least one token to compute: of the whole prompt when it is prefilled whole (no documents), of the prefix
        when the prefix holds a conversation's history (another prefix is stored as a segment in the chunk tiers).
        A method that reuses no cached KV (`full`, the reference) reads none."""
        if not reuses_cache:
            return []
        if full:
            return self.prefix_cache.lookup(layout.joined_ids(), layout.total_tokens - 1)
        if layout.transient_prefix:
            return self.prefix_cache.lookup(layout.prefix_ids, int(layout.prefix_ids.numel()) - 1)
        return []

    def _keep(self, cache: StitchedCache) -> None:
        """Keep the KV this request used, prompt and generated tokens, for the next turn of its conversation."""
        if not self.prefix_cache.enabled:
            return
        n = cache.length
        assert torch.equal(cache.positions[:n].cpu(), torch.arange(n)), "a finished request sits at positions 0..n-1"
        with self._compute, torch.inference_mode():
            self.prefix_cache.put(cache.token_ids[:n], cache.kv[:, :, :n])

    def _run(self, layout: RequestLayout, selection: SelectionConfig, generation: GenerationConfig,
             return_logits: bool, constraint: TokenConstraint | None, special_tokens: bool,
             admission: Admission) -> Iterator[str]:
        t0 = time.perf_counter()
        # The first token's logits in the same hold of the lock as the prefill's end: a prefill whose passes ran in
        # the batcher's steps waits in line for the lock once after its last pass, not twice.
        with self._compute, torch.inference_mode():
            prefill = self._prefill(layout, selection, layout.total_tokens + generation.max_new_tokens)
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
        self._keep(prefill.cache)
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
