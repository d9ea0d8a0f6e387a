"""A client for a running `prophet-rag serve`, with the surface the framework adapters use from an engine.

`ProphetClient(base_url, api_key)` answers `stream_chat(messages, documents, selection=..., generation=...)` the way
`ProphetEngine.stream_chat` does, over HTTP: the messages keep the place of the documents as a
`{"type": "documents"}` content part and the documents travel in the body's `documents` field, never flattened into
the prompt, so the server lays out exactly the request an in-process engine would. The answer streams back as
server-sent events; the returned `AnswerStream` yields the text deltas and then holds an `Answer` whose statistics
are the server's (`RequestStats`: cache hits per request, cached and recomputed tokens, TTFT). The generated token ids
and recomputed positions do not travel: `Answer.token_ids` is empty and `recomputed_positions` has no rows.
`model_name`, `context_window`, `token_ids(text)` and `count_chat_tokens(messages)` come from the server, so token
counts are the served model's own.

Tools and grammars travel too: `stream_chat(..., tools=, tool_choice=, grammar=)` sends the tools and the grammar
(built here with the served model's `tool_format`, listed by the server) and asks for the answer's text as the model
wrote it (`parse_tool_calls: false`), so `tool_format.parse` splits out the calls as it does in process. One-off
text (`transient` documents, `transient_prefix`) is marked so, and the server computes it without storing it.

Differences from an in-process engine: `eos_token_ids` cannot be sent; roles are those the server takes (system,
developer, user, assistant, tool).

Errors: a request the server refuses raises what the engine would (`InvalidRequestError`, `ContextWindowError`); a
missing or wrong key `ServerAuthenticationError`; a server that cannot be reached, is overloaded (503, 429), or a
replica that went away behind a proxy, `ServerUnavailableError` (retryable). Such a call is retried up to
`max_retries` times before its first text arrives (after the server's Retry-After, or a short back-off); a
connection that breaks later raises `ServerUnavailableError`, since text has already been handed on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import torch

from prophet_rag.config import GenerationConfig, SelectionConfig
from prophet_rag.engine import AnswerStream
from prophet_rag.errors import (
    ContextWindowError,
    InvalidRequestError,
    ProphetRAGError,
    ServerAuthenticationError,
    ServerError,
    ServerUnavailableError,
)
from prophet_rag.layout import DOCUMENTS
from prophet_rag.results import Answer, RequestStats
from prophet_rag.structured import Grammar, Tool, ToolCall, ToolFormat, as_tools

CLIENT_INSTALL = "pip install 'prophet-rag[client]'"
_STATS = tuple(field.name for field in fields(RequestStats))
_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)


def _httpx():
    try:
        import httpx
    except ImportError:
        raise ProphetRAGError(f"talking to a prophet-rag server needs httpx; run `{CLIENT_INSTALL}`.") from None
    return httpx


def _check_url(base_url: object) -> str:
    parts = urlsplit(base_url) if isinstance(base_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequestError(f"base_url must be the server's http(s) URL ending in /v1, such as "
                                  f"'http://127.0.0.1:8000/v1', got {base_url!r}.")
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _wire_message(message: Mapping) -> dict[str, Any]:
    """An engine message as the server takes it: documents' place as a content part, calls in OpenAI's shape."""
    content = message.get("content")
    wire: dict[str, Any] = {"role": message["role"], "content": content if content is None or isinstance(
        content, str) else [{"type": "documents"} if part is DOCUMENTS else {"type": "text", "text": part}
                            for part in content]}
    if message.get("tool_calls"):
        wire["tool_calls"] = [_wire_call(call) for call in message["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if message.get(key) is not None:
            wire[key] = message[key]
    return wire


def _wire_call(call: ToolCall | Mapping) -> Mapping:
    if isinstance(call, ToolCall):
        return {"id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return call


def _error_message(response) -> tuple[str, str | None, str | None]:
    """(message, code, type) of an error response: OpenAI's shape from the server, anything else from a proxy."""
    try:
        error = response.json()["error"]
        return str(error["message"]), error.get("code"), error.get("type")
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200] or response.reason_phrase, None, None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _raise_for(status: int, message: str, code: str | None, kind: str | None, where: str,
               retry_after_s: float | None = None) -> None:
    """The package's exception for an error answer, with what to do about it."""
    if status == 400 or status == 413:
        raise (ContextWindowError if code == "context_length_exceeded" else InvalidRequestError)(message)
    if status == 401:
        raise ServerAuthenticationError(f"{where} refused the API key ({message}); pass the key the server was "
                                        "started with (its PROPHET_RAG_API_KEY or --api-key-file) as api_key.", status)
    if status == 404:
        raise ServerError(f"{where} has no such route ({message}); base_url must be a prophet-rag server's /v1 URL.",
                          status)
    if status in (429, 503) or (status >= 500 and kind is None and status != 504):
        # A 5xx that is not the server's own answer comes from a proxy in front of it (a replica went away).
        raise ServerUnavailableError(f"{where} is unavailable ({status}: {message}); retry the call later.", status,
                                     retry_after_s)
    raise ServerError(f"{where} failed the call ({status}: {message}).", status)


class ProphetClient:
    """A `prophet-rag serve` server at `base_url` (its /v1 URL; /v1 is added when missing), seen as an engine.

    The server is asked for its model when the client is built, so a wrong URL or key fails at once. `timeout_s`
    bounds each call (connecting: at most 10 s of it); `max_retries` retries a call the server could not take
    (see the module docstring). `selection` and `generation` are the defaults a call's configs start from, as an
    engine's are; only what the wire carries is sent (method, ratio, max_tokens, temperature, stop, top_k, top_p,
    seed). Safe to share between threads.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 600.0, max_retries: int = 2,
                 selection: SelectionConfig | None = None, generation: GenerationConfig | None = None) -> None:
        httpx = _httpx()
        self.base_url = _check_url(base_url)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise InvalidRequestError(f"timeout must be a number of seconds > 0, got {timeout_s!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidRequestError(f"max_retries must be a whole number >= 0, got {max_retries!r}.")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise InvalidRequestError("api_key is empty; pass the server's key, or None for a server without one.")
        self.max_retries = max_retries
        self.selection = selection or SelectionConfig()
        self.generation = generation or GenerationConfig()
        headers = {"Authorization": f"Bearer {api_key.strip()}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))
        self._where = f"the prophet-rag server at {self.base_url}"
        model = self._json("GET", "/models")["data"][0]
        self.model_name: str = model["id"]
        self.context_window: int = int(model["max_model_len"])
        listed = model.get("prophet_rag", {}).get("tool_format")
        self._tool_format = ToolFormat(**listed) if listed else None
        self._token_ids = lru_cache(maxsize=4096)(self._tokenize_text)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ProphetClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the engine's surface ---------------------------------------------------------------------------------

    @property
    def tool_format(self) -> ToolFormat:
        """The served model's tool-call format (`ProphetEngine.tool_format`)."""
        if self._tool_format is None:
            raise InvalidRequestError(f"{self._where} serves a backend without tools (`--backend hf`); serve the "
                                      "prophet-rag engine to call tools.")
        return self._tool_format

    def stream_chat(self, messages: Sequence[Mapping], documents: Sequence[str] = (), *,
                    transient: Sequence[bool] = (), transient_prefix: bool = False,
                    selection: SelectionConfig | None = None, generation: GenerationConfig | None = None,
                    grammar: Grammar | None = None, tools: Sequence[Tool | Mapping] = (),
                    tool_choice: object = None) -> AnswerStream:
        """Start answering on the server, as `ProphetEngine.stream_chat` does in process; a refused request raises
        here, before any text."""
        body = self._body(messages, documents, selection or self.selection, generation or self.generation)
        if transient_prefix:
            body["transient_prefix"] = True
        if any(transient):
            body["documents"] = [{"text": text, "transient": bool(one_off)}
                                 for text, one_off in zip(documents, transient, strict=True)]
        if tools:
            body.update(tools=[t.openai() for t in as_tools(tools)], parse_tool_calls=False)
            if tool_choice is not None and grammar is None:
                body["tool_choice"] = tool_choice
        if grammar is not None:
            if not isinstance(grammar, Grammar):
                raise InvalidRequestError(f"grammar must be a structured.Grammar, got {type(grammar).__name__}.")
            body["grammar"] = {"kind": grammar.kind, "source": grammar.source}
        response = self._with_retries(lambda: self._send("POST", "/chat/completions", body, stream=True))
        return AnswerStream(self._events(response))

    def token_ids(self, text: str) -> list[int]:
        """`text`'s ids in the served model's tokenizer, as the engine tokenizes message contents."""
        return list(self._token_ids(text))

    def count_chat_tokens(self, messages: Sequence[Mapping]) -> int:
        """How many tokens `messages` take once rendered with the served model's chat template."""
        wire = [_wire_message(m) for m in messages]
        return int(self._json("POST", "/tokenize", {"messages": wire})["count"])

    # ---- HTTP -------------------------------------------------------------------------------------------------

    def _tokenize_text(self, text: str) -> tuple[int, ...]:
        return tuple(self._json("POST", "/tokenize", {"prompt": text})["tokens"])

    def _body(self, messages: Sequence[Mapping], documents: Sequence[str], selection: SelectionConfig,
              generation: GenerationConfig) -> dict[str, Any]:
        if generation.eos_token_ids is not None:
            raise InvalidRequestError("eos_token_ids cannot be sent to a prophet-rag server (the server's model "
                                      "decides its end tokens); drop it, or use stop strings.")
        body: dict[str, Any] = {
            "model": self.model_name, "stream": True, "stream_options": {"include_usage": True},
            "messages": [_wire_message(m) for m in messages],
            "method": selection.method, "ratio": selection.ratio, "max_tokens": generation.max_new_tokens,
            "temperature": generation.temperature, "stop": list(generation.stop),
        }
        if documents:
            body["documents"] = list(documents)
        defaults = GenerationConfig()
        for name in ("top_k", "top_p", "seed"):
            if getattr(generation, name) != getattr(defaults, name):
                body[name] = getattr(generation, name)
        return body

    def _with_retries(self, call):
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except ServerUnavailableError as error:
                if attempt == self.max_retries:
                    raise
                time.sleep(error.retry_after_s if error.retry_after_s is not None
                           else _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _send(self, method: str, path: str, body: dict | None, stream: bool):
        httpx = _httpx()
        try:
            request = self._http.build_request(method, path, json=body)
            response = self._http.send(request, stream=stream)
        except httpx.TimeoutException as error:
            raise ServerUnavailableError(f"{self._where} did not answer in time ({type(error).__name__}); retry, or "
                                         "raise timeout.") from None
        except httpx.TransportError as error:
            raise ServerUnavailableError(f"cannot reach {self._where} ({type(error).__name__}: {error}); is "
                                         "`prophet-rag serve` running there?") from None
        if response.status_code >= 400:
            if stream:
                response.read()
                response.close()
            _raise_for(response.status_code, *_error_message(response), self._where,
                       _retry_after(response.headers))
        return response

    def _json(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        response = self._with_retries(lambda: self._send(method, path, body, stream=False))
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"{self._where} answered {path} with something other than JSON; base_url must be a "
                              "prophet-rag server's /v1 URL.") from None

    def _events(self, response) -> Iterator[str]:
        """The text deltas of an opened answer; returns its `Answer`. Closing the generator closes the connection,
        which cancels the request on the server."""
        httpx = _httpx()
        text, stats = [], None
        try:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    status = {"timeout": 504, "overloaded": 503}.get(error.get("code"), 500)
                    _raise_for(status, error.get("message", ""), error.get("code"), error.get("type", "server_error"),
                               self._where)
                stats = event.get("prophet_rag", stats)
                for choice in event.get("choices", ()):
                    delta = choice["delta"].get("content")
                    if delta:
                        text.append(delta)
                        yield delta
        except httpx.TransportError as error:
            raise ServerUnavailableError(f"the connection to {self._where} broke after {len(text)} text deltas "
                                         f"({type(error).__name__}); retry the call.") from None
        finally:
            response.close()
        if stats is None:
            raise ServerUnavailableError(f"{self._where} ended the answer without its statistics (after "
                                         f"{len(text)} text deltas); retry the call.")
        return Answer("".join(text), (), RequestStats(**{name: stats[name] for name in _STATS}),
                      torch.zeros(0, dtype=torch.long))
