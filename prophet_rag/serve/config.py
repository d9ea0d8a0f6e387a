"""The server's settings: limits, queueing, timeouts and the API key, checked when they are built; and what a process
that serves (a worker, a Ray Serve replica) builds its engine and app from."""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prophet_rag.config import (
    MODEL_DTYPES,
    BatchConfig,
    GenerationConfig,
    PrefixCacheConfig,
    SelectionConfig,
    StoreConfig,
)
from prophet_rag.errors import InvalidRequestError

API_KEY_ENV = "PROPHET_RAG_API_KEY"


def _check_positive(name: str, value: object, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise InvalidRequestError(f"{name} must be a {'number' if kind is float else 'whole number'} > 0, "
                                  f"got {value!r}.")


@dataclass(frozen=True)
class ServeConfig:
    """How `prophet-rag serve` admits and bounds requests.

    `max_in_flight` requests run on the engine at once (its decode steps batch them) and up to `max_queue` more
    wait; a request beyond those is answered 503 at once, as is one still waiting after `queue_timeout_s`. A running
    request is stopped after `request_timeout_s` (queue time included). A request body over `max_body_bytes`, more
    than `max_documents` documents or more than `max_chars` characters of documents and messages together is refused
    before the engine sees it. `max_tokens` is what a request that names no `max_tokens` gets. With `api_key` set,
    every /v1 request must carry it as a bearer token.
    """

    api_key: str | None = field(default=None, repr=False)
    model_name: str | None = None
    """The id /v1/models lists and responses carry (None: the engine's model name)."""
    max_in_flight: int = 8
    max_queue: int = 32
    queue_timeout_s: float = 60.0
    request_timeout_s: float = 600.0
    max_body_bytes: int = 4 * 2**20
    max_documents: int = 64
    max_chars: int = 1_000_000
    max_tokens: int = 256
    retry_after_s: int = 1
    """What a 503's Retry-After header says."""

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_body_bytes", "max_documents", "max_chars", "max_tokens", "retry_after_s"):
            _check_positive(name, getattr(self, name), int)
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise InvalidRequestError(f"max_queue must be a whole number >= 0, got {self.max_queue!r}.")
        for name in ("queue_timeout_s", "request_timeout_s"):
            _check_positive(name, getattr(self, name), float)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise InvalidRequestError("api_key is empty; set a key, or None to serve without one.")
        if self.model_name is not None and (not isinstance(self.model_name, str) or not self.model_name.strip()):
            raise InvalidRequestError(f"model_name must be a non-empty string or None, got {self.model_name!r}.")


def read_api_key(key_file: str | os.PathLike | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer key from `key_file` or the `PROPHET_RAG_API_KEY` variable (one of them, not both); None when
    neither is set. A variable that is set but empty, or an empty file, is refused: the server would otherwise
    start without the protection its operator asked for."""
    env = environ.get(API_KEY_ENV)
    if key_file is not None and env is not None:
        raise InvalidRequestError(f"both --api-key-file and {API_KEY_ENV} are set; set one of them.")
    if env is not None:
        if not env.strip():
            raise InvalidRequestError(f"{API_KEY_ENV} is set but empty; set it to the key or unset it.")
        return env.strip()
    if key_file is None:
        return None
    path = Path(key_file).expanduser()
    try:
        key = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"cannot read the API key file {path}: {error}.") from None
    if not key:
        raise InvalidRequestError(f"the API key file {path} is empty; write the key into it.")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(f"the API key file {path} is readable by other users; `chmod 600 {path}`.", stacklevel=2)
    return key


@dataclass(frozen=True)
class ReplicaSpec:
    """What every engine process of a server (a `--workers` process, a Ray Serve replica) builds its engine and app
    from; it travels to them whole, so the API key goes with it."""

    model: str | None
    device: str
    store: StoreConfig
    selection: SelectionConfig
    generation: GenerationConfig
    serve: ServeConfig
    threads: int = 1
    """torch threads of each process (its CPUs)."""
    batch: BatchConfig = BatchConfig()
    prefix_cache: PrefixCacheConfig = PrefixCacheConfig()
    dtype: str = "auto"
    """the model's dtype, a `MODEL_DTYPES` name, or "auto": the loader's default (fp32 on a CPU, bf16 on CUDA)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *MODEL_DTYPES):
            raise InvalidRequestError(f"dtype {self.dtype!r} is not one the model can be loaded in; pass one of "
                                      f"{', '.join(('auto', *MODEL_DTYPES))}.")

    def build_engine(self, store: StoreConfig | None = None):
        """The process's engine on `threads` torch threads, over `store` (default: the spec's)."""
        import torch

        from prophet_rag.engine import ProphetEngine
        from prophet_rag.engine.loading import model_dtype

        torch.set_num_threads(self.threads)
        return ProphetEngine.from_pretrained(self.model, device=self.device, dtype=model_dtype(self.dtype),
                                             store=store or self.store,
                                             selection=self.selection, generation=self.generation, batch=self.batch,
                                             prefix_cache=self.prefix_cache)
