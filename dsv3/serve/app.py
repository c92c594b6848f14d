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
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3.data.fim import fim_prompt
from dsv3.errors import Dsv3Error
from dsv3.infer.llm import text as valid_text
from dsv3.infer.sampling import SamplingParams
from dsv3.serve.engine_loop import Delta, EngineDead, EngineLoop, Overloaded
from dsv3.serve.metrics import Metrics
from dsv3.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)

FIELD_RE = re.compile(r"^(?:prompts\[\d+\]: )?([a-z_]+)(?:\[\d+\])?:")


class ApiError(Exception):
    """An error response: HTTP status, message naming the field, the field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error")  # fmt: skip


@dataclass
class ServerSettings:
    model_names: list[str]
    api_key: str | None = None
    max_request_bytes: int = 4 * 2**20
    retry_after: int = 1
    ready_message: str | None = None  # printed once the engine thread runs
    extra: dict = field(default_factory=dict)  # shown by /version


# ---- the ASGI guard: size, key, draining -------------------------------------------------------
class Guard:
    """Refuses before routing: a body over the limit (413), a missing or wrong key on the API
    routes (401), a new request while draining (503)."""

    def __init__(self, app, state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, st = scope["path"], self.state
        protected = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
        if protected and st.settings.api_key is not None:
            headers = dict(scope["headers"])
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {st.settings.api_key}":
                return await _send_error(
                    send, ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)")
                )
        if protected and st.draining and scope["method"] == "POST":
            st.metrics.reject()
            return await _send_error(send, ApiError(503, "server is shutting down"), st.settings.retry_after)
        limit = st.settings.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(
                send, ApiError(413, f"request body: {int(declared)} bytes, at most {limit}")
            )
        body, more = [], True
        size = 0
        while more:  # read the body here so that a chunked one over the limit is refused too
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_error(send, ApiError(413, f"request body: over {limit} bytes"))
            body.append(chunk)
            more = msg.get("more_body", False)
        data = b"".join(body)
        if scope["method"] == "POST":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                return await _send_error(
                    send, ApiError(400, f"request body: not valid UTF-8 (byte {e.start})")
                )
        replay = [{"type": "http.request", "body": data, "more_body": False}]
        if scope["method"] == "POST":  # the body is JSON whatever the client declared (curl -d says form)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


async def _send_error(send, err: ApiError, retry_after: int | None = None) -> None:
    payload = json.dumps(error_body(err.message, err.type, err.param, err.status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@dataclass
class AppState:
    loop: EngineLoop
    settings: ServerSettings
    metrics: Metrics
    draining: bool = False


# ---- the app ------------------------------------------------------------------------------------
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
    api = _Api(state)

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


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """The first pydantic error as (message naming the field and value, param)."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"request body: not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})", None
    param = _param(err.get("loc", ()))
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    if err.get("type") == "missing":
        return f"{param}: field required", param
    return f"{param or 'request body'}: {err.get('msg')}, got {got}", param


def _param(loc) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union member tags ('str', 'list[int]',
    'function-after[...]') end the path."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*", str(part)
        ):
            break
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _request_error(e: Exception) -> ApiError:
    """A RequestError of the engine (or SamplingError) -> 400 naming its field."""
    msg = str(e)
    m = FIELD_RE.match(msg)
    param = m.group(1) if m else None
    if param == "prompts":
        param = "prompt"
    return ApiError(400, msg, param)


# ---- the endpoints ------------------------------------------------------------------------------
@dataclass
class _Choice:
    """What a choice accumulates (non-streaming) or remembers between chunks (streaming)."""

    index: int
    prompt: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cached: int = 0


class _Api:
    def __init__(self, state: AppState) -> None:
        self.state, self.loop = state, state.loop
        self.tok = state.loop.tokenizer
        engine = state.loop.engine
        self.max_len = engine.max_model_len
        self.cache_tokens = engine.cache.num_blocks * engine.config.block_size - engine.scheduler.lookahead

    # ---- shared checks ----
    def check_model(self, name: str | None) -> str:
        names = self.state.settings.model_names
        if name is not None and name not in names:
            raise ApiError(404, f"model: {name!r} is not served here (served: {', '.join(names)})", "model")
        return names[0] if name is None else name

    def need_tokenizer(self, what: str):
        if self.tok is None:
            raise ApiError(
                400,
                f"{what}: needs a tokenizer; this checkpoint has no tokenizer.json (send token ids)",
                what,
            )
        return self.tok

    def encode(self, value: str, what: str) -> list[int]:
        tok = self.need_tokenizer(what)
        try:
            return tok.encode(valid_text(value, what))
        except Dsv3Error as e:
            raise ApiError(400, str(e), what) from e

    def max_tokens(self, asked: int | None, prompt_len: int, what: str) -> int:
        room = self.max_len - prompt_len
        if prompt_len >= self.max_len:
            raise ApiError(
                400, f"prompt: {prompt_len} tokens, the model takes at most {self.max_len - 1}", "prompt"
            )
        if asked is None:  # fill the context, as far as the cache can hold it
            return max(1, min(room, self.cache_tokens - prompt_len))
        if asked > room:
            raise ApiError(
                400,
                f"{what}: {asked} does not fit: the prompt has {prompt_len} tokens and the context "
                f"{self.max_len} (at most {room})",
                what,
            )
        return asked

    def params(self, body, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        seed = None if body.seed is None else (body.seed + index) % 2**64  # choice i: seed + i
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else float(body.temperature),
                top_p=1.0 if body.top_p is None else float(body.top_p),
                top_k=0 if body.top_k in (None, -1) else body.top_k,
                min_p=0.0 if body.min_p is None else float(body.min_p),
                max_tokens=max_tokens,
                stop=stop,
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos,
                seed=seed,
                logprobs=logprobs,
            )
        except Dsv3Error as e:
            raise _request_error(e) from e

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
        try:
            return await self.loop.add(prompts, params)
        except Overloaded as e:
            self.state.metrics.reject()
            raise ApiError(503, str(e)) from e
        except EngineDead as e:
            raise ApiError(503, str(e)) from e
        except ValueError as e:  # RequestError / SamplingError: bad input the engine refused
            raise _request_error(e) from e

    # ---- completions ----
    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            items: list = [p]
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        out = []
        for i, item in enumerate(items):
            what = "prompt" if len(items) == 1 else f"prompt[{i}]"
            if body.suffix is not None:
                if not isinstance(item, str):
                    raise ApiError(400, "suffix: needs a text prompt (fill in the middle)", "suffix")
                tok = self.need_tokenizer("suffix")
                if None in (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id):
                    raise ApiError(400, "suffix: this tokenizer has no FIM tokens", "suffix")
                out.append(fim_prompt(tok, valid_text(item, what), self._text(body.suffix, "suffix")))
            elif isinstance(item, str):
                ids = self.encode(item, what)
                if not ids:
                    raise ApiError(400, f"{what}: encodes to no tokens", "prompt")
                out.append(ids)
            else:
                out.append(list(item))
        return out

    def _text(self, value: str, what: str) -> str:
        try:
            return valid_text(value, what)
        except Dsv3Error as e:
            raise ApiError(400, str(e), what) from e

    async def completions(self, body: CompletionRequest, request: Request):
        model = self.check_model(body.model)
        try:
            prompts = self.completion_prompts(body)
        except Dsv3Error as e:
            raise _request_error(e) from e
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(
                400, "max_tokens: 0 generates nothing; use it with echo (prompt logprobs)", "max_tokens"
            )
        if body.echo and body.stream and body.logprobs is not None:
            raise ApiError(400, "echo: prompt logprobs are not streamed; use stream=false", "echo")
        plist, prompt_of = [], []
        for pi, prompt in enumerate(prompts):
            mt = self.max_tokens(body.max_tokens, len(prompt), "max_tokens")
            for c in range(body.n):
                plist.append(self.params(body, max(mt, 1), body.logprobs, c))
                prompt_of.append(pi)
        choices = [_Choice(i, prompts[pi]) for i, pi in enumerate(prompt_of)]
        prompt_lps: list = [None] * len(prompts)
        if body.echo and body.logprobs is not None:
            self._check_vocab(prompts)
            prompt_lps = [await self.loop.prompt_logprobs(p, body.logprobs) for p in prompts]
        generate = body.max_tokens != 0
        ids = await self.submit([prompts[pi] for pi in prompt_of], plist) if generate else []
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        if body.stream:
            gen = self._stream_completion(body, meta, ids, choices, prompt_lps, len(prompts), request)
            return StreamingResponse(gen, media_type="text/event-stream")
        if generate:
            await self._collect(ids, choices, request)
        out = []
        for ch in choices:
            if ch.error is not None:
                raise ApiError(500, f"engine: the request failed ({ch.error}); its blocks are freed")
            pi = prompt_of[ch.index]
            text, lp = ch.text, None
            prefix_text = self._decode(ch.prompt) if body.echo else ""
            if body.logprobs is not None:
                lp = self._completion_logprobs(
                    ch, body.logprobs, prompt_lps[pi] if body.echo else None, prefix_text
                )
            item = {"index": ch.index, "text": prefix_text + text, "logprobs": lp,
                    "finish_reason": ch.finish_reason or "length"}  # fmt: skip
            if getattr(body, "return_token_ids", False):
                item["prompt_token_ids"], item["token_ids"] = ch.prompt, ch.token_ids
            out.append(item)
        usage = self._usage(prompts, choices)
        return {**meta, "choices": out, "usage": usage}

    def _check_vocab(self, prompts: list[list[int]]) -> None:
        vocab = self.loop.engine.model.config.vocab_size
        for p in prompts:
            bad = [t for t in p if t >= vocab]
            if bad:
                raise ApiError(
                    400, f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt"
                )

    def _usage(self, prompts: list[list[int]], choices: list[_Choice]) -> dict:
        n_prompt = sum(len(p) for p in prompts)
        n_out = sum(len(c.token_ids) for c in choices)
        cached = sum(c.cached for c in choices)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids) if self.tok is not None else ""

    def _token_str(self, t: int) -> str:
        """The token's text; a token that is part of a character (or no text) is `bytes:\\xNN..`
        of its raw bytes, as vLLM writes it, so that distinct tokens never share a string."""
        if self.tok is None:
            return f"token_id:{t}"
        s = self.tok.decode([t])
        if s and "\ufffd" not in s:
            return s
        raw = self.tok.hf.id_to_token(t)
        if raw is None:
            return f"token_id:{t}"
        inverse = _byte_decoder()
        if all(c in inverse for c in raw):
            return "bytes:" + "".join(f"\\x{inverse[c]:02x}" for c in raw)
        return raw

    def _completion_logprobs(self, ch: _Choice, n: int, prompt_lp: list | None, prefix_text: str, start: int = 0,
                             base: int = 0) -> dict:  # fmt: skip
        """OpenAI's completions logprobs of ch's tokens [start:] (and of the echoed prompt)."""
        tokens, lps, tops, offsets = [], [], [], []
        if prompt_lp is not None:
            for i, (t, entry) in enumerate(zip(ch.prompt, prompt_lp)):
                tokens.append(self._token_str(t))
                lps.append(None if entry is None else entry[t])
                tops.append(None if entry is None else self._top(entry, n))
                offsets.append(len(self._decode(ch.prompt[:i])))
        base += len(prefix_text)
        for i in range(start, len(ch.token_ids)):
            t, entry = ch.token_ids[i], ch.logprobs[i]
            tokens.append(self._token_str(t))
            lps.append(entry[t])
            tops.append(self._top(entry, n))
            offsets.append(base + len(self._decode(ch.token_ids[:i])))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _top(self, entry: dict[int, float], n: int) -> dict[str, float]:
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:n]
        return {self._token_str(t): v for t, v in best}

    async def _collect(self, ids: list[str], choices: list[_Choice], request: Request) -> None:
        watcher = asyncio.create_task(self._watch_disconnect(request, ids))
        try:
            async for d in self._timed(ids):
                self._apply(choices[ids.index(d.request_id)], d)
        finally:
            watcher.cancel()

    def _apply(self, ch: _Choice, d: Delta) -> None:
        ch.text += d.text
        ch.token_ids += d.token_ids
        if d.logprobs is not None:
            ch.logprobs += d.logprobs
        ch.cached = d.num_cached_tokens
        if d.finished:
            ch.finish_reason, ch.error = d.finish_reason, d.error

    async def _watch_disconnect(self, request: Request, ids: list[str]) -> None:
        """Abort ids as soon as the client goes away."""
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                for rid in ids:
                    self.loop.abort(rid)
                return

    async def _timed(self, ids: list[str]) -> AsyncIterator[Delta]:
        """The loop's stream of ids, observing TTFT, ITL, queue time and end-to-end latency."""
        m, last = self.state.metrics, {}
        async for d in self.loop.stream(ids):
            now = time.monotonic()
            if d.token_ids:
                if d.request_id in last:
                    m.observe(m.itl, now - last[d.request_id])
                else:
                    m.observe(m.ttft, now - d.arrival_time)
                    if d.scheduled_time is not None:
                        m.observe(m.queue, d.scheduled_time - d.arrival_time)
                last[d.request_id] = now
            if d.finished:
                m.observe(m.e2e, now - d.arrival_time)
            yield d

    async def _stream_completion(
        self, body, meta, ids, choices, prompt_lps, n_prompts, request
    ) -> AsyncIterator[str]:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}
        watcher = asyncio.create_task(self._watch_disconnect(request, ids))
        done = False
        try:
            if body.echo:
                for ch in choices:
                    chunk = {
                        "index": ch.index,
                        "text": self._decode(ch.prompt),
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield _sse({**meta, "choices": [chunk], **extra})
            async for d in self._timed(ids):
                ch = choices[ids.index(d.request_id)]
                start = len(ch.token_ids)
                self._apply(ch, d)
                if d.finish_reason == "error":
                    yield _sse(
                        error_body(f"engine: the request failed ({d.error})", "server_error", None, 500)
                    )
                    continue
                if not (d.text or d.finished or d.token_ids):
                    continue
                # a chunk per step that produced tokens, even when their text is held back (a partial
                # character or a possible stop string): clients time tokens by chunks
                lp = None
                if body.logprobs is not None and d.token_ids:
                    lp = self._completion_logprobs(ch, body.logprobs, None, "", start)
                chunk = {"index": ch.index, "text": d.text, "logprobs": lp,
                         "finish_reason": d.finish_reason if d.finished else None}  # fmt: skip
                yield _sse({**meta, "choices": [chunk], **extra})
            done = True
            if include_usage:
                yield _sse(
                    {
                        **meta,
                        "choices": [],
                        "usage": self._usage([c.prompt for c in choices[:: body.n]], choices),
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if not done:
                for rid in ids:
                    self.loop.abort(rid)

    # ---- chat ----
    async def chat(self, body: ChatCompletionRequest, request: Request):
        model = self.check_model(body.model)
        tok = self.need_tokenizer("messages")
        messages = []
        for i, m in enumerate(body.messages):
            messages.append({"role": m.role, "content": self._text(m.text(), f"messages[{i}].content")})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        what = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        mt = self.max_tokens(asked, len(prompt), what)
        n_lp = (body.top_logprobs or 0) if body.logprobs else None
        plist = [self.params(body, mt, n_lp, c) for c in range(body.n)]
        choices = [_Choice(i, prompt) for i in range(body.n)]
        ids = await self.submit([prompt] * body.n, plist)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model}  # fmt: skip
        if body.stream:
            meta["object"] = "chat.completion.chunk"
            return StreamingResponse(
                self._stream_chat(body, meta, ids, choices, request), media_type="text/event-stream"
            )
        await self._collect(ids, choices, request)
        out = []
        for ch in choices:
            if ch.error is not None:
                raise ApiError(500, f"engine: the request failed ({ch.error}); its blocks are freed")
            lp = {"content": self._chat_logprobs(ch, 0, n_lp)} if n_lp is not None else None
            out.append({"index": ch.index, "message": {"role": "assistant", "content": ch.text}, "logprobs": lp,
                        "finish_reason": ch.finish_reason or "length"})  # fmt: skip
        return {**meta, "choices": out, "usage": self._usage([prompt], choices)}

    def _chat_logprobs(self, ch: _Choice, start: int, n: int) -> list[dict]:
        """OpenAI's chat logprobs `content` entries of ch's tokens [start:]."""

        def one(t: int, logprob: float) -> dict:
            return {"token": self._token_str(t), "logprob": logprob, "bytes": self._token_bytes(t)}

        out = []
        for t, entry in zip(ch.token_ids[start:], ch.logprobs[start:]):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:n]
            out.append({**one(t, entry[t]), "top_logprobs": [one(k, v) for k, v in top]})
        return out

    def _token_bytes(self, t: int) -> list[int]:
        raw = self.tok.hf.id_to_token(t) if self.tok is not None else None
        inverse = _byte_decoder()
        if raw is not None and all(c in inverse for c in raw):
            return [inverse[c] for c in raw]
        return list(self._token_str(t).encode("utf-8"))

    async def _stream_chat(self, body, meta, ids, choices, request) -> AsyncIterator[str]:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}
        n_lp = (body.top_logprobs or 0) if body.logprobs else None
        watcher = asyncio.create_task(self._watch_disconnect(request, ids))
        done = False
        try:
            for ch in choices:
                first = {"index": ch.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}  # fmt: skip
                yield _sse({**meta, "choices": [first], **extra})
            async for d in self._timed(ids):
                ch = choices[ids.index(d.request_id)]
                start = len(ch.token_ids)
                self._apply(ch, d)
                if d.finish_reason == "error":
                    yield _sse(
                        error_body(f"engine: the request failed ({d.error})", "server_error", None, 500)
                    )
                    continue
                if not (d.text or d.finished or d.token_ids):
                    continue  # as for completions: one chunk per step that produced tokens
                lp = (
                    {"content": self._chat_logprobs(ch, start, n_lp)}
                    if n_lp is not None and d.token_ids
                    else None
                )
                delta = {"content": d.text} if (d.text or not d.finished) else {}
                chunk = {"index": ch.index, "delta": delta, "logprobs": lp,
                         "finish_reason": d.finish_reason if d.finished else None}  # fmt: skip
                yield _sse({**meta, "choices": [chunk], **extra})
            done = True
            if include_usage:
                yield _sse({**meta, "choices": [], "usage": self._usage([choices[0].prompt], choices)})
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if not done:
                for rid in ids:
                    self.loop.abort(rid)

    # ---- tokens ----
    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        tok = self.need_tokenizer("prompt")
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "prompt: give exactly one of prompt and messages", "prompt")
        if body.prompt is not None:
            ids = self.encode(body.prompt, "prompt")
        else:
            msgs = [{"role": m.role, "content": self._text(m.text(), f"messages[{i}].content")}
                    for i, m in enumerate(body.messages)]  # fmt: skip
            ids = tok.apply_chat_template(msgs, add_generation_prompt=body.add_generation_prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_len}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        tok = self.need_tokenizer("tokens")
        vocab = tok.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise ApiError(400, f"tokens: ids {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": tok.decode(body.tokens)}


@functools.cache
def _byte_decoder() -> dict[str, int]:
    from dsv3.data.tokenizer import _bytes_to_unicode

    return {c: b for b, c in _bytes_to_unicode().items()}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
