"""The router of a disaggregated deployment, in the server process (DESIGN §8, paper §3.4).

`Router` is the server's engine interface (`EngineLoop`: add / stream / abort / prompt_logprobs /
stats, the HTTP layer is unchanged) over prefill and decode ranks instead of one in-process engine.
Its thread routes requests and relays outputs; the ranks' workers (dsv3.deploy.disagg) talk to it
over one control channel each (multiprocessing connections, as vLLM's engine core does), while KV
moves between the ranks over torch.distributed.

Balancing, as DeepSeek describes it: a request's prefill goes to the prefill rank with the fewest
prompt tokens outstanding (prefill cost grows with prompt tokens); when its prefill is done, its
decode goes to the decode rank with the lowest `decode_load` = KV-cache usage (blocks in use at the
last heartbeat plus those of requests routed to it since, over its blocks) + request count (over
its seats), both fractions of the rank's capacity; ties go to the lower rank.

Health: a rank is dead when its channel closes, its process exits, or no heartbeat came for
`health_timeout` seconds (a frozen or stopped process). Nothing is routed to a dead rank; every
request it held (prefilling, waiting for its KV, decoding) ends with finish_reason "error" naming
the rank, within that bound; the server and the other ranks keep serving. `alive` (and /health)
stays true while at least one prefill and one decode rank live.

Shapes: none (control only).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from dsv3.deploy.disagg import recv_msg, send_msg
from dsv3.infer.outputs import RequestOutput
from dsv3.infer.scheduler import RequestError
from dsv3.serve.engine_loop import Delta, EngineDead, EngineLoop, LoopStats, _Add


@dataclass
class RankState:
    """The router's view of one rank."""

    rank: int
    role: str  # "prefill" or "decode"
    conn: Any  # its control channel (a multiprocessing Connection)
    info: dict  # engine_info of its hello
    process: Any = None  # a local multiprocessing.Process, when the router's launcher started it
    alive: bool = True
    reason: str = ""  # why it was declared dead
    last_beat: float = field(default_factory=time.monotonic)
    load: dict = field(default_factory=dict)  # its last heartbeat
    requests: set[str] = field(default_factory=set)  # request ids it holds now
    outstanding_tokens: int = 0  # prefill: prompt tokens routed to it and not prefilled yet
    blocks_since_beat: int = 0  # decode: blocks of requests routed to it since its last heartbeat
    served: int = 0  # requests routed to it in total
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, *msg: Any) -> bool:
        with self._lock:
            try:
                send_msg(self.conn, msg)
                return True
            except (OSError, EOFError, ValueError):
                return False

    def decode_load(self) -> float:
        nb = max(1, self.info["num_blocks"])
        used = nb - self.load.get("free_blocks", nb) + self.blocks_since_beat
        return used / nb + len(self.requests) / max(1, self.info["max_num_seqs"])


@dataclass
class _Route:
    prefill: int
    tokens: int
    decode: int | None = None


class Router(EngineLoop):
    """EngineLoop's interface over prefill and decode ranks (see the module docstring)."""

    def __init__(
        self,
        ranks: list[RankState],
        tokenizer=None,
        max_queued_requests: int | None = None,
        max_queued_tokens: int | None = None,
        health_timeout: float = 5.0,
        on_stop=None,
    ) -> None:
        self.ranks = {r.rank: r for r in ranks}
        self.prefill = [r for r in ranks if r.role == "prefill"]
        self.decode = [r for r in ranks if r.role == "decode"]
        if not self.prefill or not self.decode:
            raise ValueError("ranks: a deployment needs at least one prefill and one decode rank")
        self.health_timeout, self.on_stop = health_timeout, on_stop
        info = self.decode[0].info
        # what the HTTP layer reads of `loop.engine`: the limits of a decode rank (all are alike)
        self.engine = SimpleNamespace(
            max_model_len=info["max_model_len"],
            cache=SimpleNamespace(num_blocks=info["num_blocks"]),
            config=SimpleNamespace(block_size=info["block_size"]),
            scheduler=SimpleNamespace(lookahead=info["lookahead"]),
            model=SimpleNamespace(config=SimpleNamespace(vocab_size=info["vocab_size"])),
        )
        self.tokenizer = tokenizer
        self.max_queued_requests, self.max_queued_tokens = max_queued_requests, max_queued_tokens
        self.on_finish = None
        self._inbox: queue.Queue = queue.Queue()
        self._msgs: queue.Queue = queue.Queue()  # (rank, message) from the reader threads
        self._wake = threading.Event()
        self._requests: dict = {}
        self._routes: dict[str, _Route] = {}
        self._adds: dict[int, tuple[_Add, int]] = {}
        self._scores: dict[int, tuple[Future, int]] = {}
        self._cmds = itertools.count()
        self._queued = [0, 0]
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._streams: dict = {}
        self._stats = LoopStats(num_blocks=sum(r.info["num_blocks"] for r in self.decode))
        self.final: dict[int, dict] = {}  # each rank's last report when it stopped
        self._loop = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        for r in ranks:
            threading.Thread(target=self._read, args=(r,), name=f"dsv3-rank-{r.rank}", daemon=True).start()

    # ---- lifecycle --------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        up = super().alive
        return up and any(r.alive for r in self.prefill) and any(r.alive for r in self.decode)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        for r in self.ranks.values():
            r.send("stop")
        if self.on_stop is not None:
            self.on_stop()
        self._drain_messages()  # the ranks' final reports (`final`)

    def _read(self, r: RankState) -> None:
        while True:
            try:
                msg = recv_msg(r.conn)
            except (OSError, EOFError):
                self._msgs.put((r.rank, ("eof",)))
                self._wake.set()
                return
            self._msgs.put((r.rank, msg))
            self._wake.set()

    # ---- the router thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                self._drain_messages()
                self._check_health()
                self._snapshot()
                self._wake.wait(0.05)
                self._wake.clear()
        except BaseException as e:  # a bug: every live request gets an error, /health turns 503
            self._die(e)
        finally:
            self._fail_inbox()

    def _do_add(self, cmd: _Add) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return
        live = [r for r in self.prefill if r.alive]
        if not live:
            cmd.future.set_exception(EngineDead("engine: no prefill rank alive"))
            return
        p = min(live, key=lambda r: (r.outstanding_tokens, r.rank))
        cid = next(self._cmds)
        self._adds[cid] = (cmd, p.rank)
        if not p.send("add", cid, cmd.prompts, cmd.params, [r.rid for r in cmd.requests]):
            del self._adds[cid]
            cmd.future.set_exception(EngineDead(f"engine: prefill rank {p.rank} unreachable"))

    def _added(self, rank: int, cid: int, etype: str | None, emsg: str | None) -> None:
        cmd, _ = self._adds.pop(cid)
        if etype is not None:
            err = RequestError(emsg) if etype in ("RequestError", "SamplingError") else RuntimeError(emsg)
            cmd.future.set_exception(err)
            return
        p = self.ranks[rank]
        for r, prompt in zip(cmd.requests, cmd.prompts):
            self._requests[r.rid] = r
            self._routes[r.rid] = _Route(rank, len(prompt))
            p.requests.add(r.rid)
            p.outstanding_tokens += len(prompt)
            p.served += 1
        self._stats.prompt_tokens += sum(len(p) for p in cmd.prompts)
        cmd.future.set_result(None)

    def _do_abort(self, rid: str) -> None:
        r = self._requests.pop(rid, None)
        if r is None:
            return
        for rank in self._forget(rid):
            self.ranks[rank].send("abort", rid)
        self._stats.aborted += 1
        self._stats.finished["abort"] = self._stats.finished.get("abort", 0) + 1
        self._unqueue([r])
        self._push(r, Delta(rid, "", [], None, True, "abort", r.num_prompt, r.sent_tokens))

    def _do_score(self, prompt: list[int], top_n: int, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        live = [r for r in self.prefill if r.alive]
        if not live:
            fut.set_exception(EngineDead("engine: no prefill rank alive"))
            return
        p = min(live, key=lambda r: (r.outstanding_tokens, r.rank))
        cid = next(self._cmds)
        self._scores[cid] = (fut, p.rank)
        p.send("score", cid, prompt, top_n)

    def _forget(self, rid: str) -> list[int]:
        """Drop a request's routing state; the ranks that held it."""
        route = self._routes.pop(rid, None)
        if route is None:
            return []
        held = []
        for rank in (route.prefill, route.decode):  # decode -1: prefilled, no decode rank chosen yet
            if rank is not None and rank >= 0 and rid in self.ranks[rank].requests:
                self.ranks[rank].requests.discard(rid)
                held.append(rank)
        if route.decode is None:  # still prefilling
            self.ranks[route.prefill].outstanding_tokens -= route.tokens
        return held

    def _drain_messages(self) -> None:
        while True:
            try:
                rank, msg = self._msgs.get_nowait()
            except queue.Empty:
                return
            kind, r = msg[0], self.ranks[rank]
            if kind == "beat":
                r.load, r.last_beat, r.blocks_since_beat = msg[2], time.monotonic(), 0
            elif kind == "out":
                self._outputs(rank, msg[2])
            elif kind == "prefilled":
                self._prefilled(rank, *msg[2:])
            elif kind == "added":
                self._added(rank, *msg[1:])
            elif kind == "resend":  # (resend, decode rank, src, xfer, attempt)
                self.ranks[msg[2]].send("send", msg[3], rank, msg[4])
            elif kind == "release":  # (release, decode rank, src, xfer)
                self.ranks[msg[2]].send("release", msg[3])
            elif kind == "scored":
                fut, _ = self._scores.pop(msg[1])
                if msg[3] is None:
                    fut.set_result(msg[2])
                else:
                    fut.set_exception(RuntimeError(msg[3]))
            elif kind == "final":
                self.final[rank] = msg[2]
            elif kind == "eof":
                if r.alive and not self._stop.is_set():
                    self._died(r, "its control channel closed")

    def _outputs(self, rank: int, outs: list[dict]) -> None:
        now = time.monotonic()
        for d in outs:
            rid = d["request_id"]
            r, route = self._requests.get(rid), self._routes.get(rid)
            if r is None or route is None or rank not in (route.prefill, route.decode):
                continue  # aborted, failed, or a stale output of a rank that no longer holds it
            if route.decode is None:  # the prefill rank's first token (or its end)
                self.ranks[rank].outstanding_tokens -= route.tokens
                route.decode = -1  # prefilled; the decode rank is chosen when its KV is ready
            err = d.pop("error")
            out = RequestOutput(**d, error=None if err is None else RuntimeError(err))
            if out.finished:
                self._requests.pop(rid, None)
                self._forget(rid)
            self._push(r, self._delta(r, out, now))

    def _prefilled(self, rank: int, rid: str, xfer: int, meta: dict) -> None:
        p, route = self.ranks[rank], self._routes.get(rid)
        p.requests.discard(rid)
        if route is None or rid not in self._requests:  # aborted or failed meanwhile
            p.send("release", xfer)
            return
        live = [d for d in self.decode if d.alive]
        if not live:
            p.send("release", xfer)
            self._fail(rid, "no decode rank alive")
            return
        d = min(live, key=lambda s: (s.decode_load(), s.rank))
        route.decode = d.rank
        d.requests.add(rid)
        d.served += 1
        d.blocks_since_beat += -(-(meta["n_tokens"] + 1) // d.info["block_size"])
        d.send("admit", rid, meta, rank, xfer)
        p.send("send", xfer, d.rank, 0)

    def _fail(self, rid: str, why: str) -> None:
        r = self._requests.pop(rid, None)
        self._forget(rid)
        if r is None:
            return
        self._stats.finished["error"] = self._stats.finished.get("error", 0) + 1
        self._unqueue([r])
        self._push(r, Delta(rid, "", [], None, True, "error", r.num_prompt, r.sent_tokens, error=why))

    # ---- health -----------------------------------------------------------------------------------
    def _check_health(self) -> None:
        now = time.monotonic()
        for r in self.ranks.values():
            if not r.alive:
                continue
            if r.process is not None and r.process.exitcode is not None:
                self._died(r, f"its process exited with code {r.process.exitcode}")
            elif now - r.last_beat > self.health_timeout:
                self._died(r, f"no heartbeat for {now - r.last_beat:.1f} s")

    def _died(self, r: RankState, reason: str) -> None:
        """Stop routing to r; fail what it held (requests, pending adds and scores)."""
        r.alive, r.reason = False, reason
        why = f"{r.role} rank {r.rank} died ({reason})"
        print(f"dsv3 router: {why}; its requests fail, serving goes on", flush=True)
        for rid in list(r.requests):
            self._fail(rid, why)
        for cid, (cmd, rank) in list(self._adds.items()):
            if rank == r.rank:
                del self._adds[cid]
                cmd.future.set_exception(EngineDead(f"engine: {why}"))
        for cid, (fut, rank) in list(self._scores.items()):
            if rank == r.rank:
                del self._scores[cid]
                fut.set_exception(EngineDead(f"engine: {why}"))

    # ---- stats ------------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        st, live = self._stats, [r for r in self.ranks.values() if r.alive]
        loads = [r.load for r in live]
        st.running = sum(x.get("running", 0) for x in loads)
        st.waiting = sum(x.get("waiting", 0) for x in loads)
        st.queued_requests, st.queued_tokens = self._queued
        st.num_blocks = sum(r.info["num_blocks"] for r in self.decode if r.alive)
        st.free_blocks = sum(r.load.get("free_blocks", r.info["num_blocks"]) for r in self.decode if r.alive)
        st.prefill_tokens = sum(x.get("prefill_tokens", 0) for x in loads)
        st.preemptions = sum(x.get("preemptions", 0) for x in loads)
        st.steps = sum(x.get("steps", 0) for x in loads)

    def rank_stats(self) -> list[dict]:
        """Per rank: role, health, requests held and routed, KV traffic (for /metrics)."""
        out = []
        for r in self.ranks.values():
            kv = r.load.get("kv", {})
            out.append({
                "rank": r.rank, "role": r.role, "alive": r.alive, "requests": len(r.requests),
                "served": r.served, "kv_bytes_sent": kv.get("bytes_sent", 0),
                "kv_bytes_received": kv.get("bytes_received", 0), "kv_retries": kv.get("retries", 0),
                "kv_timeouts": kv.get("timeouts", 0), "kv_fallbacks": kv.get("fallbacks", 0),
            })  # fmt: skip
        return out
