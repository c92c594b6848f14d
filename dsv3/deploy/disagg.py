"""Prefill and decode workers of a disaggregated deployment (DESIGN §8, paper §3.4: prefill and
decode run on separate units, each sized for its own phase).

A `PrefillWorker` owns an engine that only prefills: it admits requests, runs their prompts
(chunked, batched, as the engine schedules them), samples each request's first token and then
hands the request off: the blocks of its prompt's KV are copied out (`gather_blocks`), the request
leaves the engine (its blocks are freed at once) and the copy waits in a `KVSender` until the
router names the decode rank. A request that ends at its first token (eos, max_tokens 1) ends there.

A `DecodeWorker` owns an engine built by a factory (`engine_factory()`: a plain `Engine`, or one
rank of an expert-parallel group with the same interface, dsv3.deploy.ep_engine.EPEngine). It
receives a handed-off request's metadata (prompt, tokens so far, sampling state) from the router
and its KV from the prefill rank (`KVReceiver`), then admits it with `Engine.add_prefilled` and
decodes it with the rest of its batch. Timeouts, retries and the fall-back to recomputing the
prefill are decided here (see dsv3.deploy.kv_transfer).

Control (requests, outputs, heartbeats) travels over a `Channel` to the router in the server
process; only KV travels over torch.distributed. Each worker sends a heartbeat with its load
(running/waiting requests, free blocks, KV traffic) every `beat_interval` seconds from a thread,
so a long step is not mistaken for a dead rank.
"""

from __future__ import annotations

import pickle
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any

from dsv3.deploy.kv_transfer import KVReceiver, KVSender, KVTransferError, TransferStats, gather_blocks
from dsv3.infer.engine import Engine
from dsv3.infer.outputs import RequestOutput


def send_msg(conn: Any, msg: Any) -> None:
    """A control message by value (plain pickle). Connection.send would pickle tensors as handles
    to shared memory (torch's multiprocessing reductions), which another machine, or a process
    with another multiprocessing authkey (a torchrun-started rank), cannot open."""
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def recv_msg(conn: Any) -> Any:
    return pickle.loads(conn.recv_bytes())


class Channel:
    """A multiprocessing Connection shared by a worker's threads (a lock around send)."""

    def __init__(self, conn: Any) -> None:
        self.conn, self._lock = conn, threading.Lock()

    def send(self, *msg: Any) -> None:
        with self._lock:
            send_msg(self.conn, msg)

    def recv(self, timeout: float) -> list[tuple]:
        """Every message waiting, after waiting up to `timeout` seconds for the first."""
        out = []
        while self.conn.poll(timeout if not out else 0):
            out.append(recv_msg(self.conn))
        return out


def output_dict(out: RequestOutput) -> dict:
    """A RequestOutput as plain data (its exception as text) for the channel."""
    d = dict(vars(out))
    err = d.pop("error")
    d["error"] = None if err is None else f"{type(err).__name__}: {err}"
    return d


def engine_info(engine: Engine) -> dict:
    """What the router and the HTTP layer read of a rank's engine (sent once, in the hello)."""
    return {
        "max_model_len": engine.max_model_len,
        "num_blocks": engine.cache.num_blocks,
        "block_size": engine.config.block_size,
        "lookahead": engine.scheduler.lookahead,
        "vocab_size": engine.model.config.vocab_size,
        "max_num_seqs": engine.config.max_num_seqs,
        "bytes_per_token": engine.cache.bytes_per_token,
    }


@dataclass
class _Pending:
    """A handed-off request waiting on the decode rank for its KV."""

    request_id: str
    meta: dict
    src: int
    attempt: int
    deadline: float
    t0: float


class _Worker(ABC):
    role = ""

    def __init__(self, rank: int, engine: Engine, channel: Channel, beat_interval: float = 0.2) -> None:
        self.rank, self.engine, self.channel = rank, engine, channel
        self.beat_interval = beat_interval
        self.kv = TransferStats()
        self.stopped = threading.Event()

    def load(self) -> dict:
        e = self.engine
        return {
            "running": len(e.scheduler.running),
            "waiting": len(e.scheduler.waiting),
            "free_blocks": e.cache.allocator.num_free,
            "num_blocks": e.cache.num_blocks,
            "steps": e.stats.steps,
            "prefill_tokens": e.stats.prefill_tokens,
            "decode_tokens": e.stats.decode_tokens,
            "preemptions": e.scheduler.num_preemptions,
            "kv": {f.name: getattr(self.kv, f.name) for f in fields(self.kv) if f.name != "per_request"},
        }

    def _beat(self) -> None:
        while not self.stopped.wait(self.beat_interval):
            try:
                load = self.load()  # read while the main thread steps: a torn read is only skipped
            except Exception:
                continue
            try:
                self.channel.send("beat", self.rank, load)
            except (OSError, EOFError):
                return

    def run(self) -> dict:
        """Serve until the router says stop (or goes away); the final load, with per-request KV figures."""
        self.channel.send("hello", self.rank, self.role, engine_info(self.engine))
        threading.Thread(target=self._beat, name="dsv3-beat", daemon=True).start()
        try:
            while not self.stopped.is_set():
                try:
                    msgs = self.channel.recv(0 if self.busy() else 0.01)
                except (OSError, EOFError):
                    break  # the router is gone
                for msg in msgs:
                    if msg[0] == "stop":
                        self.stopped.set()
                    else:
                        self.handle(msg)
                if not self.stopped.is_set():
                    self.tick()
        finally:
            self.stopped.set()
        final = self.load()
        final["kv"]["per_request"] = list(self.kv.per_request)
        return final

    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def report(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self.channel.send("out", self.rank, [output_dict(o) for o in outputs])

    @abstractmethod
    def handle(self, msg: tuple) -> None:
        """One control message from the router (the role's own kinds)."""

    @abstractmethod
    def tick(self) -> None:
        """One round of the role's work between messages (a step, a pending transfer)."""


class PrefillWorker(_Worker):
    """Prefills requests and hands each off after its first token (see the module docstring)."""

    role = "prefill"

    def __init__(self, rank: int, engine: Engine, channel: Channel, faults: dict | None = None, **kw) -> None:
        super().__init__(rank, engine, channel, **kw)
        if engine.k:
            raise ValueError("speculative: not supported with prefill/decode disaggregation yet")
        self.sender = KVSender(self.kv, faults)
        self._xfers = 0

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, cmd, prompts, params, rids = msg
            try:
                self.engine.add_requests(prompts, params, rids)
                self.channel.send("added", cmd, None, None)
            except Exception as e:  # a refused batch: the router raises it to the caller
                self.channel.send("added", cmd, type(e).__name__, str(e))
        elif kind == "abort":
            self.engine.abort_request(msg[1])
        elif kind == "send":
            _, xfer, dst, attempt = msg
            if not self.sender.send(xfer, dst, attempt):
                self.channel.send("lost", self.rank, xfer)
        elif kind == "release":
            self.sender.release(msg[1])
        elif kind == "score":
            self._score(*msg[1:])

    def _score(self, cmd: int, prompt: list[int], top_n: int) -> None:
        from dsv3.serve.engine_loop import EngineLoop

        fut: Future = Future()
        EngineLoop._do_score(SimpleNamespace(engine=self.engine), prompt, top_n, fut)  # the loop's own scorer
        err = fut.exception()
        self.channel.send("scored", cmd, None if err else fut.result(), None if err is None else repr(err))

    def tick(self) -> None:
        if not self.engine.has_unfinished():
            return
        done, handoff = [], []
        for out in self.engine.step():
            (done if out.finished or len(out.token_ids) != 1 else handoff).append(out)
        self.report(done + handoff)  # every request's first token streams from here
        for out in handoff:
            self._hand_off(out)

    def _hand_off(self, out: RequestOutput) -> None:
        seq = self.engine.scheduler.live[out.request_id]
        n = seq.num_tokens - 1  # the prompt: its KV is computed, the first token's is not
        payload = gather_blocks(self.engine.cache, seq.block_table, n)
        meta = {
            "prompt": seq.prompt,
            "params": seq.params,
            "output_ids": seq.output_ids,
            "generator_state": seq.generator.get_state(),
            "logprobs": seq.logprobs,
            "n_tokens": n,
            "nbytes": payload.numel() * payload.element_size(),
        }
        self.engine.scheduler.finish(seq, "transferred")  # frees its blocks; the copy travels
        xfer, self._xfers = self._xfers, self._xfers + 1
        self.sender.hold(xfer, payload, seq.request_id)
        self.channel.send("prefilled", self.rank, seq.request_id, xfer, meta)


class DecodeWorker(_Worker):
    """Admits handed-off requests with their received KV and decodes them (module docstring)."""

    role = "decode"

    def __init__(
        self,
        rank: int,
        engine_factory: Callable[[], Engine],
        channel: Channel,
        kv_timeout: float = 5.0,
        kv_attempts: int = 2,
        lockstep: bool = False,
        **kw,
    ) -> None:
        """lockstep: step the engine at every turn of the loop, also with nothing to do (one rank of
        an expert-parallel group: its step is a collective of the group)."""
        engine = engine_factory()
        super().__init__(rank, engine, channel, **kw)
        if engine.k:
            raise ValueError("speculative: not supported with prefill/decode disaggregation yet")
        self.kv_timeout, self.kv_attempts, self.lockstep = kv_timeout, kv_attempts, lockstep
        self.receiver = KVReceiver(engine.cache.data.dtype, engine.cache.data.device)
        self.pending: dict[tuple[int, int], _Pending] = {}  # (src, xfer) -> request waiting for its KV

    def busy(self) -> bool:
        return self.lockstep or self.engine.has_unfinished() or bool(self.pending)

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "admit":
            _, rid, meta, src, xfer = msg
            now = time.monotonic()
            self.pending[(src, xfer)] = _Pending(rid, meta, src, 0, now + self.kv_timeout, now)
            self.receiver.expect(src, xfer, 0)
        elif kind == "abort":
            rid = msg[1]
            for key, p in list(self.pending.items()):
                if p.request_id == rid:
                    del self.pending[key]
                    self.channel.send("release", self.rank, p.src, key[1])
            self.engine.abort_request(rid)

    def tick(self) -> None:
        for src, xfer, attempt, payload, err, secs in self.receiver.poll():
            p = self.pending.get((src, xfer))
            if p is None or attempt != p.attempt:
                continue  # a late result of an abandoned attempt: already resent or recomputed
            if payload is not None:
                self.kv.received += 1
                self.kv.bytes_received += payload.numel() * payload.element_size()
                self.kv.recv_seconds += secs
                self.kv.per_request.append(
                    (payload.numel() * payload.element_size(), time.monotonic() - p.t0)
                )
                self._admit(src, xfer, payload)
            elif isinstance(err, KVTransferError) and attempt + 1 < self.kv_attempts:
                self.kv.retries += 1
                p.attempt += 1
                p.deadline = time.monotonic() + self.kv_timeout
                self.receiver.expect(src, xfer, p.attempt)
                self.channel.send("resend", self.rank, src, xfer, p.attempt)
            else:
                self.kv.failed += 1
                self._admit(src, xfer, None)
        now = time.monotonic()
        for (src, xfer), p in list(self.pending.items()):
            if now > p.deadline:
                self.kv.timeouts += 1
                self._admit(src, xfer, None)
        if self.lockstep or self.engine.has_unfinished():
            self.report(self.engine.step())
        if self.lockstep and not (self.engine.has_unfinished() or self.pending):
            time.sleep(0.001)  # an idle group still steps together: not at full spin

    def _admit(self, src: int, xfer: int, kv) -> None:
        """Admit with the received KV, or (kv None) recompute its prefill here; release the sender's copy."""
        p = self.pending.pop((src, xfer))
        m = p.meta
        if kv is None:
            self.kv.fallbacks += 1
        try:
            used = self.engine.add_prefilled(
                m["prompt"],
                m["params"],
                p.request_id,
                m["output_ids"],
                m["generator_state"],
                m["logprobs"],
                kv,
            )
            if kv is not None and not used:
                self.kv.fallbacks += 1  # no seat or blocks free now: it waits and is recomputed
        except Exception as e:
            out = RequestOutput(p.request_id, m["prompt"], m["output_ids"], True, "error", error=e)
            self.report([out])
        self.channel.send("release", self.rank, src, xfer)
