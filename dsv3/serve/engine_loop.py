"""The engine in a background thread, behind the narrow interface a server needs (DESIGN §8).

One thread owns the `Engine`: it takes commands from an inbox (add, abort, score), steps while
there is work and pushes every request's outputs to that request's asyncio queue on the server's
event loop (`call_soon_threadsafe`). Nothing else touches the engine, so no lock is needed and an
HTTP handler never blocks the event loop on a forward.

The interface (`add`, `stream`, `abort`, `stats`, plus `prompt_logprobs`) is what a later router
over several engines replaces: a handler only sees request ids, `Delta`s and a stats dict.

Incremental detokenisation (`Detokenizer`): text is re-decoded from a request's output ids and only
the part that can no longer change is released: a trailing U+FFFD (an incomplete UTF-8 character
whose remaining bytes come with the next token) and any tail that could still grow into a stop
string are held back. The final chunk is the engine's own text (cut before the stop string,
without eos), so the streamed pieces always concatenate to the non-streamed text.

Admission: `add` counts requests (and prompt tokens) that are accepted but have not produced their
first token yet; beyond `max_queued_requests` / `max_queued_tokens` it raises `Overloaded`, which
the server turns into 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from dsv3.infer.engine import Engine
from dsv3.infer.outputs import RequestOutput
from dsv3.infer.sampling import SamplingParams


class Overloaded(Exception):
    """The admission queue is full; `retry_after` seconds is a hint for the client."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDead(RuntimeError):
    """The engine thread has stopped (a crash or a shutdown); no request can be served."""


@dataclass
class Delta:
    """What one request received since the previous Delta."""

    request_id: str
    text: str  # new text (may be empty while held back)
    token_ids: list[int]  # new tokens
    logprobs: list[dict[int, float]] | None  # one entry per new token, when asked
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # generated so far
    num_cached_tokens: int = 0
    error: str | None = None  # finish_reason "error": what failed
    first_token_time: float | None = None
    arrival_time: float = 0.0
    scheduled_time: float | None = None  # start of the first step that ran the request


class Detokenizer:
    """Releases a request's text incrementally (see the module docstring)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.sent = 0  # characters released so far

    def update(self, output_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(output_ids)
        safe = len(text)
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1  # an incomplete character: its last bytes come with the next token
        safe = min(safe, self._stop_hold(text[:safe]))
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent : safe], safe
        return piece

    def _stop_hold(self, text: str) -> int:
        """The earliest start of a suffix of `text` that is a proper prefix of a stop string."""
        hold = len(text)
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = min(hold, len(text) - n)
                    break
        return hold

    def finish(self, final_text: str | None) -> str:
        """The rest of the engine's final text."""
        if final_text is None:
            return ""
        piece = final_text[self.sent :]
        self.sent = len(final_text)
        return piece


@dataclass
class _Request:
    rid: str
    queue: asyncio.Queue
    detok: Detokenizer
    want_logprobs: bool
    num_prompt: int
    arrival: float
    sent_tokens: int = 0
    started: bool = False
    first_token_time: float | None = None
    scheduled_time: float | None = None
    unqueued: bool = False  # no longer counted by the admission queue


@dataclass
class _Add:
    prompts: list[list[int]]
    params: list[SamplingParams]
    requests: list[_Request]
    future: Future


@dataclass
class LoopStats:
    """Counters of the loop (read by /metrics); gauges are a snapshot taken after every step."""

    running: int = 0
    waiting: int = 0
    queued_requests: int = 0
    queued_tokens: int = 0
    num_blocks: int = 0
    free_blocks: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefill_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    aborted: int = 0
    spec_drafts: int = 0  # verifications (one per sequence and speculative step)
    spec_proposed: int = 0
    spec_accepted: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class EngineLoop:
    """The engine stepping in one background thread; `start()` it on the server's event loop."""

    def __init__(
        self,
        engine: Engine,
        max_queued_requests: int | None = None,
        max_queued_tokens: int | None = None,
        on_finish: Callable[[Delta], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_queued_requests, self.max_queued_tokens = max_queued_requests, max_queued_tokens
        self.on_finish = on_finish
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._requests: dict[str, _Request] = {}  # engine-thread state
        self._queued = [0, 0]  # accepted without a first token yet: requests, tokens (under _lock)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._streams: dict[str, asyncio.Queue] = {}  # event-loop state: request id -> its queue
        self._stats = LoopStats(
            num_blocks=engine.cache.num_blocks, free_blocks=engine.cache.allocator.num_free
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None  # why the thread died

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> EngineLoop:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # ---- the interface ----------------------------------------------------------------------------
    def new_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def add(
        self, prompts: list[list[int]], params: list[SamplingParams], request_ids: list[str] | None = None
    ) -> list[str]:
        """Queue requests, all or none; raises the engine's RequestError (bad input), `Overloaded`
        or `EngineDead` before anything is queued. Their outputs come from `stream(request_id)`."""
        if not self.alive:
            raise EngineDead("engine: not running")
        tokens = sum(len(p) for p in prompts)
        with self._lock:
            n, t = self._queued
            if self.max_queued_requests is not None and n + len(prompts) > self.max_queued_requests:
                raise Overloaded(
                    f"server busy: {n} requests queued (--max-queued-requests {self.max_queued_requests})"
                )
            if self.max_queued_tokens is not None and t + tokens > self.max_queued_tokens and n > 0:
                raise Overloaded(
                    f"server busy: {t} prompt tokens queued (--max-queued-tokens {self.max_queued_tokens})"
                )
            self._queued = [n + len(prompts), t + tokens]
        ids = request_ids or [self.new_id() for _ in prompts]
        now, shared = time.monotonic(), asyncio.Queue()  # one queue for the whole group (n > 1)
        reqs = [
            _Request(rid, shared, Detokenizer(self.tokenizer, sp.stop), sp.logprobs is not None, len(p), now)
            for rid, p, sp in zip(ids, prompts, params)
        ]
        fut: Future = Future()
        self._inbox.put(_Add(list(prompts), list(params), reqs, fut))
        self._wake.set()
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the caller went away: the add may still land, so abort it
            for rid in ids:
                self.abort(rid)
            self._unqueue(reqs)
            raise
        except BaseException:
            self._unqueue(reqs)
            raise
        for rid in ids:
            self._streams[rid] = shared
        return ids

    async def stream(self, request_ids: list[str]) -> AsyncIterator[Delta]:
        """The Deltas of requests added together, in arrival order, until every one has finished."""
        q = self._streams[request_ids[0]]
        left = set(request_ids)
        try:
            while left:
                delta = await q.get()
                yield delta
                if delta.finished:
                    left.discard(delta.request_id)
        finally:
            for rid in request_ids:
                self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """End a request: it is aborted before the engine's next step and its blocks freed."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def prompt_logprobs(self, prompt: list[int], top_n: int) -> list[dict[int, float] | None]:
        """Per prompt token: {token: logprob} of it (and the top_n) given the tokens before it; None
        for the first. One full forward in the engine thread (between steps)."""
        fut: Future = Future()
        self._inbox.put(("score", prompt, top_n, fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    def stats(self) -> LoopStats:
        """The snapshot of the last step, with the admission queue as it is now."""
        with self._lock:
            self._stats.queued_requests, self._stats.queued_tokens = self._queued
        return self._stats

    # ---- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._snapshot()
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # a bug: every live request gets an error, /health turns 503
            self._die(e)
        finally:
            self._fail_inbox()

    def _die(self, e: BaseException) -> None:
        """The loop thread hit a bug: every live request ends with an error and the loop stops."""
        self.error = e
        traceback.print_exc()
        for r in list(self._requests.values()):
            self._push(r, Delta(r.rid, "", [], None, True, "error", r.num_prompt, error=repr(e)))
        self._requests.clear()
        self._stop.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                self._do_add(cmd)
            elif cmd[0] == "abort":
                self._do_abort(cmd[1])
            elif cmd[0] == "score":
                self._do_score(*cmd[1:])

    def _do_add(self, cmd: _Add) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return  # its caller was cancelled before we got here: nothing to add
        try:
            self.engine.add_requests(cmd.prompts, cmd.params, [r.rid for r in cmd.requests])
        except BaseException as e:
            cmd.future.set_exception(e)
            return
        for r in cmd.requests:
            self._requests[r.rid] = r
        self._stats.prompt_tokens += sum(len(p) for p in cmd.prompts)
        cmd.future.set_result(None)

    def _do_abort(self, rid: str) -> None:
        r = self._requests.pop(rid, None)
        if r is None:
            return
        self.engine.abort_request(rid)
        self._stats.aborted += 1
        self._stats.finished["abort"] = self._stats.finished.get("abort", 0) + 1
        self._unqueue([r])
        self._push(r, Delta(rid, "", [], None, True, "abort", r.num_prompt, r.sent_tokens))

    def _do_score(self, prompt: list[int], top_n: int, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            with torch.inference_mode():
                logits = self.engine.model(torch.tensor([prompt], device=self.engine.cache.data.device))[0]
            logp = logits.float().log_softmax(-1)
            out: list[dict[int, float] | None] = [None]
            for i in range(1, len(prompt)):
                row, t = logp[i - 1], prompt[i]
                entry = {t: float(row[t])}
                if top_n > 0:
                    vals, idx = row.topk(top_n)
                    entry.update({int(k): float(v) for k, v in zip(idx, vals)})
                out.append(entry)
            fut.set_result(out)
        except BaseException as e:
            fut.set_exception(e)

    def _step(self) -> None:
        t0 = time.monotonic()
        outputs = self.engine.step()
        now = time.monotonic()
        for seq in self.engine.scheduler.running:
            r = self._requests.get(seq.request_id)
            if r is not None and r.scheduled_time is None:
                r.scheduled_time = t0
        for out in outputs:
            r = self._requests.get(out.request_id)
            if r is None:
                continue  # aborted meanwhile
            if out.finished:
                self._requests.pop(out.request_id, None)
            self._push(r, self._delta(r, out, now))
        self._snapshot()

    def _delta(self, r: _Request, out: RequestOutput, now: float) -> Delta:
        if r.scheduled_time is None:
            r.scheduled_time = now
        if not r.started:
            r.started, r.first_token_time = True, now
            self._unqueue([r])
        new = out.token_ids[r.sent_tokens :]
        lps = out.logprobs[r.sent_tokens :] if (r.want_logprobs and out.logprobs is not None) else None
        r.sent_tokens = len(out.token_ids)
        st = self._stats
        st.generation_tokens += len(new)
        if out.finished:
            text = r.detok.finish(out.text if out.text is not None else "")
            st.finished[out.finish_reason or "?"] = st.finished.get(out.finish_reason or "?", 0) + 1
            if out.finish_reason == "error":
                self._unqueue([r])
        else:
            text = r.detok.update(out.token_ids)
        err = None if out.error is None else f"{type(out.error).__name__}: {out.error}"
        return Delta(
            r.rid,
            text,
            new,
            lps,
            out.finished,
            out.finish_reason,
            len(out.prompt_token_ids),
            len(out.token_ids),
            getattr(out, "num_cached_tokens", 0) or 0,
            err,
            r.first_token_time,
            r.arrival,
            r.scheduled_time,
        )

    def _push(self, r: _Request, delta: Delta) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(r.queue.put_nowait, delta)
        except RuntimeError:
            pass  # the event loop closed while shutting down
        if delta.finished and self.on_finish is not None:
            self.on_finish(delta)

    def _unqueue(self, reqs: list[_Request]) -> None:
        with self._lock:
            for r in reqs:
                if not r.unqueued:
                    r.unqueued = True
                    self._queued[0] -= 1
                    self._queued[1] -= r.num_prompt

    def _snapshot(self) -> None:
        e, st = self.engine, self._stats
        st.running, st.waiting = len(e.scheduler.running), len(e.scheduler.waiting)
        st.queued_requests, st.queued_tokens = self._queued
        st.free_blocks = e.cache.allocator.num_free
        st.prefill_tokens = e.stats.prefill_tokens
        st.preemptions = e.scheduler.num_preemptions
        st.steps = e.stats.steps
        spec = e.spec_stats  # every verification proposes k drafts
        st.spec_drafts, st.spec_proposed = spec.verifications, spec.verifications * spec.k
        st.spec_accepted = sum(spec.accepted)
        alloc = e.cache.allocator
        if getattr(alloc, "prefix_caching", False):
            st.prefix_queries, st.prefix_hits = alloc.queries, alloc.hits

    def _fail_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            fut = cmd.future if isinstance(cmd, _Add) else (cmd[-1] if cmd[0] == "score" else None)
            if fut is not None and not fut.done():
                fut.set_exception(EngineDead("engine: stopped"))
