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

import torch
import torch.nn.functional as F
from torch import nn

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
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.linear(_wide(x), _wide(w)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dy32 = _wide(dy)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (dy32 @ _wide(w)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dy32.reshape(-1, dy.shape[-1]).t() @ _wide(x).reshape(-1, x.shape[-1])).to(w.dtype)
        return dx, dw


class _GroupedFn(torch.autograd.Function):
    """x [M, in] (rows grouped by expert) @ w [E, in, out] per group, FP32 arithmetic; -> x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offsets)
        return grouped_linear(_wide(x), _wide(w), offsets).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offsets = ctx.saved_tensors
        dy32 = _wide(dy).contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = grouped_linear(dy32, _wide(w).transpose(1, 2), offsets).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = _grouped_wgrad(_wide(x), dy32, offsets).to(w.dtype)
        return dx, dw, None


def _grouped_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[e] = x_e^T @ dy_e for the row groups ending at `offsets` -> [E, in, out]."""
    if x.shape[0] > 0 and (x.shape[0] * x.element_size()) % 16 == 0:
        return F.grouped_mm(x.t(), dy, offs=offsets)  # the K-grouped form: groups along the rows
    starts = [0, *offsets[:-1].tolist()]
    return torch.stack([x[s:e].t() @ dy[s:e] for s, e in zip(starts, offsets.tolist())])


class Bf16Linear(nn.Linear):
    """nn.Linear whose GEMMs run on FP32 kernels (BF16 numerics for BF16 tensors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _LinearFn.apply(x, self.weight)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Bf16Linear:
        return _retyped(lin, cls)


class Bf16GroupedExperts(GroupedExperts):
    """GroupedExperts whose grouped GEMMs run on FP32 kernels (BF16 numerics for BF16 tensors)."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.silu(_GroupedFn.apply(x, self.w1, offsets)) * _GroupedFn.apply(x, self.w3, offsets)
        return _GroupedFn.apply(h, self.w2, offsets)

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
