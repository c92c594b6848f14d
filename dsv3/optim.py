"""AdamW with BF16 moments, FP32 master weights and a BF16 compute copy (§3.3.3, DESIGN §4).

The paper keeps the optimizer's first and second moments in BF16 "without incurring observable
performance degradation", the master weights and the weight gradients in FP32. Per parameter:

    g  = grad (upcast to FP32)
    w  <- w * (1 - lr * wd)                                  decoupled weight decay, on the FP32 master
    m  <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2       computed in FP32, stored in BF16
    w  <- w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    param <- w                                               the compute copy (rounded if BF16)

The step uses the FP32 m, v it just computed and stores them rounded, as a fused kernel would.
Storage: a parameter in FP32 is its own master (no extra copy: the layout of CPU training here);
a BF16 parameter is the compute copy and the FP32 master lives in the optimizer state.

Why BF16 second moments are safe with the paper's b2 = 0.95: an update changes v by a fraction
(1 - b2) = 5%, far above BF16's relative step of 2^-8 = 0.4%. With b2 = 0.999 updates of 0.1% would
round away and v would stall; use FP32 moments (`moment_dtype=torch.float32`) there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dsv3 import paper


class MixedPrecisionAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = paper.PEAK_LR,
        betas: tuple[float, float] = paper.ADAMW_BETAS,
        eps: float = 1e-8,
        weight_decay: float = paper.WEIGHT_DECAY,
        moment_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps, weight_decay: must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas: must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.moment_dtype = moment_dtype

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(
                p, dtype=self.moment_dtype, memory_format=torch.preserve_format
            )
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=self.moment_dtype, memory_format=torch.preserve_format
            )
            if p.dtype != torch.float32:
                state["master"] = p.detach().float()
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MixedPrecisionAdamW does not support sparse gradients")
                state = self._init_state(p)
                state["step"] += 1
                t = state["step"]
                master = state.get("master", p)
                g = p.grad.float()
                if wd:
                    master.mul_(1 - lr * wd)
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)  # not in place: v may be the state
                master.addcdiv_(m, denom, value=-lr / (1 - b1**t))
                if master is not p:
                    p.copy_(master)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim casts every floating state tensor to its parameter's dtype on load, which would
        # turn BF16 moments into FP32 and round an FP32 master to a BF16 parameter: restore the
        # saved dtypes afterwards.
        saved = {k: dict(v) for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments and FP32 masters)."""
        return sum(
            v.numel() * v.element_size()
            for s in self.state.values()
            for v in s.values()
            if torch.is_tensor(v)
        )


def param_groups(model: nn.Module, weight_decay: float = paper.WEIGHT_DECAY) -> list[dict[str, Any]]:
    """Two groups: matrices (and fused expert tensors) decayed; vectors (norm weights, biases) not.
    Buffers such as the gate's correction bias are not parameters and never reach the optimizer."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
