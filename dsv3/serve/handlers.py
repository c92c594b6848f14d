"""The endpoints behind the routes: each request checked completely, then submitted to the engine.

Checked before the first byte of a response: the model name, the prompt (encoded, against the
context length and the cache), the sampling fields, and the engine's own validation
(`EngineLoop.add` raises before anything is queued). Completions take text, token ids, several
prompts, `n` choices each, `echo` with prompt logprobs, and `suffix` (fill in the middle); chat
takes messages through the tokenizer's chat template. Streaming goes through dsv3.serve.streaming.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import StreamingResponse

from dsv3.data.fim import fim_prompt
from dsv3.errors import Dsv3Error
from dsv3.infer.llm import text as valid_text
from dsv3.infer.sampling import SamplingParams
from dsv3.serve.api_errors import ApiError, request_error
from dsv3.serve.engine_loop import Delta, EngineDead, Overloaded
from dsv3.serve.logprobs import TokenText
from dsv3.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from dsv3.serve.streaming import Choice, ChunkFn, Streams

if TYPE_CHECKING:
    from dsv3.serve.app import AppState


class Api:
    """The endpoints' work: check a request completely, submit it, build its response."""

    def __init__(self, state: AppState) -> None:
        self.state, self.loop = state, state.loop
        self.tok = state.loop.tokenizer
        self.tokens = TokenText(self.tok)  # token strings and logprobs entries
        self.streams = Streams(state.loop, state.metrics)
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
            raise request_error(e) from e

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
        try:
            return await self.loop.add(prompts, params)
        except Overloaded as e:
            self.state.metrics.reject()
            raise ApiError(503, str(e)) from e
        except EngineDead as e:
            raise ApiError(503, str(e)) from e
        except ValueError as e:  # RequestError / SamplingError: bad input the engine refused
            raise request_error(e) from e

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

    def _messages(self, messages: list) -> list[dict[str, str]]:
        """Chat messages as the chat template takes them, each content checked as text."""
        return [{"role": m.role, "content": self._text(m.text(), f"messages[{i}].content")}
                for i, m in enumerate(messages)]  # fmt: skip

    async def completions(self, body: CompletionRequest, request: Request):
        model = self.check_model(body.model)
        try:
            prompts = self.completion_prompts(body)
        except Dsv3Error as e:
            raise request_error(e) from e
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
        choices = [Choice(i, prompts[pi]) for i, pi in enumerate(prompt_of)]
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

            def chunk(ch: Choice, d: Delta, start: int) -> dict:
                lp = None
                if body.logprobs is not None and d.token_ids:
                    lp = self.tokens.completion_logprobs(ch, body.logprobs, None, "", start)
                return {"index": ch.index, "text": d.text, "logprobs": lp,
                        "finish_reason": d.finish_reason if d.finished else None}  # fmt: skip

            echoed = [{"index": ch.index, "text": self.tokens.decode(ch.prompt), "logprobs": None,
                       "finish_reason": None} for ch in choices] if body.echo else []  # fmt: skip
            return self._stream(body, meta, ids, choices, request, echoed, chunk)
        if generate:
            await self.streams.collect(ids, choices, request)
        out = []
        for ch in choices:
            if ch.error is not None:
                raise ApiError(500, f"engine: the request failed ({ch.error}); its blocks are freed")
            pi = prompt_of[ch.index]
            text, lp = ch.text, None
            prefix_text = self.tokens.decode(ch.prompt) if body.echo else ""
            if body.logprobs is not None:
                lp = self.tokens.completion_logprobs(
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

    def _usage(self, prompts: list[list[int]], choices: list[Choice]) -> dict:
        n_prompt = sum(len(p) for p in prompts)
        n_out = sum(len(c.token_ids) for c in choices)
        cached = sum(c.cached for c in choices)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip

    # ---- chat ----
    async def chat(self, body: ChatCompletionRequest, request: Request):
        model = self.check_model(body.model)
        tok = self.need_tokenizer("messages")
        prompt = tok.apply_chat_template(self._messages(body.messages), add_generation_prompt=True)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        what = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        mt = self.max_tokens(asked, len(prompt), what)
        n_lp = (body.top_logprobs or 0) if body.logprobs else None
        plist = [self.params(body, mt, n_lp, c) for c in range(body.n)]
        choices = [Choice(i, prompt) for i in range(body.n)]
        ids = await self.submit([prompt] * body.n, plist)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model}  # fmt: skip
        if body.stream:
            meta["object"] = "chat.completion.chunk"

            def chunk(ch: Choice, d: Delta, start: int) -> dict:
                lp = None
                if n_lp is not None and d.token_ids:
                    lp = {"content": self.tokens.chat_logprobs(ch, start, n_lp)}
                delta = {"content": d.text} if (d.text or not d.finished) else {}
                return {"index": ch.index, "delta": delta, "logprobs": lp,
                        "finish_reason": d.finish_reason if d.finished else None}  # fmt: skip

            roles = [{"index": ch.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for ch in choices]  # fmt: skip
            return self._stream(body, meta, ids, choices, request, roles, chunk)
        await self.streams.collect(ids, choices, request)
        out = []
        for ch in choices:
            if ch.error is not None:
                raise ApiError(500, f"engine: the request failed ({ch.error}); its blocks are freed")
            lp = {"content": self.tokens.chat_logprobs(ch, 0, n_lp)} if n_lp is not None else None
            out.append({"index": ch.index, "message": {"role": "assistant", "content": ch.text}, "logprobs": lp,
                        "finish_reason": ch.finish_reason or "length"})  # fmt: skip
        return {**meta, "choices": out, "usage": self._usage([prompt], choices)}

    def _stream(self, body, meta: dict, ids: list[str], choices: list[Choice], request: Request,
                opening: list[dict], chunk: ChunkFn) -> StreamingResponse:  # fmt: skip
        """The SSE response of completions and chat alike; usage counts each distinct prompt once."""
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        usage = lambda: self._usage([c.prompt for c in choices[:: body.n]], choices)  # noqa: E731
        events = self.streams.events(ids, choices, request, meta, include_usage=include_usage,
                                     opening=opening, chunk=chunk, usage=usage)  # fmt: skip
        return StreamingResponse(events, media_type="text/event-stream")

    # ---- tokens ----
    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        tok = self.need_tokenizer("prompt")
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "prompt: give exactly one of prompt and messages", "prompt")
        if body.prompt is not None:
            ids = self.encode(body.prompt, "prompt")
        else:
            messages = self._messages(body.messages)
            ids = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_len}

    def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info: the tokenizer config (bos/eos/pad tokens, chat template) and the
        model length; lm-evaluation-harness's `remote` tokenizer backend reads it, then /tokenize."""
        info = {k: v for k, v in self.need_tokenizer("tokenizer").hf_config().items() if k != "dsv3"}
        return {**info, "model_max_length": self.max_len}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        tok = self.need_tokenizer("tokens")
        vocab = tok.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise ApiError(400, f"tokens: ids {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": tok.decode(body.tokens)}
