"""Split backward: input gradients now (I), weight gradients later (W) (DESIGN §5; Qi et al. 2023).

A linear layer y = x W^T has two backward GEMMs: dx = dy W, which the previous stage is waiting
for, and dW = dy^T x, which nobody waits for until the optimizer step. Zero-bubble schedules
(ZB1P, the tail of DualPipe) run the first at once and defer the second to fill a bubble.

How: `defer_weight_grads(module, store)` gives every plain `nn.Linear` and every `GroupedExperts`
(the routed experts' grouped GEMMs; an expert-parallel MoE's shard is one too) of `module` a
forward through the autograd functions below, and every FP8 or BF16-on-FP32 GEMM module
(`Fp8Linear`, `Fp8MLP`, `Fp8GroupedExperts`, `Bf16Linear`, `Bf16GroupedExperts`) its own forward
with `defer=store.submit` (their Functions split Dgrad from Wgrad the same way). Their backward
always returns dx, never dW; it hands the dW work to `store.submit` as a closure over what Wgrad
reads (x and dy; FP8: the cached FP8 operands). Outside `store.deferring(key)` the closure runs immediately, so a full backward (B)
is unchanged; inside, the closures are kept under `key` and `store.run(key)` runs them later (W),
accumulating into `weight.grad` as autograd would. Keeping (x, dy) alive until W is the memory
cost of deferral: a micro-batch stays "in flight" until its W (DESIGN §5's activation column).

Not deferred (autograd computes them during I, they are small): RMSNorm weights, the router's gate
weight, the embedding, biases of the FP8/BF16 linears, and layers of other types.

Shapes: M tokens (all leading dims flattened), K in features, N out features, E experts.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.layers import accumulate_grad
from dsv3.model.moe import GroupedExperts, grouped_linear, pad_rows, unpad_rows


class WeightGradStore:
    """Holds the deferred weight-gradient closures of each split backward until its W runs."""

    def __init__(self) -> None:
        self._capture: list[Callable[[], None]] | None = None
        self._pending: dict[Hashable, list[Callable[[], None]]] = {}

    @contextmanager
    def deferring(self, key: Hashable) -> Iterator[None]:
        """Within this block (an I backward, or a piece of it), weight gradients are added to the ones
        kept under `key` instead of being computed."""
        if self._capture is not None:
            raise RuntimeError("WeightGradStore: deferring() blocks cannot nest")
        self._capture = self._pending.setdefault(key, [])
        try:
            yield
        finally:
            self._capture = None

    def submit(self, fn: Callable[[], None]) -> None:
        """Called from a backward: run `fn` now (full backward) or keep it (inside `deferring`)."""
        if self._capture is None:
            fn()
        else:
            self._capture.append(fn)

    def run(self, key: Hashable) -> None:
        """The W of `key`: compute and accumulate its deferred weight gradients."""
        try:
            work = self._pending.pop(key)
        except KeyError:
            raise RuntimeError(f"WeightGradStore: no pending weight gradients for {key}") from None
        with torch.no_grad():  # as inside autograd's backward: (x, dy) must not record a graph
            for fn in work:
                fn()

    def pending(self) -> list[Hashable]:
        return list(self._pending)


class _LinearFn(torch.autograd.Function):
    """y = x W^T (+ b); backward returns dx and submits dW (and db) to the store."""

    @staticmethod
    def forward(ctx, x, weight, bias, store: WeightGradStore):
        ctx.save_for_backward(x)
        # the Parameters themselves (not saved copies): the closure accumulates into their .grad
        ctx.weight, ctx.bias, ctx.store = weight, bias, store
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, (ctx.bias if ctx.needs_input_grad[2] else None)
        dx = dy @ weight if ctx.needs_input_grad[0] else None  # (..., K)
        if ctx.needs_input_grad[1] or bias is not None:

            def weight_grad() -> None:
                dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # (M, N), (M, K)
                if ctx.needs_input_grad[1]:
                    accumulate_grad(weight, dy2.t() @ x2)  # (N, K)
                if bias is not None:
                    accumulate_grad(bias, dy2.sum(0))

            ctx.store.submit(weight_grad)
        return dx, None, None, None


def _grouped_weight_grad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per expert x_e^T dy_e: x [M, K], dy [M, N] sorted by expert, offsets [E] -> [E, K, N]."""
    aligned = all((s * x.element_size()) % 16 == 0 for s in (x.shape[1], dy.shape[1]))
    if aligned and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        return F.grouped_mm(x.t(), dy, offs=offsets)  # 2d x 2d with offsets along M: one block per expert
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]]).tolist()
    return torch.stack([x[s:e].t() @ dy[s:e] for s, e in zip(starts, offsets.tolist())])


class _GroupedLinearFn(torch.autograd.Function):
    """y_e = x_e W_e for each expert's rows; backward returns dx and submits dW to the store."""

    @staticmethod
    def forward(ctx, x, weight, offsets, store: WeightGradStore):
        ctx.save_for_backward(x, offsets)
        ctx.weight, ctx.store = weight, store
        return grouped_linear(x, weight, offsets)  # (M, N)

    @staticmethod
    def backward(ctx, dy):
        x, offsets = ctx.saved_tensors
        weight = ctx.weight
        dx = grouped_linear(dy, weight.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            ctx.store.submit(
                lambda: accumulate_grad(weight, _grouped_weight_grad(x, dy, offsets))
            )  # (E, K, N)
        return dx, None, None, None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _LinearFn.apply(x, self.weight, self.bias, self._wgrad_store)


def _experts_forward(self: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """GroupedExperts.forward with the three grouped GEMMs deferring dW: x [M, D], counts [E] -> [M, D]."""
    x, counts, rows = pad_rows(x, counts)
    offsets = counts.cumsum(0).to(torch.int32)
    store = self._wgrad_store
    gate = _GroupedLinearFn.apply(x, self.w1, offsets, store)  # (M, I)
    up = _GroupedLinearFn.apply(x, self.w3, offsets, store)  # (M, I)
    return unpad_rows(_GroupedLinearFn.apply(F.silu(gate) * up, self.w2, offsets, store), rows)  # (M, D)


def _deferring_classes() -> tuple[type, ...]:
    """GEMM modules whose forward takes `defer` (imported here: the FP8 package is optional work)."""
    from dsv3.bf16 import Bf16GroupedExperts, Bf16Linear
    from dsv3.fp8.linear import Fp8Linear
    from dsv3.fp8.mlp import Fp8GroupedExperts, Fp8MLP

    return (Fp8Linear, Fp8MLP, Fp8GroupedExperts, Bf16Linear, Bf16GroupedExperts)


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> int:
    """Route the weight gradients of every GEMM layer in `module` (plain nn.Linear, GroupedExperts,
    their FP8 and BF16 versions) through `store`; returns how many layers were changed. Idempotent."""
    changed = 0
    own = _deferring_classes()
    for m in module.modules():
        if getattr(m, "_wgrad_store", None) is store:
            continue
        if type(m) is nn.Linear:
            patched = types.MethodType(_linear_forward, m)
        elif type(m) is GroupedExperts:
            patched = types.MethodType(_experts_forward, m)
        elif type(m) in own:
            patched = functools.partial(type(m).forward, m, defer=store.submit)
        else:
            continue
        m._wgrad_store = store
        m.forward = patched  # instance attribute: the class stays untouched
        changed += 1
    return changed


def restore_weight_grads(module: nn.Module) -> None:
    """Undo `defer_weight_grads`: the layers compute weight gradients in autograd again."""
    for m in module.modules():
        if hasattr(m, "_wgrad_store"):
            del m._wgrad_store
            del m.forward
