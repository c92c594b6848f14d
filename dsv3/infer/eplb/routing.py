"""Replica routing: a MoE layer that runs its routed experts as physical replicas (DESIGN §8).

With EPLB a logical expert e lives in logcnt[e] physical slots (on different GPUs). After the gate
picks logical experts, each routed token copy is sent to one replica so that the replicas share the
expert's tokens evenly: copies of e are ranked in token order and copy r goes to replica
r mod logcnt[e] (counts differ by at most one, which is the planner's load model). Alternatively a
per-slot token quota (from `dynamic.split_tokens`) assigns consecutive ranks to replicas in blocks.
Every replica holds a copy of its logical expert's weights, so the output equals the unreplicated
layer's: the same expert function is applied to the same tokens, only on another slot.

This is the single-process reference of what expert-parallel dispatch does across GPUs; the
physical experts run as one grouped GEMM over the slots.

Shapes: N tokens, D dim, K experts per token, M = N*K routed copies, E logical experts,
R physical slots.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.model.moe import GroupedExperts, MoE, MoECall


def replica_of_copies(
    indices: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    quota: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """indices [N, K] logical experts -> [N, K] physical slots.

    log2phy [E, max_replicas] (padded with -1), logcnt [E]; quota [R] tokens per slot (optional,
    its sums per expert must equal the expert's routed copies). offset [E] (optional): copies of
    each expert ranked before this batch's, when several processes share the replicas (expert-
    parallel serving: the exclusive prefix of the group's counts), so that the round-robin and the
    quota blocks run over the group's copies; with an offset, the quota must cover offset + copies."""
    flat = indices.flatten()
    E = logcnt.shape[0]
    order = flat.argsort(stable=True)  # copies grouped by expert, token order within
    counts = torch.bincount(flat, minlength=E)
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[flat[order]]
    if offset is not None:
        rank = rank + offset[flat]
    if quota is None:
        replica = rank % logcnt[flat]  # round-robin over the expert's replicas
    else:
        slot_quota = quota[log2phy.clamp(min=0)].masked_fill(log2phy < 0, 0)  # (E, max_replicas)
        sums = slot_quota.sum(1)
        if (sums != counts if offset is None else sums < counts + offset).any():
            raise ValueError("quota: per-expert sums must equal the routed copies of each expert")
        ends = slot_quota.cumsum(1)  # (E, max_replicas) last rank (exclusive) of each replica
        replica = (rank[:, None] >= ends[flat]).sum(1)  # block assignment by rank
    return log2phy[flat, replica].view_as(indices)


class ReplicatedMoE(nn.Module):
    """Wraps a `MoE` (unchanged) and runs its routed experts on the physical slots of a placement.

    phy2log [R], log2phy [E, max_replicas], logcnt [E] are one layer's rows of a `Placement`.
    It replaces the MoE's dispatch (replica choice) and experts (the slots'); route and combine are
    the wrapped MoE's. After each forward, `last_slot_counts` [R] holds the tokens each physical
    slot processed, and the wrapped layer's `last_counts` the logical counts (so load statistics
    keep working)."""

    def __init__(self, moe: MoE, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
        super().__init__()
        self.moe = moe
        self.quota: torch.Tensor | None = None  # set per step for dynamic redundancy, else round-robin
        self.set_placement(phy2log, log2phy, logcnt)

    @torch.no_grad()
    def set_placement(self, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
        """Install a placement: the physical experts become copies of their logical expert's weights."""
        E = self.moe.n_experts
        if logcnt.shape != (E,) or int(phy2log.max()) >= E or (logcnt < 1).any():
            raise ValueError(f"placement: expects {E} logical experts, each with >= 1 replica")
        src = self.moe.experts
        R = phy2log.shape[0]
        self.phy2log, self.log2phy, self.logcnt = phy2log.long(), log2phy.long(), logcnt.long()
        self.slots = GroupedExperts(R, src.w1.shape[1], src.w1.shape[2]).to(src.w1)
        for name in ("w1", "w2", "w3"):
            getattr(self.slots, name).copy_(getattr(src, name)[self.phy2log])  # (R, in, out) replica weights
        self.register_buffer("last_slot_counts", torch.zeros(R, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D], equal to the wrapped MoE's output: the wrapped MoE's route (which
        records its logical counts) and combine, this layer's dispatch and experts."""
        call = self.moe.route(x)
        self.dispatch(call)
        self.run_experts(call)
        return self.moe.combine(call)

    def dispatch(self, call: MoECall) -> None:
        """Each routed copy to one replica of its expert; the copies sorted by physical slot."""
        K = call.indices.shape[1]
        slots = replica_of_copies(call.indices, self.log2phy, self.logcnt, self.quota).flatten()  # (M,)
        order = slots.argsort(stable=True)
        counts = torch.bincount(slots, minlength=self.phy2log.shape[0])
        self.last_slot_counts = counts
        call.order, call.rows, call.row_counts = order, call.x[order // K], counts

    def run_experts(self, call: MoECall) -> None:
        """The physical slots' experts on their rows (one grouped GEMM), and the shared experts."""
        call.out = self.slots(call.rows, call.row_counts)  # (M, D) rows grouped by slot
        self.moe.run_shared(call)


def replicate_model(
    model: nn.Module, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor
) -> None:
    """Swap every MoE of `model.moe_layers()` for a ReplicatedMoE with its layer's placement
    (placement tensors [L, ...], layers in `moe_layers()` order). Idempotent per module."""
    layers = model.moe_layers()
    if phy2log.shape[0] != len(layers):
        raise ValueError(f"phy2log: {phy2log.shape[0]} layers, model has {len(layers)} MoE layers")
    index = {id(m): i for i, m in enumerate(layers)}
    for parent in list(model.modules()):
        if isinstance(parent, ReplicatedMoE):
            continue  # its `moe` child is the wrapped layer itself
        for name, child in list(parent.named_children()):
            if isinstance(child, ReplicatedMoE):
                i = index[id(child.moe)]
                child.set_placement(phy2log[i], log2phy[i], logcnt[i])
            elif isinstance(child, MoE) and id(child) in index:
                i = index[id(child)]
                setattr(parent, name, ReplicatedMoE(child, phy2log[i], log2phy[i], logcnt[i]))
