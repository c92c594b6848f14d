"""BF16 models on CPUs without BF16 arithmetic: the GEMMs run on FP32 kernels, with BF16 numerics.

On a CPU without AVX512-BF16 or AMX, ATen's BF16 matmul is a slow fallback: 20-40x slower than
FP32 on the same shapes (docs/benchmarks.md). A BF16 GEMM on a GPU reads BF16 operands, multiplies
and accumulates in FP32 and writes BF16. The same arithmetic runs on FP32 kernels: widening BF16 to
FP32 is exact, a product of two 8-bit significands is exact in FP32's 24 bits, and the FP32 kernel
accumulates in FP32. So `convert(model)` swaps, in place,

    nn.Linear        -> Bf16Linear          (every projection, the output head, MTP's eh_proj)
    GroupedExperts   -> Bf16GroupedExperts  (the routed experts' three grouped GEMMs)

whose forward and backward GEMMs widen their BF16 operands to FP32, run the FP32 kernel and round
the result to BF16 (weight gradients to the parameter's dtype). What is saved for backward is the
BF16 input, as with a native BF16 GEMM, not an FP32 copy. Swapped modules are subclasses holding
the same Parameter objects: state-dict keys, checkpoints and optimizers are unaffected.

Everything else keeps its BF16 kernels: they are fast here (SDPA's CPU kernel accumulates in FP32;
the gate and the norms already compute in FP32). Models in FP32 are left as they are;
`needed()` says whether this machine lacks fast BF16 matmul.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.layers import Submit, accumulate_grad
from dsv3.model.moe import GroupedExperts, grouped_linear


def needed(device: torch.device | str = "cpu") -> bool:
    """True on a CPU whose BF16 matmul is ATen's slow fallback (no AVX512-BF16 / AMX)."""
    if torch.device(device).type != "cpu":
        return False
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype == torch.bfloat16 else t


class _LinearFn(torch.autograd.Function):
    """y = x @ w^T with FP32 arithmetic on (possibly BF16) operands; y in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, defer: Defer | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.defer = defer
        return F.linear(_wide(x), _wide(w)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dy32 = _wide(dy)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy32 @ _wide(w)).to(x.dtype)

        def wgrad() -> torch.Tensor:
            return (dy32.reshape(-1, dy.shape[-1]).t() @ _wide(x).reshape(-1, x.shape[-1])).to(w.dtype)

        return dx, _weight_grad(ctx, wgrad), None


class _GroupedFn(torch.autograd.Function):
    """x [M, in] (rows grouped by expert) @ w [E, in, out] per group, FP32 arithmetic; -> x's dtype."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, defer: Defer | None = None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, w, offsets)
        ctx.defer = defer
        return grouped_linear(_wide(x), _wide(w), offsets).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offsets = ctx.saved_tensors
        dy32 = _wide(dy).contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = grouped_linear(dy32, _wide(w).transpose(1, 2), offsets).to(x.dtype)
        return dx, _weight_grad(ctx, lambda: _grouped_wgrad(_wide(x), dy32, offsets).to(w.dtype)), None, None


Defer = Callable[[Callable[[], torch.Tensor]], None]  # takes a split backward's weight-gradient work


def _sink(submit: Submit | None, param: nn.Parameter) -> Defer | None:
    """A Function's `defer` from a module's: the gradient work becomes work that accumulates it."""
    if submit is None:
        return None
    return lambda wgrad: submit(lambda: accumulate_grad(param, wgrad()))


def _weight_grad(ctx, wgrad: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """The weight gradient now, or None with the work handed to `ctx.defer` (a split backward,
    dsv3.parallel.pipeline.wgrad: computed later, in the W of a zero-bubble schedule)."""
    if not ctx.needs_input_grad[1]:
        return None
    if ctx.defer is None:
        return wgrad()
    ctx.defer(wgrad)
    return None


def _grouped_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[e] = x_e^T @ dy_e for the row groups ending at `offsets` -> [E, in, out]."""
    if x.shape[0] > 0 and (x.shape[0] * x.element_size()) % 16 == 0:
        return F.grouped_mm(x.t(), dy, offs=offsets)  # the K-grouped form: groups along the rows
    starts = [0, *offsets[:-1].tolist()]
    return torch.stack([x[s:e].t() @ dy[s:e] for s, e in zip(starts, offsets.tolist())])


class Bf16Linear(nn.Linear):
    """nn.Linear whose GEMMs run on FP32 kernels (BF16 numerics for BF16 tensors)."""

    def forward(self, x: torch.Tensor, defer: Submit | None = None) -> torch.Tensor:
        """`defer` (a split backward, dsv3.parallel.pipeline.wgrad): receives the work that
        accumulates the weight's gradient instead of autograd (the bias's stays in autograd: small)."""
        y = _LinearFn.apply(x, self.weight, _sink(defer, self.weight))
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Bf16Linear:
        return _retyped(lin, cls)


class Bf16GroupedExperts(GroupedExperts):
    """GroupedExperts whose grouped GEMMs run on FP32 kernels (BF16 numerics for BF16 tensors)."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor, defer: Submit | None = None) -> torch.Tensor:
        """`defer`: as for `Bf16Linear`, for w1, w3 and w2."""
        offsets = counts.cumsum(0).to(torch.int32)
        d1, d3, d2 = (_sink(defer, w) for w in (self.w1, self.w3, self.w2))
        h = F.silu(_GroupedFn.apply(x, self.w1, offsets, d1)) * _GroupedFn.apply(x, self.w3, offsets, d3)
        return _GroupedFn.apply(h, self.w2, offsets, d2)

    @classmethod
    def from_experts(cls, experts: GroupedExperts) -> Bf16GroupedExperts:
        return _retyped(experts, cls)


def _retyped(module: nn.Module, cls: type) -> nn.Module:
    """`module` as an instance of its subclass `cls`, sharing its Parameters, buffers and hooks."""
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    return new


def convert(model: nn.Module) -> nn.Module:
    """Swap the GEMM modules of `model` for their FP32-kernel versions, in place; returns it.
    Only exact nn.Linear / GroupedExperts are swapped (FP8 and other subclasses are left alone)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Bf16Linear.from_linear(child))
            elif type(child) is GroupedExperts:
                setattr(parent, name, Bf16GroupedExperts.from_experts(child))
    return model
