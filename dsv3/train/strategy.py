"""How a training step is spread over processes: the trainer's one seam for parallelism.

The trainer builds a single-device model and hands it to a Strategy, which may change it (swap MoE
layers for expert-parallel ones), owns the optimizer (sharded for ZeRO-1), reduces gradients and
statistics across ranks, and turns sharded state into the rank-independent form checkpoints hold.
`Strategy` here is one process or plain data parallelism over every rank of the default group;
`dsv3.parallel` provides expert parallelism and ZeRO-1 behind the same methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


class Strategy:
    """One process, or data parallelism over every rank (gradients averaged by all-reduce)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank() if _initialized() else 0
        self.world = dist.get_world_size() if _initialized() else 1

    # which shard of the data this rank reads
    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def data_world(self) -> int:
        return self.world

    @property
    def is_main(self) -> bool:
        """The rank that writes logs and checkpoints."""
        return self.rank == 0

    def describe(self) -> str | None:
        """A line for the run's log about how the step is spread (None: nothing to say)."""
        return None

    def parallelize(self, model: nn.Module) -> nn.Module:
        return model

    def local_slice(self, model: nn.Module) -> dict[str, range | None]:
        """The weights this rank holds, for a model built on the meta device
        (dsv3.parallel.materialize): full-model name -> None (all of it) or the routed experts it
        keeps of a fused expert stack. One process or data parallelism: everything."""
        return {name: None for name, _ in model.named_parameters()}

    def forward_backward(
        self, model: nn.Module, batches: list[torch.Tensor], mtp_lambda: float, balance_alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of the step's micro-batches on this rank (gradients of their mean
        loss accumulate into the parameters); returns (float64 [4] mean total, main, MTP, balance
        loss; [L, E] tokens per expert of every MoE layer, in `moe_layers()` order)."""
        parts = torch.zeros(4, dtype=torch.float64)
        counts = None
        for batch in batches:
            out = model.loss(batch, mtp_lambda=mtp_lambda, balance_alpha=balance_alpha)
            (out.total / len(batches)).backward()
            parts += torch.stack(
                [out.total.detach(), out.main.detach(), out.mtp.detach(), out.balance.detach()]
            )
            counts = out.counts.clone() if counts is None else counts + out.counts
        return parts / len(batches), counts

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """(main CE, MTP CE, [L, E] counts) of one validation batch [b, T+1], without gradients."""
        out = model.loss(batch, mtp_lambda=0.0, balance_alpha=0.0)
        return float(out.main), float(out.mtp), out.counts

    def reduce_counts(self, t: torch.Tensor) -> torch.Tensor:
        """Sum expert counts [L, E] over every rank that saw different tokens, for every layer."""
        return self.reduce_sum(t)

    def update_expert_bias(self, model: nn.Module, gamma: float, counts: torch.Tensor) -> None:
        """The sign-rule bias update of every MoE layer this rank holds, from the step's counts."""
        model.update_expert_bias(gamma, list(counts))

    def build_optimizer(
        self, model: nn.Module, make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer], groups
    ) -> torch.optim.Optimizer:
        return make(groups)

    def reduce_gradients(self, model: nn.Module) -> None:
        if self.world > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the (global) gradient norm; returns it before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
        return t

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank that saw different tokens (for expert counts and eval totals)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def full_model(self, model: nn.Module) -> nn.Module:
        """A single-device model with every weight (for saving in the HF layout), on the main rank."""
        return model

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state in a rank-independent form (what the checkpoint holds)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)
