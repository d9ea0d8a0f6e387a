"""The exception hierarchy raised at prophet-rag's public boundary.

Every message says what was expected, what was received and what to do about it.
"""


class ProphetRAGError(Exception):
    """Base class of every error prophet-rag raises on purpose."""


class UnsupportedModelError(ProphetRAGError):
    """The model cannot be run correctly by the engine (raised when the engine is built)."""


class ModelLoadError(ProphetRAGError):
    """A model or its tokenizer cannot be loaded from where it was named."""


class InvalidRequestError(ProphetRAGError, ValueError):
    """A request or configuration value is malformed (empty chunk list, bad ratio, unknown method, ...)."""


class ContextWindowError(InvalidRequestError):
    """A request or a chunk does not fit the model's context window."""


class StoreError(ProphetRAGError):
    """The KV store cannot be opened or used (for example, its directory is not writable)."""


class CacheCorruptionError(StoreError):
    """A stored entry failed its checksum, header or shape checks. The engine recomputes such entries."""


class IncompatibleCacheError(StoreError):
    """A stored entry was written for another model, tokenizer, layout or format version."""


class UnauthenticatedEntryError(CacheCorruptionError):
    """A stored entry's MAC did not verify with the store's key: it was written without the key, with another key,
    or altered since. Such an entry is never used."""
