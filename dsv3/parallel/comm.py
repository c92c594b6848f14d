"""Collectives of expert parallelism: all-to-all with exact autograd and a wire format, byte
counters, and errors that name a dead peer instead of hanging (DESIGN §5, paper §3.2.2).

`all_to_all(x, send, recv, link)`: rows of x [S, D], sorted by destination, go to the members of
`link`'s group (send[p] rows to member p); the result [R, D] holds recv[p] rows from each member p,
in member order. Uneven splits are the normal case (the counts are exchanged first, see
`exchange_counts`); gloo supports them for `all_to_all_single` (DESIGN §10). The backward is the
same exchange with send and recv swapped -- the backward of a dispatch is a combine and vice
versa -- so expert-parallel gradients equal the single-process ones.

Wire formats (what actually crosses the network, and what the byte counters see):
  same  the tensor as it is
  bf16  BF16 (the combine of V3)
  fp8   E4M3 values in 1x128 tiles with power-of-2 scales (V3 quantises the dispatch activations
        like the input of the linear after attention, §3.3.3), sent as raw bytes because gloo
        has no float8 collectives, with each row's FP32 scales packed behind it; dequantised on
        arrival. For autograd the quantisation is a straight-through copy.
Re-quantising an FP8-dequantised tensor with power-of-2 scales is exact (the tile maximum is
representable and rescaling by 2^k only shifts exponents), so a second hop adds no error.

Asynchronous exchanges (what DualPipe overlaps, paper §3.2.1 / Figure 4):
`start_all_to_all(x, send, recv, link, ...)` issues the same exchange with `async_op=True` (gloo
runs it in its worker threads, NCCL on its own stream) and returns a `Pending` at once; the caller
runs other computation, then `pending.wait()` returns the received tensor -- equal, values and
gradients, to `all_to_all`'s. Autograd is a Start/Wait pair of Functions joined by a 0-element
`pending.token`: the Wait's backward *starts* the reverse exchange of the gradient, the Start's
backward *waits* for it. So the backward overlaps too when the graph is cut at the token:

    pending = start_all_to_all(x, send, recv, link, "fp8", "bf16", "dispatch")   # forward
    ...  other computation (e.g. the other micro-batch's attention)  ...
    tok = pending.token.detach().requires_grad_()      # a phase boundary (x requires grad)
    y = pending.wait(tok)                              # next phase starts from y

    loss_after(y).backward()                           # backward: reverse exchange started,
    ...  other computation (e.g. the other micro-batch's MLP forward)  ...   # tok.grad arrived
    torch.autograd.backward(pending.token, tok.grad)   # waits for it; x.grad follows

Without a cut (`y = pending.wait()`) the backward is correct and synchronous: autograd runs the
Start's backward right after the Wait's. Exchanges on one group must be started in the same order
on every rank (as any collective); waits may come in any order, and several may be in flight.
Every wait, forward or backward, is bounded by `link.timeout` (on CUDA by the process group's
watchdog: a bounded wait would block the CPU) and raises `PeerFailure`; bytes are counted when an
exchange starts. `Link.latency` (default: DSV3_A2A_LATENCY seconds, else 0) is a test and
benchmark hook: a dispatch/combine exchange (not "meta") completes no earlier than that long after
it started, so a synchronous call pays it in full and an overlapped one hides it.

Shapes: S rows sent, R rows received, D row width, Dt = ceil(D / 128) scales per row, P members.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dsv3.fp8.quant import dequantize_tiles, quantize_tiles

WIRES = ("same", "bf16", "fp8")
T = TypeVar("T")


class PeerFailure(RuntimeError):
    """A collective failed or timed out: another rank died, hung, or disagreed on the exchange."""


def run_collective(what: str, members: list[int], timeout: float | None, fn: Callable[[], T]) -> T:
    """Run one collective; turn the backend's error into one that says what happened and where."""
    try:
        return fn()
    except RuntimeError as e:
        me = dist.get_rank() if dist.is_initialized() else 0
        limit = f"{timeout:g} s" if timeout is not None else "the process group's timeout"
        raise PeerFailure(
            f"rank {me}: {what} of ranks {members} failed: a peer process died or did not answer "
            f"within {limit} (parallel.timeout, DSV3_DIST_TIMEOUT). Check the other ranks' output. "
            f"Backend error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


@dataclass
class CommStats:
    """Bytes this rank sent to other ranks (itself excluded), by "<what>.<intra|inter>":
    what = dispatch, combine, dispatch_grad, combine_grad, meta (counts and routing metadata)."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: int = 0
    exchanges: int = 0  # dispatch/combine exchanges (and their gradients') issued: not "meta"
    waited: float = 0.0  # seconds blocked finishing them (the injected latency included)

    def add(self, what: str, scope: str, n: int) -> None:
        self.sent[f"{what}.{scope}"] += n

    def total(self, scope: str | None = None, what: str | None = None) -> int:
        return sum(
            v
            for k, v in self.sent.items()
            if (scope is None or k.endswith("." + scope)) and (what is None or k.startswith(what + "."))
        )

    def reset(self) -> None:
        self.sent.clear()
        self.calls = 0
        self.exchanges, self.waited = 0, 0.0


@dataclass
class Link:
    """A process group used for exchanges: its members (global ranks, in group order), the node
    of each, and the counters its traffic goes to."""

    name: str
    group: dist.ProcessGroup | None
    members: list[int]
    rank: int
    nodes: list[int]
    stats: CommStats
    timeout: float | None = None
    latency: float | None = None  # injected seconds per dispatch/combine exchange; None: DSV3_A2A_LATENCY

    @property
    def index(self) -> int:
        return self.members.index(self.rank)

    @property
    def size(self) -> int:
        return len(self.members)

    def count(self, what: str, rows: list[int], row_bytes: int) -> None:
        me = self.index
        for p, n in enumerate(rows):
            if p != me and n:
                self.stats.add(what, "intra" if self.nodes[p] == self.nodes[me] else "inter", n * row_bytes)
        self.stats.calls += 1

    def run(self, what: str, fn: Callable[[], T]) -> T:
        return run_collective(f"{what} in group '{self.name}'", self.members, self.timeout, fn)

    def delay(self, what: str) -> float:
        """Seconds an exchange of `what` takes at least (the injected latency; 0 for metadata)."""
        if what == "meta":
            return 0.0
        return injected_latency() if self.latency is None else self.latency


def injected_latency() -> float:
    """DSV3_A2A_LATENCY (seconds, default 0): read at each call, so a launcher's environment counts."""
    raw = os.environ.get("DSV3_A2A_LATENCY", "")
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        from dsv3.config import ConfigError

        raise ConfigError(f"DSV3_A2A_LATENCY: expected seconds >= 0, got {raw!r}")
    return value


# ---- encode / exchange / decode ------------------------------------------------------------------------
def _encode(x: torch.Tensor, wire: str) -> torch.Tensor:
    if wire == "same":
        return x.contiguous()
    if wire == "bf16":
        return x.to(torch.bfloat16).contiguous()
    if wire == "fp8":
        q, scale = quantize_tiles(x, pow2=True)  # (S, D) E4M3, (S, Dt) FP32
        return torch.cat([q.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=1)
    raise ValueError(f"wire format: expected one of {WIRES}, got {wire!r}")


def _decode(payload: torch.Tensor, wire: str, width: int, dtype: torch.dtype) -> torch.Tensor:
    if wire != "fp8":
        return payload.to(dtype)
    q = payload[:, :width].contiguous().view(torch.float8_e4m3fn)
    scale = payload[:, width:].contiguous().view(torch.float32)
    return dequantize_tiles(q, scale, dtype=dtype)


def _row_bytes(t: torch.Tensor) -> int:
    return t.element_size() * math.prod(t.shape[1:])


@dataclass
class _InFlight:
    """One issued exchange: the backend's work handle (None once complete), the send buffer (kept
    alive while in flight), the receive buffer, how to decode it, and the earliest time it may
    complete (the injected latency)."""

    work: Any
    payload: torch.Tensor | None
    out: torch.Tensor
    wire: str
    width: int
    dtype: torch.dtype
    link: Link
    what: str
    ready_at: float

    def done(self) -> bool:
        """Complete without waiting (the caller may poll)."""
        work_done = self.work is None or self.work.is_completed()
        return work_done and time.monotonic() >= self.ready_at

    def finish(self) -> torch.Tensor:
        """Wait (bounded by the link's timeout; a failed peer raises PeerFailure) and decode."""
        start = time.perf_counter()
        if self.work is not None:
            work, self.work = self.work, None
            # On CPU (gloo) the wait blocks this thread: bound it by the link's timeout. On CUDA a
            # plain wait only orders the current stream after the exchange; a timeout would block
            # the CPU until the exchange ends, and the process group's watchdog bounds it anyway.
            bounded = self.link.timeout and self.out.device.type == "cpu"
            limit = timedelta(seconds=self.link.timeout) if bounded else None
            self.link.run(
                f"all-to-all ({self.what}) wait", lambda: work.wait(limit) if limit else work.wait()
            )
        self.payload = None  # sent: the buffer may go
        _sleep_until(self.ready_at)  # the injected latency not yet hidden behind other work
        if self.what != "meta":
            self.link.stats.waited += time.perf_counter() - start
        return _decode(self.out, self.wire, self.width, self.dtype)


def _sleep_until(deadline: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(left)


def _issue(
    x: torch.Tensor, send: list[int], recv: list[int], link: Link, wire: str, what: str, async_op: bool
) -> _InFlight:
    """Encode and send; async_op=True returns while the exchange is in flight."""
    payload = _encode(x, wire)
    out = payload.new_empty((sum(recv), *payload.shape[1:]))
    link.count(what, send, _row_bytes(payload))
    ready_at = time.monotonic() + link.delay(what)
    label = f"all-to-all ({what})" + (" start" if async_op else "")
    start = time.perf_counter()
    work = link.run(
        label, lambda: dist.all_to_all_single(out, payload, recv, send, group=link.group, async_op=async_op)
    )
    if what != "meta":
        link.stats.exchanges += 1
    if not async_op:  # a blocking exchange returns complete: the injected latency is paid here
        _sleep_until(ready_at)
        if what != "meta":
            link.stats.waited += time.perf_counter() - start
    return _InFlight(work, payload, out, wire, x.shape[-1], x.dtype, link, what, ready_at)


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], link: Link, wire: str, what: str):
    return _issue(x, send, recv, link, wire, what, async_op=False).finish()


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, link, wire, grad_wire, what):  # type: ignore[override]
        ctx.args = (send, recv, link, grad_wire, what)
        return _exchange(x, send, recv, link, wire, what)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        send, recv, link, grad_wire, what = ctx.args
        back = _exchange(grad.contiguous(), recv, send, link, grad_wire, what + "_grad")
        return back, None, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    send: list[int],
    recv: list[int],
    link: Link,
    wire: str = "same",
    grad_wire: str = "same",
    what: str = "dispatch",
) -> torch.Tensor:
    """x [S, D] rows sorted by destination -> [sum(recv), D]; differentiable (backward: the reverse
    exchange in `grad_wire`)."""
    return _AllToAll.apply(x, send, recv, link, wire, grad_wire, what)


# ---- asynchronous: start now, wait later (module docstring) ------------------------------------------------
@dataclass
class _Exchange:
    """What the Start and Wait of one asynchronous all-to-all share: the arguments and the
    exchanges in flight (the forward's, then the backward's)."""

    send: list[int]
    recv: list[int]
    link: Link
    wire: str
    grad_wire: str
    what: str
    forward: _InFlight | None = None
    backward: _InFlight | None = None


class _Start(torch.autograd.Function):
    """Forward: issue the exchange, return the token. Backward: wait for the gradient's reverse
    exchange that the Wait's backward started."""

    @staticmethod
    def forward(ctx, x, ex):  # type: ignore[override]
        ctx.ex = ex
        ex.forward = _issue(x, ex.send, ex.recv, ex.link, ex.wire, ex.what, async_op=True)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _token_grad):  # type: ignore[override]
        ex: _Exchange = ctx.ex
        if ex.backward is None:
            raise RuntimeError(f"all-to-all ({ex.what}): backward of the start before that of the wait")
        back, ex.backward = ex.backward, None
        return back.finish(), None


class _Wait(torch.autograd.Function):
    """Forward: wait for the exchange, return the received rows. Backward: start the reverse
    exchange of the gradient (in `grad_wire`) and return at once."""

    @staticmethod
    def forward(ctx, token, ex):  # type: ignore[override]
        ctx.ex = ex
        inflight, ex.forward = ex.forward, None
        return inflight.finish()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ex: _Exchange = ctx.ex
        ex.backward = _issue(
            grad.contiguous(), ex.recv, ex.send, ex.link, ex.grad_wire, ex.what + "_grad", async_op=True
        )
        return grad.new_zeros(0), None


class Pending:
    """An all-to-all in flight (from `start_all_to_all`). `wait()` returns the received rows;
    `token` is the autograd link between start and wait, where a phase boundary may cut the graph
    so that the backward's reverse exchange overlaps too (module docstring)."""

    def __init__(self, token: torch.Tensor, ex: _Exchange) -> None:
        self.token = token
        self._ex = ex
        self._result: torch.Tensor | None = None

    def done(self) -> bool:
        """True when wait() would not block (the exchange, and its injected latency, are over)."""
        return self._result is not None or self._ex.forward is None or self._ex.forward.done()

    def wait(self, token: torch.Tensor | None = None) -> torch.Tensor:
        """[sum(recv), D]: the received rows (the same tensor on a second call). `token`: the
        detached copy of `self.token` that a phase boundary made, to cut the graph there."""
        if self._result is None:
            self._result = _Wait.apply(self.token if token is None else token, self._ex)
        return self._result


def start_all_to_all(
    x: torch.Tensor,
    send: list[int],
    recv: list[int],
    link: Link,
    wire: str = "same",
    grad_wire: str = "same",
    what: str = "dispatch",
) -> Pending:
    """`all_to_all`, started: returns while the rows are in flight; `.wait()` gives the same result,
    with the same gradients (the backward's reverse exchange is started by the wait's backward and
    waited for by the start's)."""
    if wire not in WIRES or grad_wire not in WIRES:  # before anything is sent: no rank is left waiting
        raise ValueError(f"wire format: expected one of {WIRES}, got {wire!r} / {grad_wire!r}")
    ex = _Exchange(list(send), list(recv), link, wire, grad_wire, what)
    return Pending(_Start.apply(x, ex), ex)


def exchange_rows(x: torch.Tensor, send: list[int], recv: list[int], link: Link, what: str = "meta"):
    """Non-differentiable all-to-all of routing metadata (integer rows)."""
    return _exchange(x, send, recv, link, "same", what)


def exchange_counts(counts: torch.Tensor, link: Link) -> torch.Tensor:
    """counts [P, c] (row p: what I send to member p) -> [P, c] (row p: what member p sends me)."""
    P = link.size
    return _exchange(counts.contiguous(), [1] * P, [1] * P, link, "same", "meta")


# ---- the naive alternative: all-gather every token, reduce-scatter the outputs ----------------------------
class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, link):  # type: ignore[override]
        ctx.link = link
        x = x.contiguous()
        out = x.new_empty((link.size * x.shape[0], *x.shape[1:]))
        link.count("dispatch", [x.shape[0]] * link.size, _row_bytes(x))
        link.run("all-gather", lambda: dist.all_gather_single(out, x, group=link.group))
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _reduce_scatter(grad.contiguous(), ctx.link, "dispatch_grad"), None


def _reduce_scatter(x: torch.Tensor, link: Link, what: str) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // link.size, *x.shape[1:]))
    link.count(what, [out.shape[0]] * link.size, _row_bytes(out))
    link.run("reduce-scatter", lambda: dist.reduce_scatter_single(out, x, group=link.group))
    return out


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, link):  # type: ignore[override]
        ctx.link = link
        return _reduce_scatter(x.contiguous(), link, "combine")

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        link, grad = ctx.link, grad.contiguous()
        out = grad.new_empty((link.size * grad.shape[0], *grad.shape[1:]))
        link.count("combine_grad", [grad.shape[0]] * link.size, _row_bytes(grad))
        link.run("all-gather", lambda: dist.all_gather_single(out, grad, group=link.group))
        return out, None


def all_gather_rows(x: torch.Tensor, link: Link) -> torch.Tensor:
    """x [S, D] on every member (equal S) -> [P*S, D] in member order; backward: reduce-scatter."""
    return _AllGather.apply(x, link)


def reduce_scatter_rows(x: torch.Tensor, link: Link) -> torch.Tensor:
    """x [P*S, D] partial sums on every member -> [S, D] summed block of this member."""
    return _ReduceScatter.apply(x, link)
