"""The OpenAI-compatible HTTP API over an `EngineLoop` (FastAPI; docs/serving.md lists every field).

Every request is checked completely before the first byte of its response: the body (size, JSON,
types: pydantic), the model name, the prompt (encoded, against the context length and the cache),
the sampling fields, and the engine's own validation (`EngineLoop.add` raises before anything is
queued). Only then does a streaming response start. Errors are the OpenAI body
`{"error": {"message", "type", "param", "code"}}` with 400 (bad field), 401 (api key), 404 (unknown
model or route), 413 (body too large) or 503 (queue full or draining, with Retry-After).

A client that goes away has its requests aborted at once (a task waits for `http.disconnect`); a
request failing inside the engine ends its stream with an error event (or a 500 body when not
streaming) and its blocks are freed by the engine.

Here: the routes and the settings they share. The guard before them is dsv3.serve.guard, the
requests' checks and responses dsv3.serve.handlers, the event streams dsv3.serve.streaming, token
strings and logprobs dsv3.serve.logprobs, the error bodies dsv3.serve.api_errors.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3.serve.api_errors import ApiError, validation_message
from dsv3.serve.engine_loop import EngineLoop
from dsv3.serve.guard import Guard
from dsv3.serve.handlers import Api
from dsv3.serve.metrics import Metrics
from dsv3.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)


@dataclass
class ServerSettings:
    model_names: list[str]
    api_key: str | None = None
    max_request_bytes: int = 4 * 2**20
    retry_after: int = 1
    ready_message: str | None = None  # printed once the engine thread runs
    extra: dict = field(default_factory=dict)  # shown by /version


@dataclass
class AppState:
    loop: EngineLoop
    settings: ServerSettings
    metrics: Metrics
    draining: bool = False


def build_app(loop: EngineLoop, settings: ServerSettings) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine thread and stops it at shutdown."""
    state = AppState(loop, settings, Metrics(loop, settings.model_names[0]))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loop.start(asyncio.get_running_loop())
        if settings.ready_message:
            print(settings.ready_message, flush=True)
        yield
        loop.stop()

    app = FastAPI(title="dsv3", version=_version(), lifespan=lifespan)
    app.state.dsv3 = state
    api = Api(state)

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError):
        headers = {"Retry-After": str(settings.retry_after)} if e.status == 503 else None
        return JSONResponse(error_body(e.message, e.type, e.param, e.status), e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError):
        msg, param = validation_message(e.errors())
        return JSONResponse(error_body(msg, "invalid_request_error", param, 400), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException):
        status = e.status_code if e.status_code != 422 else 400
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, status), status)

    @app.exception_handler(Exception)
    async def _bug(_req: Request, e: Exception):  # a bug: still an OpenAI body, never a dropped socket
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}: {e}", "server_error", None, 500), 500
        )

    @app.post("/v1/completions", summary="Text completion (OpenAI)")
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI)")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await api.chat(body, request)

    @app.get("/v1/models", summary="The served model names")
    async def models():
        now = int(time.time())
        data = [{"id": n, "object": "model", "created": now, "owned_by": "dsv3", "max_model_len": api.max_len}
                for n in settings.model_names]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/health", summary="200 while the engine runs, 503 when it is dead or draining")
    async def health():
        if state.draining or not loop.alive:
            reason = "draining" if state.draining else f"engine dead: {loop.error!r}"
            return JSONResponse({"status": reason}, 503)
        return {"status": "ok"}

    @app.get("/version", summary="dsv3 version")
    async def version():
        return {"version": _version(), **settings.extra}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(state.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", summary="Text or chat messages -> token ids")
    async def tokenize(body: TokenizeRequest):
        return api.tokenize(body)

    @app.get("/tokenizer_info", summary="The tokenizer's transformers config (as vLLM's endpoint)")
    async def tokenizer_info():
        return api.tokenizer_info()

    @app.post("/detokenize", summary="Token ids -> text")
    async def detokenize(body: DetokenizeRequest):
        return api.detokenize(body)

    return Guard(app, state)  # type: ignore[return-value]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsv3")
    except PackageNotFoundError:
        return "0.0.0"
