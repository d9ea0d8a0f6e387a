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


class ServerError(ProphetRAGError):
    """A `prophet-rag serve` server (or the proxy in front of it) could not answer a client's call. `retryable` says
    whether the same call may succeed later or on another replica; `status` is the HTTP status (None: no answer)."""

    retryable = False

    def __init__(self, message: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


class ServerUnavailableError(ServerError):
    """Retryable: the server cannot be reached, is overloaded (503, 429) or shutting down, a replica went away
    behind its proxy, or the connection broke mid-answer. Retry the call (after `retry_after_s` when given)."""

    retryable = True


class ServerAuthenticationError(ServerError):
    """The server wants an API key and the call carried none or another (401): pass the server's key as api_key."""


class OverloadedError(ProphetRAGError):
    """More requests than the engine or the server admits at once (every place taken and the waiting line full, or a
    request waited past its time): retry later, or raise the limits (`BatchConfig`, `ServeConfig`)."""
