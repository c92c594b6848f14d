"""From the engine's deltas to responses: a choice's running state, a whole response collected, or
one stream of server-sent events, shared by completions and chat.

A stream opens with its endpoint's first chunks (the echoed prompt; the assistant role), then sends
one chunk per engine step that produced tokens for a choice, even when their text is held back (a
partial character or a possible stop string): clients time tokens by chunks. A request failing in
the engine gets an error event; the usage chunk (when asked) and `[DONE]` end the stream. A client
that goes away, or a stream left early, aborts its requests at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request

from dsv3.serve.engine_loop import Delta, EngineLoop
from dsv3.serve.metrics import Metrics
from dsv3.serve.protocol import error_body


@dataclass
class Choice:
    """What a choice accumulates (non-streaming) or remembers between chunks (streaming)."""

    index: int
    prompt: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cached: int = 0

    def apply(self, d: Delta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        if d.logprobs is not None:
            self.logprobs += d.logprobs
        self.cached = d.num_cached_tokens
        if d.finished:
            self.finish_reason, self.error = d.finish_reason, d.error


# chunk(choice, delta, start): the endpoint's chunk body for a delta; start = the choice's tokens before it
ChunkFn = Callable[[Choice, Delta, int], dict]


class Streams:
    """The engine loop's deltas for a response's request ids, timed into the server's metrics."""

    def __init__(self, loop: EngineLoop, metrics: Metrics) -> None:
        self.loop, self.metrics = loop, metrics

    async def collect(self, ids: list[str], choices: list[Choice], request: Request) -> None:
        """Run every request to its end, accumulating into `choices` (non-streaming responses)."""
        watcher = asyncio.create_task(self._watch_disconnect(request, ids))
        try:
            async for d in self._timed(ids):
                choices[ids.index(d.request_id)].apply(d)
        finally:
            watcher.cancel()

    async def events(
        self, ids: list[str], choices: list[Choice], request: Request, meta: dict, *, include_usage: bool,
        opening: list[dict], chunk: ChunkFn, usage: Callable[[], dict],
    ) -> AsyncIterator[str]:  # fmt: skip
        """The SSE stream of one response (see the module docstring): `opening` chunk bodies first,
        then `chunk(...)` per delta, then `usage()` when `include_usage`, then `[DONE]`."""
        extra = {"usage": None} if include_usage else {}
        watcher = asyncio.create_task(self._watch_disconnect(request, ids))
        done = False
        try:
            for body in opening:
                yield sse({**meta, "choices": [body], **extra})
            async for d in self._timed(ids):
                ch = choices[ids.index(d.request_id)]
                start = len(ch.token_ids)
                ch.apply(d)
                if d.finish_reason == "error":
                    yield sse(
                        error_body(f"engine: the request failed ({d.error})", "server_error", None, 500)
                    )
                    continue
                if d.text or d.finished or d.token_ids:
                    yield sse({**meta, "choices": [chunk(ch, d, start)], **extra})
            done = True
            if include_usage:
                yield sse({**meta, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if not done:
                for rid in ids:
                    self.loop.abort(rid)

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
        m, last = self.metrics, {}
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


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
