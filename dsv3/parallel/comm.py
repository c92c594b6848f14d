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

Shapes: S rows sent, R rows received, D row width, Dt = ceil(D / 128) scales per row, P members.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

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


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], link: Link, wire: str, what: str):
    payload = _encode(x, wire)
    out = payload.new_empty((sum(recv), *payload.shape[1:]))
    link.count(what, send, _row_bytes(payload))
    link.run(
        f"all-to-all ({what})", lambda: dist.all_to_all_single(out, payload, recv, send, group=link.group)
    )
    return _decode(out, wire, x.shape[-1], x.dtype)


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
