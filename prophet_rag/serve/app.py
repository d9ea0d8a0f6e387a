"""The HTTP app: OpenAI's chat-completions API over one engine, with health, model list and Prometheus metrics.

Routes: `GET /health` (200 while the app serves: the model is loaded before it starts), `GET /v1/models` (with
the context window as `max_model_len`, as vLLM lists it), `POST /v1/chat/completions` (openai_api.py;
`"stream": true` answers server-sent events ending `data: [DONE]`), `POST /v1/tokenize` (the served model's token
ids of a text or of chat messages, vLLM's shape: what the client helpers count tokens with) and `GET /metrics`.
With an API key configured, every /v1 route needs `Authorization: Bearer <key>` (401 otherwise);
/health and /metrics stay open for probes and scrapers, and tell nothing about any request's content.

The handler reads the body within `max_body_bytes` (413 past it), parses it (400), and submits it to the scheduler
(503 with Retry-After when full). It waits for a worker to start it, up to `queue_timeout_s` (503 after), and for
its text, up to `request_timeout_s` overall (504; a stream ends with an error event instead). A client that goes
away, while its request waits or while it generates, cancels it: its queue place or its worker is freed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from prophet_rag.errors import ContextWindowError, InvalidRequestError, OverloadedError
from prophet_rag.serve import openai_api as api
from prophet_rag.serve.config import ServeConfig
from prophet_rag.serve.metrics import Metrics
from prophet_rag.serve.scheduler import Job, Scheduler
from prophet_rag.structured.stream import ToolCallStream

log = logging.getLogger(__name__)

CHAT, MODELS, TOKENIZE = "/v1/chat/completions", "/v1/models", "/v1/tokenize"
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first; only metrics see it


class _ClientGone(Exception):
    pass


def name_responses(app: FastAPI, headers: dict[str, str]) -> None:
    """Every response of `app` carries `headers`: which process answered (a Ray replica, a `--workers` process)."""

    @app.middleware("http")
    async def named(request, call_next):
        response = await call_next(request)
        response.headers.update(headers)
        return response


def create_app(engine, config: ServeConfig | None = None, scheduler: Scheduler | None = None,
               owns_engine: bool = False) -> FastAPI:
    """The app serving `engine`. It owns `scheduler` (default: a `Scheduler` sized by `config`) and closes it on
    shutdown; the engine stays the caller's unless `owns_engine` (a worker process's app closes its engine too)."""
    config = config or ServeConfig()
    scheduler = scheduler or Scheduler(engine, max_in_flight=config.max_in_flight, max_queue=config.max_queue)
    metrics = Metrics(engine, scheduler)
    model_name = config.model_name or engine.model_name
    created = int(time.time())
    expected = config.api_key.encode() if config.api_key else None
    tool_format = getattr(engine, "tool_format", None)  # None: a backend without tools (`--backend hf`)
    listing = {"id": model_name, "object": "model", "created": created, "owned_by": "prophet-rag",
               "max_model_len": engine.context_window}
    if tool_format is not None:  # what a ProphetClient parses calls with (see openai_api: parse_tool_calls)
        listing["prophet_rag"] = {"tool_format": asdict(tool_format)}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(scheduler.close)
        if owns_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="prophet-rag", summary="OpenAI-compatible chat completions with KV reuse of documents",
                  lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def refuse(path: str, error: api.APIError) -> JSONResponse:
        # Any other path counts as one label value: a client must not be able to mint metric series.
        endpoint = path if path in (CHAT, MODELS, TOKENIZE) else "other"
        metrics.requests.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(api.APIError)
    async def api_error(request: Request, error: api.APIError) -> JSONResponse:
        return refuse(request.url.path, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        # Unknown routes and wrong methods, in OpenAI's shape too.
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return refuse(request.url.path, api.APIError(error.status_code, f"{request.method} {request.url.path}: "
                                                     f"{error.detail}", type=kind, headers=error.headers))

    def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the first difference is, so timing tells nothing of the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise api.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key "
                               "this server was started with.", type="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def scrape() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(MODELS)
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        metrics.requests.labels(MODELS, "200").inc()
        return {"object": "list", "data": [listing]}

    @app.post(TOKENIZE)
    async def tokenize(request: Request) -> dict[str, Any]:
        authorize(request)
        raw = await _read_body(request, config.max_body_bytes)
        try:
            ids = await asyncio.to_thread(api.tokenize, raw, engine.builder)
        except InvalidRequestError as error:
            raise api.bad_request(str(error)) from None
        metrics.requests.labels(TOKENIZE, "200").inc()
        return {"count": len(ids), "max_model_len": engine.context_window, "tokens": ids}

    @app.post(CHAT)
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        authorize(request)
        raw = await _read_body(request, config.max_body_bytes)
        try:
            call = api.parse_chat_body(raw, engine.generation, config, engine.builder.rag_messages, tool_format)
        except InvalidRequestError as error:
            raise api.bad_request(str(error)) from None
        job = _submit(scheduler, call.request, config)
        waited = _overloaded(f"overloaded: the request waited {config.queue_timeout_s:g} s for a worker; retry "
                             "later.", config)
        try:
            await _until(job.started(), request, config.queue_timeout_s, waited)
            metrics.queue_wait.observe(time.perf_counter() - arrived)
            cid = api.completion_id()
            if call.stream:
                # The background task runs however the response ends, even if the stream never started.
                return StreamingResponse(_events(job, call, cid, model_name, arrived, config, metrics),
                                         media_type="text/event-stream", background=BackgroundTask(job.cancel),
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            left = config.request_timeout_s - (time.perf_counter() - arrived)
            await _until(_drain(job), request, left, _timed_out(config))
        except _ClientGone:
            job.cancel()
            metrics.requests.labels(CHAT, str(CLIENT_GONE)).inc()
            return Response(status_code=CLIENT_GONE)
        except BaseException as error:
            job.cancel()
            if isinstance(error, Exception) and not isinstance(error, api.APIError):
                raise _engine_error(error, config) from None
            raise
        _observe(metrics, job, arrived)
        metrics.requests.labels(CHAT, "200").inc()
        return JSONResponse(api.completion(cid, model_name, job.answer, call))

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:  # a chunked body declares no length: count it as it arrives
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> api.APIError:
    return api.APIError(413, f"the request body is over this server's limit of {limit} bytes; send fewer or shorter "
                        "documents.", code="request_too_large")


def _overloaded(message: str, config: ServeConfig) -> api.APIError:
    return api.APIError(503, message, type="server_error", code="overloaded",
                        headers={"Retry-After": str(config.retry_after_s)})


def _submit(scheduler: Scheduler, request, config: ServeConfig) -> Job:
    try:
        return scheduler.submit(request)
    except OverloadedError as error:
        raise _overloaded(f"overloaded: {error}", config) from None


async def _until(work: Awaitable, request: Request, timeout_s: float, late: api.APIError):
    """`work`'s result; raises `_ClientGone` if the client disconnects first, and `late` once `timeout_s` has
    passed."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=max(timeout_s, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    if gone in done:
        raise _ClientGone()
    raise late


def _timed_out(config: ServeConfig) -> api.APIError:
    return api.APIError(504, f"the request ran past this server's limit of {config.request_timeout_s:g} s; ask for "
                        "fewer tokens.", type="server_error", code="timeout")


def _engine_error(error: Exception, config: ServeConfig) -> api.APIError:
    if isinstance(error, ContextWindowError):
        return api.bad_request(str(error), "messages", "context_length_exceeded")
    if isinstance(error, InvalidRequestError):
        return api.bad_request(str(error))
    if isinstance(error, OverloadedError):  # the scheduler closed while the request waited, or the engine is full
        return _overloaded(f"overloaded: {error}", config)
    log.error("request failed", exc_info=error)
    return api.APIError(500, f"the engine failed on this request ({type(error).__name__}); see the server's log.",
                        type="server_error")


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so all that can still arrive is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _drain(job: Job) -> None:
    async for _ in job:
        pass


def _observe(metrics: Metrics, job: Job, arrived: float) -> None:
    if job.first_output_at is not None:
        metrics.ttft.observe(job.first_output_at - arrived)
    metrics.latency.observe(time.perf_counter() - arrived)
    metrics.finished(job.answer.stats)


async def _events(job: Job, call: api.ChatCall, cid: str, model: str, arrived: float, config: ServeConfig,
                  metrics: Metrics) -> AsyncIterator[str]:
    """The SSE stream of a started job. When the client disconnects, Starlette cancels this generator where it
    waits, and `finally` cancels the job."""
    created = int(time.time())
    usage = call.include_usage
    status = CLIENT_GONE  # unless the stream reaches an end of its own
    calls = ToolCallStream(call.tool_format) if call.tool_format is not None else None
    called = False
    try:
        yield api.chunk(cid, created, model, {"role": "assistant", "content": ""}, include_usage=usage)
        async with asyncio.timeout(config.request_timeout_s - (time.perf_counter() - arrived)):
            async for delta in job:
                for piece in api.stream_deltas(calls.feed(delta)) if calls else ({"content": delta},):
                    yield api.chunk(cid, created, model, piece, include_usage=usage)
        if calls is not None:
            events, parsed = calls.finish(call.request.tools)
            called = bool(parsed.tool_calls)
            for piece in api.stream_deltas(events):
                yield api.chunk(cid, created, model, piece, include_usage=usage)
        _observe(metrics, job, arrived)
        finish = api.finish_reason(job.answer, call.request.generation, called)
        yield api.chunk(cid, created, model, {}, finish, include_usage=usage, answer=job.answer)
        if usage:
            yield api.chunk(cid, created, model, None, include_usage=True, answer=job.answer)
        status = 200
        yield api.DONE
    except Exception as error:  # the headers are sent: the error travels as an event, as OpenAI's streams carry it
        failure = _timed_out(config) if isinstance(error, TimeoutError) else _engine_error(error, config)
        status = failure.status
        yield api.event(failure.body())
    finally:
        job.cancel()
        metrics.requests.labels(CHAT, str(status)).inc()
