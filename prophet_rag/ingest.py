"""Ingest a folder of documents into the chunk store, in this process or on a Ray cluster (`cache ingest [--ray]`).

Both paths run the same steps. Each .txt/.md file is one chunk, tokenized as `ProphetEngine.ingest` does; its key is
derived (`ChunkCache.ref`) and every tier is asked whether it holds it, so stored chunks are skipped before any
compute. The missing chunks are prefilled in isolation, one at a time (so on the same number of torch threads every
entry's bytes are what a single-process ingest writes; batching would pad them), and written to every tier the
`StoreConfig` names: the disk store and, with `remote_url`, the shared server. A file that cannot be ingested is
reported by name and counted; the rest go on.

On Ray the driver (this process) reads, tokenizes, derives keys and asks the tiers; an actor pool of engines, one
model load per worker, only sees the token ids of missing chunks. The workers build their engines from the driver's
`StoreConfig`, so they write wherever it says.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prophet_rag.config import StoreConfig
from prophet_rag.errors import ProphetRAGError

# Tokens of chunks per task sent to a worker: small enough that the progress bar moves and a failed task loses
# little, large enough that Ray's per-task overhead (a few ms) stays small against the prefill.
BATCH_TOKENS = 4096
# Tasks in flight per worker: a second one waits on the worker while the driver handles the first one's result.
IN_FLIGHT = 2
# The local instance's shared-memory object store: only token ids and small results pass through it.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
# Workers load the model before any work: long on a slow shared filesystem, forever on a cluster without the CPUs.
LOAD_TIMEOUT_S = 900
RAY_INSTALL = "pip install 'prophet-rag[ray]'"


class IngestError(ProphetRAGError):
    """Ingestion cannot run at all (Ray missing or unreachable, workers that cannot load the model or disagree)."""


# ---- reading ------------------------------------------------------------------------------------------------------


def text_files(folder: Path) -> list[Path]:
    """The .txt and .md files under `folder`, sorted (one document each)."""
    if not folder.is_dir():
        raise ProphetRAGError(f"{folder} is not a folder; pass a folder of .txt/.md files.")
    return sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())


def read_document(path: Path) -> str:
    """A document file's text, stripped; one that is not UTF-8 raises ProphetRAGError with the fix."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise ProphetRAGError(
            f"not UTF-8 text (byte {error.start}: {error.reason}); convert it to UTF-8 (e.g. `iconv -t utf-8`)"
        ) from None


# ---- planning: keys and the tiers' answers, before any compute ----------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One file's chunk: to compute (`ref` set, `status` "todo"), or "stored", "empty" or "failed" (`reason`)."""

    name: str
    status: str
    ref: object = None
    """The `cache.tier.ChunkRef` of a chunk to compute."""
    reason: str = ""


def plan(files: Iterable[Path], builder, cache, chunk_limit: int) -> Iterator[Planned]:
    """Each file's chunk as `ProphetEngine.ingest` would lay it out, keyed by `cache` (a `ChunkCache`), in order.

    A chunk any tier of `cache` holds, or that an earlier file of this run already yields, is "stored"; one longer
    than `chunk_limit` tokens, undecodable or refused text is "failed" with the reason. Lazy, so a corpus is never
    tokenized into memory at once."""
    seen: set[str] = set()
    for path in files:
        name = str(path)
        try:
            text = read_document(path)
            if not text:
                yield Planned(name, "empty")
                continue
            ids = builder.layout([text], "ingest").chunk_ids[0]
        except OSError as error:
            yield Planned(name, "failed", reason=f"cannot be read: {error.strerror or error}")
            continue
        except ProphetRAGError as error:  # not UTF-8, or text the tokenizer refuses (control chars, lone surrogates)
            yield Planned(name, "failed", reason=str(error))
            continue
        if ids.numel() > chunk_limit:
            yield Planned(name, "failed", reason=f"chunk 0 has {ids.numel()} tokens but the model's context window "
                                                 f"fits {chunk_limit}; split the document into smaller files.")
            continue
        ref = cache.ref(ids, cache.sink_ids)
        if ref.key in seen or any(tier.contains(ref.key) for tier in cache.tiers):
            yield Planned(name, "stored")
        else:
            seen.add(ref.key)
            yield Planned(name, "todo", ref)


def chunk_limit(engine) -> int:
    """The most tokens one chunk may hold: the context window less the sink it is computed behind."""
    return engine.context_window - int(engine.sink_ids.numel())


def compute(cache, chunks: Sequence[tuple[str, Sequence[int]]]) -> list[tuple[bool, str | None]]:
    """Prefill and store each `(key, token_ids)` chunk alone; per chunk `(computed, error)`.

    `computed` is False when a tier held the chunk by now (another writer); `error` names what failed, and the other
    chunks still run. A key that is not this engine's key of the ids (another model or tokenizer than the planner's)
    is refused before any compute, since storing it would file the entry under a key no lookup derives."""
    import torch

    results: list[tuple[bool, str | None]] = []
    with torch.inference_mode():
        for key, token_ids in chunks:
            ids = torch.as_tensor(token_ids, dtype=torch.long)
            if cache.ref(ids, cache.sink_ids).key != key:
                results.append((False, "the worker derives another key for this chunk: its model or tokenizer "
                                       "differs from the planner's; give every node the same model folder."))
                continue
            try:
                results.append((cache.ingest([ids]) == 1, None))
            except Exception as error:  # one chunk's failure is reported by name; the rest go on
                results.append((False, f"{type(error).__name__}: {error}"))
    return results


# ---- the summary --------------------------------------------------------------------------------------------------


@dataclass
class IngestSummary:
    """What an ingest did: per-file outcomes, computed tokens and the compute's wall time."""

    files: int = 0
    computed: int = 0
    """Chunks prefilled and stored by this run."""
    tokens: int = 0
    """Tokens of the computed chunks (the sink they are computed behind not counted)."""
    stored: int = 0
    """Chunks skipped without compute: a tier held them, or an earlier file of the run has the same text."""
    empty: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    """`(file, reason)` of every file that could not be ingested."""
    sent: int = 0
    """Chunks handed to prefill (workers on Ray): 0 when every chunk was stored already."""
    compute_s: float = 0.0
    """Wall time from the first chunk handed to prefill to the last result (model loading not counted)."""
    total_s: float = 0.0
    workers: int = 0
    """Ray workers; 0 for an in-process ingest."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.compute_s if self.compute_s > 0 else 0.0

    def line(self) -> str:
        where = f" on {self.workers} Ray worker{'s' * (self.workers != 1)}" if self.workers else ""
        return (f"{self.files} files: {self.computed} chunks computed{where} ({self.tokens} tokens, "
                f"{self.tokens_per_s:.0f} tokens/s), {self.stored} skipped (already stored), {self.empty} empty, "
                f"{len(self.failed)} failed ({self.total_s:.1f} s).")

    def count(self, item: Planned) -> None:
        if item.status == "stored":
            self.stored += 1
        elif item.status == "empty":
            self.empty += 1
        elif item.status == "failed":
            self.failed.append((item.name, item.reason))

    def record(self, item: Planned, computed: bool, error: str | None) -> None:
        if error is not None:
            self.failed.append((item.name, error))
        elif computed:
            self.computed += 1
            self.tokens += item.ref.num_tokens
        else:
            self.stored += 1


class _Progress:
    """A tqdm bar over the files (shown on a terminal), failures written above it as they come."""

    def __init__(self, total: int, summary: IngestSummary, show: bool | None) -> None:
        from tqdm import tqdm

        self.summary = summary
        self.bar = tqdm(total=total, unit="file", file=sys.stderr, disable=None if show is None else not show,
                        dynamic_ncols=True)

    def done(self, files: int) -> None:
        self.bar.update(files)
        self.bar.set_postfix(computed=self.summary.computed, skipped=self.summary.stored,
                             failed=len(self.summary.failed), refresh=False)

    def failures_since(self, before: int) -> None:
        for name, reason in self.summary.failed[before:]:
            self.bar.write(f"  {name}: skipped: {reason}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def batches(items: Iterable[Planned], summary: IngestSummary, progress: _Progress,
            batch_tokens: int | None = None) -> Iterator[list[Planned]]:
    """The "todo" chunks of `items` in batches of up to `batch_tokens` tokens (default `BATCH_TOKENS`, at least one
    chunk); the others are counted into `summary` as they pass."""
    batch_tokens = batch_tokens or BATCH_TOKENS
    batch: list[Planned] = []
    tokens = 0
    for item in items:
        if item.status != "todo":
            before = len(summary.failed)
            summary.count(item)
            progress.failures_since(before)
            progress.done(1)
            continue
        if batch and tokens + item.ref.num_tokens > batch_tokens:
            yield batch
            batch, tokens = [], 0
        batch.append(item)
        tokens += item.ref.num_tokens
    if batch:
        yield batch


def _finish(summary: IngestSummary, progress: _Progress, batch: Sequence[Planned],
            results: Sequence[tuple[bool, str | None]]) -> None:
    before = len(summary.failed)
    for item, (computed, error) in zip(batch, results, strict=True):
        summary.record(item, computed, error)
    progress.failures_since(before)
    progress.done(len(batch))


# ---- in this process ------------------------------------------------------------------------------------------------


def ingest_files(engine, files: Sequence[Path], *, show_progress: bool | None = None) -> IngestSummary:
    """Ingest `files` with `engine` in this process."""
    start = time.perf_counter()
    summary = IngestSummary(files=len(files))
    progress = _Progress(len(files), summary, show_progress)
    try:
        planned = plan(files, engine.builder, engine.cache, chunk_limit(engine))
        for batch in batches(planned, summary, progress):
            t0 = time.perf_counter()
            summary.sent += len(batch)
            results = compute(engine.cache, [(item.ref.key, item.ref.token_ids) for item in batch])
            summary.compute_s += time.perf_counter() - t0
            _finish(summary, progress, batch, results)
    finally:
        progress.close()
    summary.total_s = time.perf_counter() - start
    return summary


# ---- on Ray ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    """What the driver needs from a worker's loaded engine to derive the keys the worker will store under."""

    meta: object
    """The engine's `codec.EntryMeta`: fingerprints and KV shape."""
    sink_ids: list[int]
    chunk_limit: int
    builder: object
    """The engine's `layout.PromptBuilder` (its tokenizer and prompt settings)."""
    node: str


class IngestWorker:
    """A Ray actor: one engine over the model, prefilling the chunks it is sent. Built as `ray.remote(IngestWorker)`
    so this module imports without Ray."""

    def __init__(self, model: str | None, store: StoreConfig, threads: int, dtype: str = "auto") -> None:
        # Ray puts the driver's current directory first on a worker's sys.path, so any module in that folder would
        # shadow an installed one of the same name; a worker runs the installed prophet-rag and its dependencies,
        # never code from the driver's folder.
        here = os.getcwd()
        sys.path[:] = [entry for entry in sys.path if entry not in ("", here)]
        self._model, self._store, self._threads, self._dtype = model, store, threads, dtype
        self._engine = None

    def load(self) -> WorkerInfo | str:
        """Load the model (once); its `WorkerInfo`, or the error message of a model or store that fails."""
        import ray
        import torch

        from prophet_rag.engine import ProphetEngine
        from prophet_rag.engine.loading import model_dtype

        # Ray sets OMP_NUM_THREADS from the actor's CPUs; torch's intra-op pool is sized explicitly to match.
        torch.set_num_threads(self._threads)
        try:
            self._engine = ProphetEngine.from_pretrained(self._model, dtype=model_dtype(self._dtype), store=self._store)
        except ProphetRAGError as error:
            return str(error)
        engine = self._engine
        return WorkerInfo(engine.meta, engine.sink_ids.tolist(), chunk_limit(engine), engine.builder,
                          ray.get_runtime_context().get_node_id())

    def compute(self, chunks: list[tuple[str, list[int]]]) -> list[tuple[bool, str | None]]:
        return compute(self._engine.cache, chunks)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def import_ray():
    """The `ray` module, or an IngestError saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from a machine that cannot send them
    try:
        import ray
    except ImportError:
        raise IngestError(f"--ray needs Ray, which is not installed; run `{RAY_INSTALL}` (or `pip install ray`).")\
            from None
    return ray


def connect(ray, address: str | None, num_cpus: int) -> bool:
    """Join the cluster at `address` (or `RAY_ADDRESS`), else start a local instance with `num_cpus` CPUs; True when
    this call started or joined Ray (and so must shut it down), False when Ray was already initialized."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # No dashboard (a web server nobody asked for) and a small object store: only token ids pass through it.
            ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        hint = ("check the address (`ray status` on the head node) and that this machine's Ray version matches the "
                "cluster's" if address else "check free memory and /dev/shm, or pass --address of a running cluster")
        raise IngestError(f"cannot start or join {where}: {error}; {hint}.") from None
    return True


def load_workers(ray, actors: list) -> WorkerInfo:
    """Every worker's `WorkerInfo` checked to agree (same model, tokenizer and layout on every node); the first."""
    from ray.exceptions import GetTimeoutError, RayError

    try:
        infos = ray.get([actor.load.remote() for actor in actors], timeout=LOAD_TIMEOUT_S)
    except GetTimeoutError:
        raise IngestError(
            f"the Ray workers did not load the model within {LOAD_TIMEOUT_S} s; the cluster may lack the CPUs they "
            "reserve (see `ray status`): pass fewer --workers or --cpus-per-worker."
        ) from None
    except RayError as error:
        raise IngestError(f"a Ray worker failed while loading the model: {_message(error)}") from None
    errors = [info for info in infos if isinstance(info, str)]
    if errors:
        raise IngestError(f"a Ray worker could not load the model or open the store: {errors[0]}")
    first = infos[0]
    for info in infos[1:]:
        if info.meta != first.meta:
            raise IngestError(
                f"Ray workers on nodes {first.node} and {info.node} load different models (fingerprints "
                f"{first.meta.model_fp[:12]} and {info.meta.model_fp[:12]}); give every node the same model folder."
            )
    return first


def _message(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def close_workers(ray, actors: list) -> None:
    """Close every worker's engine (its store connections), then end the actors; a dead one is only ended."""
    from ray.exceptions import RayError

    closing = [actor.close.remote() for actor in actors]
    for actor, done in zip(actors, closing, strict=True):
        try:
            ray.get(done, timeout=60)
        except RayError:
            pass
        ray.kill(actor)


def ingest_files_on_ray(files: Sequence[Path], model: str | None, store: StoreConfig, *, dtype: str = "auto",
                        workers: int = 1, address: str | None = None, cpus_per_worker: int | None = None,
                        show_progress: bool | None = None,
                        log: Callable[[str], None] = lambda message: None) -> IngestSummary:
    """Ingest `files` on an actor pool of `workers` engines over `model` (loaded in `dtype`, a `MODEL_DTYPES` name
    or "auto": the loader's default), each writing to the tiers `store` names.

    Without `address` (and `RAY_ADDRESS`) a local instance is started and shut down here; an already initialized Ray
    is used as it is. Each worker reserves `cpus_per_worker` CPUs and runs torch on as many threads (default: this
    machine's CPUs shared among the workers on a local instance, 1 on a cluster)."""
    if workers < 1 or (cpus_per_worker is not None and cpus_per_worker < 1):
        raise IngestError(f"--workers and --cpus-per-worker must be at least 1, got {workers} and {cpus_per_worker}.")
    ray = import_ray()
    start = time.perf_counter()
    local = not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    cpus = cpus_per_worker or (max(1, (os.cpu_count() or 1) // workers) if local else 1)
    started = connect(ray, address, max(os.cpu_count() or 1, workers * cpus))
    available = ray.cluster_resources().get("CPU", 0)
    if workers * cpus > available:
        log(f"warning: {workers} workers x {cpus} CPUs need {workers * cpus} CPUs and the Ray cluster has "
            f"{available:g}; the workers that do not fit wait for CPUs (an autoscaler may add nodes), at most "
            f"{LOAD_TIMEOUT_S} s.")
    actors: list = []
    try:
        worker_class = ray.remote(num_cpus=cpus)(IngestWorker)
        log(f"Loading model {model or 'embedded SmolLM2-135M-Instruct'} on {workers} Ray worker(s) ...")
        actors = [worker_class.remote(model, store, cpus, dtype) for _ in range(workers)]
        summary = ingest_with(ray, actors, load_workers(ray, actors), files, store, show_progress)
    finally:
        close_workers(ray, actors)
        if started:
            ray.shutdown()
    summary.workers = workers
    summary.total_s = time.perf_counter() - start
    return summary


def ingest_with(ray, actors: list, info: WorkerInfo, files: Sequence[Path], store: StoreConfig,
                show_progress: bool | None = False) -> IngestSummary:
    """Plan `files` here against the tiers `store` names, keyed as `info` (the workers' engine) keys them, and send
    the missing chunks to the loaded `actors`."""
    import torch

    from prophet_rag.cache.chunk_cache import ChunkCache, build_tiers

    # The driver's own tiers answer `contains`; it never computes, so the compute hook refuses.
    def no_compute(sink, chunks):
        raise AssertionError("the ingest driver never computes KV")

    cache = ChunkCache(build_tiers(store, meta=info.meta), info.meta, torch.tensor(info.sink_ids), no_compute)
    try:
        return _dispatch(ray, actors, plan(files, info.builder, cache, info.chunk_limit), len(files), show_progress)
    finally:
        cache.close()


def _dispatch(ray, actors: list, planned: Iterator[Planned], total: int, show_progress: bool | None
              ) -> IngestSummary:
    """Send the batches of missing chunks to `actors`, `IN_FLIGHT` per actor, as they free up; collect results.

    A worker that dies fails its batch (reported by file) and leaves the pool; the others carry on."""
    from ray.exceptions import RayActorError, RayError

    summary = IngestSummary(files=total)
    progress = _Progress(total, summary, show_progress)
    free = deque(actor for _ in range(IN_FLIGHT) for actor in actors)
    dead: set = set()
    pending: dict = {}
    work = batches(planned, summary, progress)
    t0 = None
    try:
        while True:
            while free and (batch := next(work, None)) is not None:
                actor = free.popleft()
                t0 = t0 or time.perf_counter()
                summary.sent += len(batch)
                chunks = [(item.ref.key, item.ref.token_ids.tolist()) for item in batch]
                pending[actor.compute.remote(chunks)] = (actor, batch)
            if not pending:
                if len(dead) == len(actors):
                    for batch in work:  # nobody left to compute: the rest fail, by name
                        _finish(summary, progress, batch, [(False, "no Ray worker left (all died)")] * len(batch))
                break
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            actor, batch = pending.pop(ready)
            try:
                results = ray.get(ready)
            except RayError as error:
                reason = f"Ray worker failed: {_message(error)}"
                results = [(False, reason)] * len(batch)
                if isinstance(error, RayActorError):
                    dead.add(actor)
                    free = deque(a for a in free if a is not actor)
            if actor not in dead:
                free.append(actor)
            _finish(summary, progress, batch, results)
    finally:
        progress.close()
    summary.compute_s = time.perf_counter() - t0 if t0 is not None else 0.0
    return summary
