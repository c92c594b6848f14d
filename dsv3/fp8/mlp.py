"""SwiGLU MLPs (dense, shared and routed experts) with FP8 GEMMs and a recomputed SwiGLU (§3.3.3).

    g = x W1,  u = x W3,  h = silu(g) * u,  y = h W2           (per expert, rows sorted by expert)

One autograd Function runs all nine GEMMs of the block (Fprop, Dgrad, Wgrad of W1, W3, W2) through
`dsv3.fp8.operand`, so the dense MLP, the shared experts and the grouped routed experts share it (a
dense MLP is one expert). What it keeps for backward is the paper's choice: the FP8 input x and the
FP8 inputs of SwiGLU (g, u); h = silu(g) * u is recomputed in backward instead of being stored.

Routed experts (§3.3.3): their input (the dispatched activation) and the gradient of their output
(the gradient before the down-projection, sent back through the combine) use power-of-2 scales.
The grouped GEMM loops over the experts' row ranges: 1x128 tiles are per row, so the activations
are quantised once for all experts, and Wgrad's 128x1 tiles are cut per expert (a tile never spans
two experts, as in a grouped FP8 kernel whose groups are separate GEMMs).

Shapes: M rows (tokens, sorted by expert for routed experts), D dim, I hidden size, E experts.
Weights are [E, in, out] (the fused layout of `GroupedExperts`); a dense MLP passes its nn.Linear
weights as transposed views [1, D, I] / [1, I, D].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv3.fp8.operand import FP8, GemmConfig, Operand, act, cache_act, mm, retile, weight
from dsv3.model.layers import MLP, Submit, accumulate_grad
from dsv3.model.moe import GroupedExperts


def _rows(op: Operand, s: int, e: int) -> Operand:
    return Operand(op.data[s:e], None if op.scale is None else op.scale[s:e])


def _expert(op: Operand, i: int) -> Operand:
    return Operand(op.data[i], None if op.scale is None else op.scale[i], op.blocks)


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for i, c in enumerate(counts):
        if c:
            out.append((i, start, start + c))
        start += c
    return out


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w3, w2, counts: list[int], cfg: GemmConfig, defer):
        """x [M, D], w1/w3 [E, D, I], w2 [E, I, D] -> y [M, D]."""
        xq, x_cache = cache_act(x, cfg)
        q1, q3, q2 = weight(w1, cfg), weight(w3, cfg), weight(w2, cfg)
        g = x.new_empty(x.shape[0], w1.shape[-1], dtype=torch.float32)  # (M, I)
        u = torch.empty_like(g)
        y = x.new_empty(x.shape[0], w2.shape[-1], dtype=torch.float32)
        for i, s, e in _segments(counts):
            xs = _rows(xq, s, e)
            g[s:e] = mm(xs, _expert(q1, i).t())  # (Me, I), BF16-rounded
            u[s:e] = mm(xs, _expert(q3, i).t())
        h = act(F.silu(g) * u, cfg)  # (M, I)
        for i, s, e in _segments(counts):
            y[s:e] = mm(_rows(h, s, e), _expert(q2, i).t())  # (Me, D)
        gq, uq = act(g, cfg), act(u, cfg)  # the SwiGLU inputs, cached in FP8 (§3.3.3)
        ctx.cfg, ctx.counts, ctx.defer = cfg, counts, defer
        ctx.save_for_backward(x_cache.data, x_cache.scale, gq.data, gq.scale, uq.data, uq.scale, w1, w3, w2)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xd, xs, gd, gs, ud, us, w1, w3, w2 = ctx.saved_tensors
        cfg: GemmConfig = ctx.cfg
        x_cache = Operand(xd, xs)
        g, u = Operand(gd, gs).dequant(), Operand(ud, us).dequant()  # (M, I) FP32
        sig = torch.sigmoid(g)
        silu = g * sig
        h = silu * u  # recomputed, never stored
        q1, q3, q2 = weight(w1, cfg), weight(w3, cfg), weight(w2, cfg)
        dyq = act(dy, cfg, pow2=cfg.pow2_grad)  # (M, D), tiles along D (Dgrad)
        dh = torch.empty_like(g)
        for i, s, e in _segments(ctx.counts):
            dh[s:e] = mm(_rows(dyq, s, e), _expert(q2, i))  # dy @ W2^T: (Me, I)
        du = dh * silu
        dg = dh * u * sig * (1 + g * (1 - sig))  # d silu(g) / dg = sig * (1 + g (1 - sig))
        dgq, duq = act(dg, cfg), act(du, cfg)
        dx = dy.new_zeros(dy.shape[0], w1.shape[1], dtype=torch.float32)
        segments = _segments(ctx.counts)
        for i, s, e in segments:  # Dgrad: both products accumulate in FP32, the sum is rounded once
            dx[s:e] = mm(_rows(dgq, s, e), _expert(q1, i), torch.float32)
            dx[s:e] += mm(_rows(duq, s, e), _expert(q3, i), torch.float32)

        def wgrad() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            dw1, dw3, dw2 = torch.zeros_like(w1), torch.zeros_like(w3), torch.zeros_like(w2)
            x_pow2 = cfg.pow2_input or cfg.cache_e5m6
            for i, s, e in segments:  # every operand re-tiled along this expert's rows (128x1 tiles)
                x_t = retile(_rows(x_cache, s, e), cfg, pow2=x_pow2)  # (D, Me)
                dw1[i] = mm(x_t, act(dg[s:e].t(), cfg), torch.float32)  # x^T dg: (D, I)
                dw3[i] = mm(x_t, act(du[s:e].t(), cfg), torch.float32)
                dy_t = act(dy[s:e].t(), cfg, pow2=cfg.pow2_grad)  # (D, Me)
                dw2[i] = mm(act(h[s:e].t(), cfg), dy_t, torch.float32)  # h^T dy: (I, D)
            return dw1, dw3, dw2

        dws: tuple[torch.Tensor | None, ...] = (None, None, None)
        if ctx.defer is None:
            dws = wgrad()
        else:
            ctx.defer(wgrad)  # a split backward: the weight gradients are computed later (W)
        return dx.bfloat16().to(dy.dtype), *dws, None, None, None


def swiglu_experts(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    counts: list[int],
    cfg: GemmConfig = FP8,
    defer: Callable[[Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], None] | None = None,
) -> torch.Tensor:
    """x [M, D] (rows grouped by expert, counts[i] rows for expert i), w1/w3 [E, D, I], w2 [E, I, D]
    -> [M, D]: each expert's SwiGLU MLP with the GEMM precision of `cfg`.

    `defer` (a split backward, `dsv3.parallel.pipeline.wgrad`): the backward hands it the Wgrad
    work (a function returning dW1, dW3, dW2, shaped like w1, w3, w2) instead of running it, and
    returns no gradients for the weights."""
    if sum(counts) != x.shape[0] or len(counts) != w1.shape[0]:
        raise ValueError(
            f"counts: {len(counts)} experts / {sum(counts)} rows for x {tuple(x.shape)}, w1 {tuple(w1.shape)}"
        )
    return _SwiGLUFn.apply(x, w1, w3, w2, counts, cfg, defer)


class Fp8MLP(MLP):
    """`MLP` (dense layers, shared experts) through the fused FP8 SwiGLU; same parameters and keys."""

    cfg: GemmConfig

    @classmethod
    def from_mlp(cls, mlp: MLP, cfg: GemmConfig) -> Fp8MLP:
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.gate_proj, new.up_proj, new.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        new.cfg = cfg
        return new

    def forward(self, x: torch.Tensor, defer: Submit | None = None) -> torch.Tensor:
        """`defer`: as for `Fp8GroupedExperts` (each gradient back to its nn.Linear's layout)."""
        x2 = x.reshape(-1, x.shape[-1])  # (M, D)
        lins = (self.gate_proj, self.up_proj, self.down_proj)
        w1, w3, w2 = (lin.weight.t()[None] for lin in lins)
        sink = None
        if defer is not None:

            def sink(wgrad):
                def run() -> None:
                    for lin, g in zip(lins, wgrad()):  # g [1, in, out] of the weight's transposed view
                        accumulate_grad(lin.weight, g[0].t())

                defer(run)

        return swiglu_experts(x2, w1, w3, w2, [x2.shape[0]], self.cfg, sink).view_as(x)

    def extra_repr(self) -> str:
        return f"cfg={self.cfg}"


class Fp8GroupedExperts(GroupedExperts):
    """`GroupedExperts` through the fused FP8 SwiGLU; same fused parameters w1, w3, w2."""

    cfg: GemmConfig

    @classmethod
    def from_experts(cls, experts: GroupedExperts, cfg: GemmConfig) -> Fp8GroupedExperts:
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.w1, new.w3, new.w2 = experts.w1, experts.w3, experts.w2
        new.cfg = cfg
        return new

    def forward(self, x: torch.Tensor, counts: torch.Tensor, defer: Submit | None = None) -> torch.Tensor:
        """`defer` (a split backward, dsv3.parallel.pipeline.wgrad): receives the work that
        accumulates the three weights' gradients instead of autograd."""
        sink = None
        if defer is not None:
            ws = (self.w1, self.w3, self.w2)

            def sink(wgrad):
                def run() -> None:
                    for w, g in zip(ws, wgrad()):
                        accumulate_grad(w, g)

                defer(run)

        return swiglu_experts(x, self.w1, self.w3, self.w2, counts.tolist(), self.cfg, sink)

    def extra_repr(self) -> str:
        return f"{tuple(self.w1.shape)}, cfg={self.cfg}"
