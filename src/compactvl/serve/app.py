"""The FastAPI application: ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE), ``GET /health``.

Every refusal is an OpenAI-style JSON error (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status;
an unexpected failure is a 500 with the same shape and no traceback (the traceback goes to the server log). The
limits that need no model (request bytes, image bytes, pixels, image count, max_tokens ceiling, allowed compression
methods) are checked while parsing, the context length before queueing, all of them before any decoding.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CompactVLError
from ..model import CompactVLM
from .engine import Engine, Job, Result
from .protocol import ApiError, parse_chat_request
from .settings import ServeSettings

log = logging.getLogger("compactvl.serve")
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there


def build_app(model: CompactVLM, settings: ServeSettings) -> FastAPI:
    """The app serving ``model``; its batcher (``app.state.engine``) starts now and stops, after decoding what is
    queued, when the app shuts down."""
    engine = Engine(model, settings)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.close)  # uvicorn has let in-flight requests finish; drain and stop

    app = FastAPI(title="compactvl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(CompactVLError)
    async def input_error(request: Request, e: CompactVLError) -> JSONResponse:  # e.g. an empty user turn
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.error("request failed", exc_info=e)
        body = ApiError(500, f"internal error ({type(e).__name__}); see the server log", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": engine.queued, "decoding": engine.active}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "compactvl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, settings.max_request_bytes)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from e
        chat = await run_in_threadpool(parse_chat_request, data, settings, model.config.image_token)
        variant = engine.variant_for(chat.compression)
        max_tokens = await run_in_threadpool(engine.max_tokens_for, chat)
        job = engine.submit(chat, variant, max_tokens)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if job.events is not None:  # live: wait for the first token (or the end), so an early error keeps its status
            first = await _wait(job, request, job.events.get())
            if first is None:
                job.future.result()  # raises the request's error, if it failed
            chunks = _live_events(job, first, model)
            return StreamingResponse(_sse(chunks, job, rid, now, settings.model_name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await _wait(job, request, job.future)
        if chat.stream:
            chunks = _final_events(result, model)
            return StreamingResponse(_sse(chunks, job, rid, now, settings.model_name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return {"id": rid, "object": "chat.completion", "created": now, "model": settings.model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": result.usage}

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request is {declared} bytes, over this server's limit of {limit} "
                            "(--max-request-bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request is over this server's limit of {limit} bytes (--max-request-bytes)",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait(job: Job, request: Request, awaitable):
    """``awaitable`` (the job's result, or its next streamed token); a client that goes away meanwhile marks the
    job cancelled (skipped if not yet decoding)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancelled = True
                task.cancel()
                raise ApiError(499, "the client closed the request")
    except asyncio.CancelledError:
        job.cancelled = True
        task.cancel()
        raise


def _grown(tokens: list[int], sent: str, model: CompactVLM) -> str:
    """The text ``tokens`` add after ``sent`` — whole characters only (a token may end inside one)."""
    text = model.processor.decode(tokens)
    if len(text) <= len(sent) or not text.startswith(sent) or text.endswith("\ufffd"):
        return ""
    return text[len(sent):]


async def _live_events(job: Job, first: int, model: CompactVLM) -> AsyncIterator[dict | Result]:
    """Text deltas as the batcher decodes the tokens, then the :class:`Result`."""
    tokens, sent, item = [], "", first
    while item is not None:
        tokens.append(item)
        delta = _grown(tokens, sent, model)
        if delta:
            sent += delta
            yield {"content": delta}
        item = await job.events.get()
    result = job.future.result()
    if result.text.startswith(sent) and len(result.text) > len(sent):
        yield {"content": result.text[len(sent):]}
    yield result


async def _final_events(result: Result, model: CompactVLM) -> AsyncIterator[dict | Result]:
    """The finished answer as deltas (requests with ``stop`` strings: their text is final only at the end)."""
    sent = ""
    for i in range(1, len(result.tokens) + 1):
        delta = _grown(result.tokens[:i], sent, model)[: len(result.text) - len(sent)]
        if delta and result.text.startswith(sent + delta):
            sent += delta
            yield {"content": delta}
    if len(result.text) > len(sent):
        yield {"content": result.text[len(sent):]}
    yield result


async def _sse(events: AsyncIterator[dict | Result], job: Job, rid: str, created: int, name: str):
    """``chat.completion.chunk`` events: the role, the text deltas, the finish reason, the usage when asked for,
    ``[DONE]``. A failure after the first token is an ``error`` event (the status is already sent). A client that
    disconnects ends this generator only."""
    def event(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                 "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    try:
        async for item in events:
            if isinstance(item, Result):
                yield event({}, item.finish_reason)
                if job.request.include_usage:
                    yield event({}, usage=item.usage, choices=False)
            else:
                yield event(item)
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"
