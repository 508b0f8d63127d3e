"""The FastAPI application factory: ``create_app(settings)``; all state lives on ``app.state``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from alignd.server.api.errors import (
    APIError,
    BadRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    error_body,
    install_error_handlers,
)
from alignd.server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from alignd.server.api.serving import Serving
from alignd.server.engines.base import Engine
from alignd.server.metrics import Metrics
from alignd.server.models import ModelPool
from alignd.server.router import Router
from alignd.server.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger("alignd.server")
Body = TypeVar("Body", bound=BaseModel)
T = TypeVar("T")


class _ClientGone(APIError):
    """The client disconnected before its response started (logged as 499, as nginx does)."""

    status = 499
    type = "client_closed_request"


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, cancelled if the client disconnects first (vLLM's ``with_cancellation``).

    Without this, a non-streaming request (or a stream before its first chunk) whose client went away
    would keep its engine requests running to ``max_tokens``.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.exception() is not None:
            await task  # receive() failed: nothing left to race against
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        if not task.done():  # the client left first (or this request itself was cancelled)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone("the client disconnected")
    return task.result()


async def _parse(request: Request, model: type[Body]) -> Body:
    settings: Settings = request.app.state.settings
    length = request.headers.get("content-length")
    limit = settings.server.max_body_bytes
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {limit} bytes")
    raw = await request.body()
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body of {len(raw)} bytes exceeds the limit of {limit} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise BadRequest(f"Unrecognized request argument supplied: {param}", param) from None
        raise BadRequest(f"{param}: {first['msg']}" if param else first["msg"], param) from None


def _check_auth(request: Request) -> None:
    keys = request.app.state.settings.server.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if token not in keys:
        raise Unauthorized("Incorrect API key provided." if token else "Missing bearer API key.")


def create_app(
    settings: Settings, engines: dict[str, Engine] | None = None, *, exit_on_start_failure: bool = False
) -> FastAPI:
    """Build the app. ``engines`` injects engines by model name (tests use fakes); others are built.

    With ``exit_on_start_failure`` (the ``alignd serve`` command) a model that fails to load stops the
    process; otherwise the app stays up and ``/health`` reports the failure.
    """
    settings_exit_on_failure = exit_on_start_failure

    pool = ModelPool(settings, engines)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Start models in the background so /health can answer 503 while they load.
        start = asyncio.create_task(pool.start())

        def _started(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None and settings_exit_on_failure:
                # A model that cannot load leaves nothing to serve: stop (uvicorn shuts down gracefully).
                log.error("a model failed to start; shutting down")
                os.kill(os.getpid(), signal.SIGTERM)

        start.add_done_callback(_started)
        app.state.start_task = start
        try:
            yield
        finally:
            if not start.done():
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
            await pool.shutdown()

    app = FastAPI(title="alignd", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.pool = pool
    app.state.metrics = Metrics()
    app.state.router = Router(pool)
    app.state.serving = Serving(app.state.router, app.state.metrics)
    app.state.in_flight = 0
    install_error_handlers(app)
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.server.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    async def _serve(request: Request, body: CompletionRequest | ChatCompletionRequest, endpoint: str) -> Response:
        state = request.app.state
        if state.in_flight >= settings.server.max_concurrent_requests:
            raise TooManyRequests("the server is at its concurrency limit; retry shortly")
        target_label = body.model
        started = time.perf_counter()
        state.in_flight += 1
        state.metrics.in_flight.inc()
        release_now = True
        try:
            work = state.serving.complete(body, endpoint)  # type: ignore[arg-type]
            result = await _unless_disconnected(request, work)
            if isinstance(result, dict):
                state.metrics.requests.labels(endpoint, target_label, "200").inc()
                return JSONResponse(result)

            async def stream() -> AsyncIterator[str]:
                try:
                    async for line in result:
                        yield line
                    state.metrics.requests.labels(endpoint, target_label, "200").inc()
                finally:
                    state.in_flight -= 1
                    state.metrics.in_flight.dec()
                    state.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

            release_now = False
            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        except Exception as exc:
            status = str(getattr(exc, "status", 500))
            state.metrics.requests.labels(endpoint, target_label, status).inc()
            raise
        finally:
            if release_now:
                state.in_flight -= 1
                state.metrics.in_flight.dec()
                state.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _check_auth(request)
        return await _serve(request, await _parse(request, CompletionRequest), "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _check_auth(request)
        return await _serve(request, await _parse(request, ChatCompletionRequest), "chat")

    def _model_cards() -> list[dict[str, Any]]:
        created = int(time.time())
        cards = []
        for name, ms in settings.models.items():
            hosted = pool.models.get(name)
            cards.append({
                "id": name, "object": "model", "created": created, "owned_by": "alignd",
                "max_model_len": hosted.engine.info.max_model_len if hosted and hosted.engine.ready else ms.max_model_len,
                "alignd": {
                    "kind": "model",
                    "task": ms.task,
                    "engine": ms.engine,
                    "base_model": hosted.is_base if hosted else None,
                    "ready": bool(hosted and hosted.engine.ready),
                },
            })
        for name, recipe in settings.recipes.items():
            cards.append({
                "id": name, "object": "model", "created": created, "owned_by": "alignd",
                "alignd": {
                    "kind": "recipe",
                    "decoder": recipe.decoder,
                    "roles": {r: b.model_dump(exclude_none=True) for r, b in recipe.roles.items()},
                    "params": recipe.params,
                    "description": recipe.description,
                },
            })
        return cards

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        _check_auth(request)
        return {"object": "list", "data": _model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        _check_auth(request)
        for card in _model_cards():
            if card["id"] == model_id:
                return card
        from alignd.server.api.errors import NotFound

        raise NotFound(f"The model `{model_id}` does not exist.", "model")

    @app.get("/v1/alignment/decoders")
    async def list_decoders(request: Request) -> dict[str, Any]:
        _check_auth(request)
        from alignd.decoders.registry import decoder_names, describe_decoder, get_decoder_class

        return {"object": "list", "data": [describe_decoder(get_decoder_class(n)) for n in decoder_names()]}

    @app.get("/health")
    async def health() -> Response:
        if pool.loading:
            return JSONResponse(error_body("models are loading", "server_error", None, "loading"), 503)
        if pool.error is not None:
            return JSONResponse(error_body(f"start-up failed: {pool.error}", "server_error"), 503)
        for model in pool.models.values():
            try:
                await model.engine.check_health()
            except Exception as exc:  # noqa: BLE001
                return JSONResponse(error_body(str(exc), "server_error", None, "engine_unavailable"), 503)
        return JSONResponse({"status": "ok", "models": list(pool.models)})

    @app.get("/metrics")
    async def metrics() -> Response:
        ready = {name: m.engine.ready for name, m in pool.models.items()}
        rewinds = {name: m.engine.rewinds for name, m in pool.models.items()}
        return Response(app.state.metrics.render(ready, rewinds), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        _check_auth(request)
        body = await _parse(request, TokenizeRequest)
        model = pool.get(body.model)
        if body.messages is not None:
            try:
                _, ids = model.tokenizer.render_chat(
                    [{"role": m.role, "content": m.text()} for m in body.messages],
                    add_generation_prompt=body.add_generation_prompt,
                )
            except Exception as exc:  # noqa: BLE001
                raise BadRequest(f"cannot apply the chat template: {exc}", "messages") from None
        else:
            ids = model.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": model.engine.info.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        _check_auth(request)
        body = await _parse(request, DetokenizeRequest)
        model = pool.get(body.model)
        vocab = model.engine.info.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise BadRequest(f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": model.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        try:
            page = resources.files("alignd.server").joinpath("web/index.html").read_text()
        except (FileNotFoundError, OSError):
            page = "<h1>alignd</h1><p>OpenAI-compatible API at <code>/v1</code>.</p>"
        return HTMLResponse(page)

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(_: Request, exc: ServiceUnavailable) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), 503, headers={"Retry-After": "5"})

    return app
