"""prophet-rag: fast RAG by reusing per-document KV caches and recomputing only the query-relevant tokens.

    from prophet_rag import ProphetEngine
    engine = ProphetEngine.from_pretrained()            # the embedded SmolLM2-135M-Instruct
    answer = engine.answer(documents, "question?")      # ProphetKV, 20% of the context recomputed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prophet_rag.config import (
    BatchConfig,
    GenerationConfig,
    PrefixCacheConfig,
    PromptConfig,
    SelectionConfig,
    StoreConfig,
)
from prophet_rag.errors import (
    CacheCorruptionError,
    ContextWindowError,
    IncompatibleCacheError,
    InvalidRequestError,
    ModelLoadError,
    OverloadedError,
    ProphetRAGError,
    StoreError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from prophet_rag.cache.store import KVStore as KVStore
    from prophet_rag.engine import AnswerStream as AnswerStream
    from prophet_rag.engine import ProphetEngine as ProphetEngine
    from prophet_rag.layout import DOCUMENTS as DOCUMENTS
    from prophet_rag.layout import PlacedDocuments as PlacedDocuments
    from prophet_rag.methods import METHODS as METHODS
    from prophet_rag.results import Answer as Answer
    from prophet_rag.results import RequestStats as RequestStats

__version__ = "0.1.0"

# torch and transformers load on first use of these names, so `import prophet_rag` (and the CLI's --help) stays fast.
_LAZY = {
    "ProphetEngine": "prophet_rag.engine",
    "AnswerStream": "prophet_rag.engine",
    "Answer": "prophet_rag.results",
    "RequestStats": "prophet_rag.results",
    "KVStore": "prophet_rag.cache.store",
    "METHODS": "prophet_rag.methods",
    "DOCUMENTS": "prophet_rag.layout",
    "PlacedDocuments": "prophet_rag.layout",
}

__all__ = [
    "BatchConfig", "GenerationConfig", "PrefixCacheConfig", "PromptConfig", "SelectionConfig", "StoreConfig",
    "CacheCorruptionError", "ContextWindowError", "IncompatibleCacheError", "InvalidRequestError", "ModelLoadError",
    "OverloadedError", "ProphetRAGError", "StoreError",
    "UnsupportedModelError", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prophet_rag' has no attribute {name!r}")
