"""The HTTP layer: FastAPI routes in OpenAI's wire format over the ``Engine``.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``), ``POST /v1/adapters`` and
``DELETE /v1/adapters/{name}``, ``GET /health``, ``GET /metrics``. Each request is checked before it
reaches the engine, in this order: body size (413), API key on ``/v1`` (401, compared in constant time
with ``hmac.compare_digest``), JSON and fields (400, naming the field), the model name (404), the prompt
length (413) and ``max_tokens`` (400); then the bounded queue (429 when full, 503 when the engine is not
running). A client that disconnects is cancelled: its batch slot and KV cache are freed at the next step.
Every answered request writes one log line (``qlorakit.serve`` logger) and counts in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from qlorakit.errors import QlorakitError
from qlorakit.generate.chat import chat_prompt_ids
from qlorakit.generate.sampling import SamplingConfig
from qlorakit.serve import protocol
from qlorakit.serve.config import ServeConfig
from qlorakit.serve.engine import Engine, EngineStoppedError, Job, Outcome, QueueFullError
from qlorakit.serve.protocol import ApiError
from qlorakit.serve.registry import UnknownModelError
from qlorakit.serve.schemas import AdapterRequest, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("qlorakit.serve")

#: OpenAI's default ``max_tokens`` of the (legacy) completions endpoint.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return f"Invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg")), param


async def _parse(request: Request, schema: type[BaseModel], limit: int) -> Any:
    body = await request.body()
    if len(body) > limit:
        raise ApiError(413, f"the request body has {len(body)} bytes; the limit is {limit}", "body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", "invalid_json") from exc
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise ApiError(400, message, "invalid_value", param) from exc


class _Server:
    """The state the routes share: engine, registry, limits, tokenizer, base id."""

    def __init__(self, engine: Engine, config: ServeConfig) -> None:
        self.engine, self.config = engine, config
        self.registry, self.metrics, self.tokenizer = engine.registry, engine.metrics, engine.tokenizer
        self.max_positions = getattr(engine.model.config, "max_position_embeddings", None)

    def job(self, body: ChatCompletionRequest | CompletionRequest, chat: bool) -> Job:
        """The engine job of a validated body, or the ``ApiError`` of the first limit it breaks."""
        try:
            adapter = self.registry.resolve(body.model)
        except UnknownModelError as exc:
            raise ApiError(404, str(exc), "model_not_found", "model") from exc
        try:
            if chat:
                ids = chat_prompt_ids(self.tokenizer, [m.model_dump() for m in body.messages])
            else:
                ids = self.tokenizer(body.prompt)["input_ids"]
        except QlorakitError as exc:
            raise ApiError(400, str(exc), "invalid_value", "messages") from exc
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", "invalid_value", "prompt")
        if len(ids) > self.config.max_prompt_tokens:
            raise ApiError(413, f"the prompt has {len(ids)} tokens; this server's limit is "
                           f"{self.config.max_prompt_tokens}", "context_length_exceeded", "messages")
        default = self.config.default_max_tokens if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens or default
        if wanted > self.config.max_tokens_limit:
            raise ApiError(400, f"max_tokens = {wanted} exceeds this server's limit of {self.config.max_tokens_limit}",
                           "invalid_value", "max_tokens")
        if self.max_positions and len(ids) + wanted > self.max_positions:
            raise ApiError(400, f"{len(ids)} prompt tokens + max_tokens {wanted} exceed the model's context of "
                           f"{self.max_positions} positions", "context_length_exceeded", "max_tokens")
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        sampling = SamplingConfig(temperature=body.temperature, top_p=body.top_p, seed=seed)
        return Job(ids, adapter, wanted, sampling, emit=lambda event: None, stops=body.stop_list())

    def record(self, endpoint: str, model: str, status: int, outcome: Outcome | None = None,
               note: str = "") -> None:
        """One log line and the request counter for every answered request."""
        self.metrics.add("qlorakit_requests_total", endpoint=endpoint, model=model, status=str(status))
        if outcome is None:
            log.info("%s adapter=%s status=%d %s", endpoint, model, status, note)
            return
        log.info("%s adapter=%s status=%d prompt_tokens=%d completion_tokens=%d latency_ms=%.1f queue_ms=%.1f "
                 "finish=%s%s", endpoint, model, status, outcome.prompt_tokens, outcome.completion_tokens,
                 outcome.seconds * 1000, outcome.queue_seconds * 1000, outcome.finish_reason,
                 f" {note}" if note else "")


def _channel(job: Job) -> asyncio.Queue:
    """Point ``job.emit`` at an asyncio queue of this event loop (the engine thread puts, the route awaits)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    job.emit = emit
    return events


async def _generate(server: _Server, request: Request, chat: bool) -> Response:
    endpoint = "chat" if chat else "completions"
    body = None
    try:
        body = await _parse(request, ChatCompletionRequest if chat else CompletionRequest,
                            server.config.max_body_bytes)
        job = server.job(body, chat)
        events = _channel(job)
        try:
            server.engine.submit(job)
        except QueueFullError as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", "queue_full") from exc
        except EngineStoppedError as exc:
            raise ApiError(503, str(exc), "engine_unavailable") from exc
    except ApiError as error:
        server.record(endpoint, getattr(body, "model", "?"), error.status, note=error.message)
        return _error_response(error)
    if body.stream:
        return StreamingResponse(_stream(server, job, events, body, chat), media_type="text/event-stream")
    return await _wait(server, request, job, events, body, chat)


async def _wait(server: _Server, request: Request, job: Job, events: asyncio.Queue, body: Any,
                chat: bool) -> Response:
    endpoint = "chat" if chat else "completions"
    while True:
        try:
            kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                server.engine.cancel(job)
                server.record(endpoint, body.model, 499, note="client disconnected")
                return Response(status_code=499)
            continue
        if kind == "error":
            server.record(endpoint, body.model, 500, note=value)
            return _error_response(ApiError(500, value, "generation_failed"))
        if kind == "done":
            server.record(endpoint, body.model, 200, value)
            build = protocol.chat_completion if chat else protocol.text_completion
            return JSONResponse(build(job.id, body.model, value))


async def _stream(server: _Server, job: Job, events: asyncio.Queue, body: Any, chat: bool) -> AsyncIterator[bytes]:
    endpoint, finished = "chat" if chat else "completions", False
    try:
        if chat:
            yield protocol.sse(protocol.chunk(chat, job.id, body.model, "", first=True))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield protocol.sse(protocol.chunk(chat, job.id, body.model, value))
            elif kind == "error":
                finished = True
                server.record(endpoint, body.model, 500, note=value)
                yield protocol.sse(ApiError(500, value, "generation_failed").body())
                break
            else:
                finished = True
                server.record(endpoint, body.model, 200, value, note="stream")
                yield protocol.sse(protocol.chunk(chat, job.id, body.model, None, value.finish_reason))
                if body.include_usage():
                    yield protocol.sse(protocol.usage_chunk(chat, job.id, body.model, value))
                break
        yield protocol.sse("[DONE]")
    finally:
        if not finished:  # the client went away mid-stream
            server.engine.cancel(job)
            server.record(endpoint, body.model, 499, note="client disconnected mid-stream")


def _refusal(server: _Server, key: bytes | None, request: Request) -> Response | None:
    """The error response for a request refused before its route runs (a body over the limit, a missing or wrong
    API key on /v1), or None."""
    config = server.config
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
        return _error_response(ApiError(413, f"the request body has {length} bytes; the limit is "
                                        f"{config.max_body_bytes}", "body_too_large"))
    if key is not None and request.url.path.startswith("/v1"):
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            server.record(request.url.path, "?", 401, note="bad or missing API key")
            return _error_response(ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                            "<key>' with the key given to --api-key", "invalid_api_key"))
    return None


async def _add_adapter(server: _Server, request: Request) -> Response:
    """POST /v1/adapters: load a PEFT adapter directory under a name (checked by the registry first)."""
    try:
        body = await _parse(request, AdapterRequest, server.config.max_body_bytes)
        spec = server.registry.check(body.name, body.path)
        paths = await asyncio.wrap_future(server.engine.load_adapter(spec))
    except ApiError as error:
        return _error_response(error)
    except EngineStoppedError as exc:
        return _error_response(ApiError(503, str(exc), "engine_unavailable"))
    except QlorakitError as exc:
        status, code = (409, "adapter_exists") if "already loaded" in str(exc) else (400, "invalid_adapter")
        return _error_response(ApiError(status, str(exc), code, "path"))
    log.info("adapter loaded name=%s path=%s layers=%d", body.name, body.path, len(paths))
    return JSONResponse({"id": body.name, "object": "model", "owned_by": "qlorakit", "layers": len(paths)})


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The FastAPI application over a started ``engine``."""
    server = _Server(engine, config)
    app = FastAPI(title="qlorakit", docs_url=None, redoc_url=None, openapi_url=None)
    key = None if config.api_key is None else config.api_key.encode()

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        refused = _refusal(server, key, request)
        return refused if refused is not None else await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        running, waiting = engine.counts()
        status = "ok" if engine.alive else "stopped"
        return {"status": status, "running": running, "waiting": waiting, "adapters": server.registry.names()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        names = [server.registry.base_id, *server.registry.names()]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "qlorakit"}
                                           for n in names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(server, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(server, request, chat=False)

    @app.post("/v1/adapters")
    async def add_adapter(request: Request) -> Response:
        return await _add_adapter(server, request)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str) -> Response:
        try:
            engine.delete_adapter(name)
        except UnknownModelError as exc:
            return _error_response(ApiError(404, str(exc), "model_not_found", "name"))
        log.info("adapter deleted name=%s", name)
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    return app
