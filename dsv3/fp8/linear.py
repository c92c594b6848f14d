"""`Fp8Linear`: a linear layer whose three GEMMs run in fine-grained FP8 (§3.3, DESIGN §4).

    Fprop  y  = x @ W^T     x: 1x128 E4M3 tiles (online amax), W: 128x128 E4M3 blocks
    Dgrad  dx = dy @ W      dy: 1x128 tiles along the output features, W^T: the same blocks
    Wgrad  dW = dy^T @ x    both tiled along the tokens (128x1 tiles), FP32 result

What is kept for the backward pass is the FP8 operand of Fprop itself (1 byte per value plus one
FP32 scale per 128), not the BF16 input: Wgrad re-quantises it as 128x1 tiles. With power-of-2
scales that re-tiling only shifts exponents, which is why the input of the linear after attention
uses them; that input is also cached in the finer E5M6 format (§3.3.3). The weight is not cached:
backward re-quantises the parameter, which gives the forward's FP8 weight again, bit for bit.
Outputs and input gradients are rounded to BF16 (what an FP8 kernel writes) and returned in the
input's dtype; weight gradients are FP32 (in the parameter's dtype when that is not FP32).

With `GemmConfig(fp8=False)` the same layer is the emulated BF16 baseline: BF16 operands and cache,
FP32 accumulation, BF16 outputs. Shapes: M tokens (all leading dims), K in_features, N out_features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv3.fp8.operand import FP8, GemmConfig, Operand, act, cache_act, mm, retile, weight
from dsv3.model.layers import Submit, accumulate_grad

Defer = Callable[[Callable[[], torch.Tensor]], None]  # takes a split backward's Wgrad work (see `linear`)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, cfg: GemmConfig, defer: Defer | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        xq, cached = cache_act(x2, cfg)
        y = mm(xq, weight(w, cfg))  # (M, N)
        ctx.cfg, ctx.x_shape, ctx.defer = cfg, x.shape, defer
        ctx.save_for_backward(cached.data, cached.scale, w)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        data, scale, w = ctx.saved_tensors
        cfg: GemmConfig = ctx.cfg
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = mm(act(dy2, cfg, pow2=cfg.pow2_grad), weight(w, cfg).t())  # (M, K)
            dx = dx.to(dy.dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:

            def wgrad() -> torch.Tensor:
                dy_t = act(dy2.t(), cfg, pow2=cfg.pow2_grad)  # (N, M), tiles along M
                x_t = retile(Operand(data, scale), cfg, pow2=cfg.pow2_input or cfg.cache_e5m6)  # (K, M)
                return mm(dy_t, x_t, torch.float32).to(w.dtype)  # (N, K)

            if ctx.defer is None:
                dw = wgrad()
            else:
                ctx.defer(wgrad)  # a split backward: the weight gradient is computed later (W)
        return dx, dw, None, None


def linear(
    x: torch.Tensor, w: torch.Tensor, cfg: GemmConfig = FP8, defer: Defer | None = None
) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T -> [..., N] with the GEMM precision of `cfg`.

    `defer` (a split backward, `dsv3.parallel.pipeline.wgrad`): the backward hands it the Wgrad
    work (a function returning dW [N, K]) instead of running it, and returns no gradient for w."""
    return _LinearFn.apply(x, w, cfg, defer)


class Fp8Linear(nn.Linear):
    """nn.Linear with FP8 GEMMs; same parameters and state-dict keys (`weight`, `bias`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        cfg: GemmConfig = FP8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.cfg = cfg

    def forward(self, x: torch.Tensor, defer: Submit | None = None) -> torch.Tensor:
        """`defer` (a split backward, dsv3.parallel.pipeline.wgrad): receives the work that
        accumulates the weight's gradient instead of autograd (the bias's stays in autograd: small)."""
        sink = None
        if defer is not None:
            sink = lambda wgrad: defer(lambda: accumulate_grad(self.weight, wgrad()))  # noqa: E731
        y = linear(x, self.weight, self.cfg, sink)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg: GemmConfig) -> Fp8Linear:
        """A swap for `lin` that shares its Parameter objects (optimizers and tied weights stay valid)."""
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, cfg=cfg, device="meta")
        new.weight = lin.weight
        if lin.bias is not None:
            new.bias = lin.bias
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cfg={self.cfg}"
