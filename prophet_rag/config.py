"""Typed, frozen configuration, validated where it is built.

`SelectionConfig` says which context tokens are recomputed, `GenerationConfig` how the answer is decoded,
`PromptConfig` how a request is laid out and `StoreConfig` where chunk KV caches live.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

from prophet_rag.errors import InvalidRequestError

DEFAULT_INSTRUCTION = (
    "Answer the question using the documents below. Only give the answer and do not output any other words."
)


def __getattr__(name: str):
    # The method names live in the selector registry, which imports torch; `import prophet_rag` must stay light.
    if name == "METHODS":
        from prophet_rag.selectors import METHODS

        return METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_number(value: object) -> bool:
    # bool is an int to Python, never a sensible count or ratio here.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: object, minimum: int, hint: str) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise InvalidRequestError(f"{name} must be an integer >= {minimum}{hint}, got {value!r}.")


def _check_ratio(name: str, value: float) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise InvalidRequestError(
            f"{name} must be a number in [0, 1], got {value!r}; 0.2 recomputes 20% of the context."
        )


def _strings(name: str, value: object) -> tuple[str, ...]:
    """`value` as a tuple of non-empty strings; a single string is one string, not its characters."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (tuple, list)) or not all(isinstance(s, str) and s for s in items):
        raise InvalidRequestError(f"{name} must be a string or a list of non-empty strings, got {value!r}.")
    return tuple(items)


@dataclass(frozen=True)
class SelectionConfig:
    """Which context tokens are recomputed for a request.

    `ratio` is the share of eligible context tokens (chunks only; the exact prefix and the fresh suffix never count)
    that is recomputed: the budget is `floor(ratio * eligible)`.
    """

    method: str = "prophet_focus"
    ratio: float = 0.2
    cacheblend_check_layer: int = 1
    infoflow_layers: tuple[int, ...] | None = None
    reorder_chunks: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        from prophet_rag.selectors import REGISTRY

        if self.method not in REGISTRY:
            raise InvalidRequestError(f"unknown method {self.method!r}; choose one of {', '.join(REGISTRY)}.")
        _check_ratio("ratio", self.ratio)
        _check_int("cacheblend_check_layer", self.cacheblend_check_layer, 1, " (layer 0 is always recomputed)")
        layers = self.infoflow_layers
        if layers is not None:
            if not isinstance(layers, (tuple, list)) or not layers or not all(
                    isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0 for x in layers):
                raise InvalidRequestError(
                    f"infoflow_layers must be a non-empty tuple of layer indices >= 0, got {layers!r}."
                )
            object.__setattr__(self, "infoflow_layers", tuple(int(x) for x in layers))
        if not isinstance(self.reorder_chunks, bool):
            raise InvalidRequestError(f"reorder_chunks must be True or False, got {self.reorder_chunks!r}.")
        _check_int("seed", self.seed, 0, "")


@dataclass(frozen=True)
class GenerationConfig:
    """How the answer is decoded. `temperature=0` is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, "")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}.")
        _check_int("top_k", self.top_k, 0, " (0 disables it)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}.")
        object.__setattr__(self, "stop", _strings("stop", self.stop))
        if self.eos_token_ids is not None:
            ids = self.eos_token_ids
            if not isinstance(ids, (tuple, list)) or not all(
                    isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
                raise InvalidRequestError(f"eos_token_ids must be a tuple of token ids, got {ids!r}.")
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in ids))
        if self.seed is not None:
            _check_int("seed", self.seed, 0, " (or None)")


@dataclass(frozen=True)
class PromptConfig:
    """How a request `prefix | chunk_1 ... chunk_m | suffix` is laid out.

    The prefix is the chat template's start, the system prompt and `instruction`; each chunk is a document followed
    by `chunk_separator`; the suffix is `question_template` filled with the query, the template's end and the
    assistant start. `system_prompt=None` keeps the chat template's own default.
    """

    system_prompt: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    chunk_separator: str = "\n\n"
    question_template: str = "Question: {query}"

    def __post_init__(self) -> None:
        for name in ("instruction", "chunk_separator", "question_template"):
            if not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"{name} must be a string, got {getattr(self, name)!r}.")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise InvalidRequestError(f"system_prompt must be a string or None, got {self.system_prompt!r}.")
        if "{query}" not in self.question_template:
            raise InvalidRequestError(
                f"question_template must contain '{{query}}', got {self.question_template!r}."
            )


@dataclass(frozen=True)
class StoreConfig:
    """Where chunk KV caches are kept: a diskcache directory bounded by `size_limit_bytes` (LRU eviction).

    `kv_storage` compacts stored KV: "lossless" (default) keeps it as computed; "bfloat16" halves an fp32 model's
    entries; "float8_e4m3" (fp8 with one scale per layer, K/V and head) halves a bf16/fp16 model's. Compact entries
    have their own keys, so they never mix with lossless ones.

    An authentication key (`auth_key_file`, a file of at least 32 random bytes, or `auth_key_env`, the name of an
    environment variable holding them) makes every entry carry a keyed BLAKE3 MAC, and entries without a valid one
    are never used: required for a store that other machines or users can write. Without a key, entries carry an
    XXH3 checksum, which catches corruption but not forgery (see README, "The store").
    """

    directory: Path = field(default_factory=lambda: default_store_dir())
    size_limit_bytes: int = 8 * 2**30
    max_entry_bytes: int = 2 * 2**30
    eviction_policy: str = "least-recently-used"
    kv_storage: str = "lossless"
    auth_key_file: Path | None = None
    auth_key_env: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", _store_path("directory", self.directory))
        _check_int("size_limit_bytes", self.size_limit_bytes, 1, " (bytes)")
        _check_int("max_entry_bytes", self.max_entry_bytes, 1, " (bytes)")
        if self.max_entry_bytes > self.size_limit_bytes:
            raise InvalidRequestError(
                f"max_entry_bytes must be in (0, size_limit_bytes={self.size_limit_bytes}], got {self.max_entry_bytes}."
            )
        policies = ("least-recently-used", "least-recently-stored", "least-frequently-used")
        if self.eviction_policy not in policies:
            raise InvalidRequestError(f"eviction_policy must be one of {policies}, got {self.eviction_policy!r}.")
        from prophet_rag.keys import STORAGES

        if self.kv_storage not in STORAGES:
            raise InvalidRequestError(f"kv_storage must be one of {STORAGES}, got {self.kv_storage!r}.")
        if self.auth_key_file is not None and self.auth_key_env is not None:
            raise InvalidRequestError("set one of auth_key_file and auth_key_env, not both.")
        if self.auth_key_file is not None:
            object.__setattr__(self, "auth_key_file", _store_path("auth_key_file", self.auth_key_file))
        if self.auth_key_env is not None and (
            not isinstance(self.auth_key_env, str) or not self.auth_key_env.isidentifier()
        ):
            raise InvalidRequestError(
                f"auth_key_env must name an environment variable (letters, digits, _), got {self.auth_key_env!r}."
            )


def _store_path(name: str, value: object) -> Path:
    """`value` as an absolute path, with `~` expanded; a malformed one raises naming the fix."""
    if not isinstance(value, (str, Path)):
        raise InvalidRequestError(f"{name} must be a path (str or Path), got {type(value).__name__}.")
    text = str(value)
    if not text or "\x00" in text:
        raise InvalidRequestError(f"{name} {text!r} is empty or holds a NUL byte; pass a folder path.")
    path = Path(os.path.expanduser(text))  # Path.expanduser raises a bare RuntimeError for an unknown user
    if str(path).startswith("~"):
        raise InvalidRequestError(
            f"{name} {text!r} starts with '~' but names no known user's home; use an absolute path."
        )
    return path.absolute()


def cache_home() -> Path:
    """Root of prophet-rag's local caches: `$PROPHET_RAG_HOME` (when set and not empty), else `~/.cache/prophet_rag`.
    A `~user` that names no user is left as is, for `StoreConfig` to refuse with the fix."""
    return Path(os.path.expanduser(os.environ.get("PROPHET_RAG_HOME") or "~/.cache/prophet_rag"))


def default_store_dir() -> Path:
    return cache_home() / "kv"
