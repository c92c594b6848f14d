"""A placement of replicated experts on GPUs, and the measures every EPLB policy is judged by.

A placement of one MoE layer is the map `phy2log[R]`: physical slot r holds a replica of logical
expert `phy2log[r]`. Slots are numbered GPU-major: GPU g owns slots g*S .. g*S+S-1 (S = R/P slots
per GPU) and node n owns GPUs n*P/N .. (n+1)*P/N-1. The two derived maps are the replica counts
`logcnt[E]` and `log2phy[E, max_replicas]` (the physical slots of each logical expert, padded
with -1), the three outputs of DESIGN §8.

Load model: the tokens of logical expert e are split evenly among its replicas (what
`routing.ReplicatedMoE` does), so a replica carries w_e / logcnt_e and a GPU carries the sum over
its slots. Balancedness = max GPU load / mean GPU load (1.0 is perfect).

Shapes: L layers, E logical experts, R physical slots, P GPUs, S = R/P slots per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    phy2log: torch.Tensor  # [L, R] long: logical expert of each physical slot
    log2phy: torch.Tensor  # [L, E, max_replicas] long: physical slots of each expert, padded with -1
    logcnt: torch.Tensor  # [L, E] long: replicas per logical expert (>= 1)
    num_gpus: int

    @classmethod
    def from_phy2log(cls, phy2log: torch.Tensor, num_experts: int, num_gpus: int) -> Placement:
        """Derive log2phy and logcnt from phy2log [L, R]; checks that every expert has a replica."""
        phy2log = phy2log.long()
        L, R = phy2log.shape
        if R % num_gpus:
            raise ValueError(f"num_gpus: {num_gpus} does not divide the {R} physical slots")
        logcnt = torch.zeros(L, num_experts, dtype=torch.long).scatter_add_(
            1, phy2log, torch.ones_like(phy2log)
        )
        if (logcnt == 0).any():
            layer, expert = (logcnt == 0).nonzero()[0].tolist()
            raise ValueError(f"phy2log: logical expert {expert} of layer {layer} has no replica")
        order = phy2log.argsort(dim=1, stable=True)  # (L, R) slots grouped by expert
        sorted_log = phy2log.gather(1, order)
        starts = logcnt.cumsum(1) - logcnt  # first position of each expert in `order`
        rank = torch.arange(R).expand(L, R) - starts.gather(1, sorted_log)  # replica index within expert
        log2phy = torch.full((L, num_experts, int(logcnt.max())), -1, dtype=torch.long)
        log2phy[torch.arange(L)[:, None], sorted_log, rank] = order
        return cls(phy2log, log2phy, logcnt, num_gpus)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def num_replicas(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    def gpu_of_slot(self) -> torch.Tensor:
        """[R] GPU of each physical slot."""
        return torch.arange(self.num_replicas) // self.slots_per_gpu

    def replica_loads(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [L, E] tokens per logical expert -> [L, R] tokens per physical slot (even split)."""
        per_replica = weight.double() / self.logcnt
        return per_replica.gather(1, self.phy2log)

    def gpu_loads(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [L, E] -> [L, P] tokens per GPU."""
        return self.replica_loads(weight).view(self.num_layers, self.num_gpus, -1).sum(-1)

    def gpu_counts(self) -> torch.Tensor:
        """[L, P, E] replicas of each expert on each GPU."""
        gpu = self.gpu_of_slot().expand(self.num_layers, -1)
        counts = torch.zeros(self.num_layers, self.num_gpus * self.num_experts, dtype=torch.long)
        counts.scatter_add_(1, gpu * self.num_experts + self.phy2log, torch.ones_like(self.phy2log))
        return counts.view(self.num_layers, self.num_gpus, self.num_experts)

    def duplicates(self) -> torch.Tensor:
        """[L] slots holding an expert that already has a replica on the same GPU."""
        return (self.gpu_counts() - 1).clamp(min=0).sum((1, 2))


def balancedness(gpu_loads: torch.Tensor) -> torch.Tensor:
    """[L, P] -> [L] max / mean GPU load (1.0 = perfectly balanced; 1.0 for an idle layer)."""
    mean = gpu_loads.mean(-1)
    return torch.where(mean > 0, gpu_loads.max(-1).values / mean.clamp(min=1e-30), torch.ones_like(mean))


def moved_experts(old_counts: torch.Tensor, new_counts: torch.Tensor) -> torch.Tensor:
    """[L] expert weights that must be copied to a GPU to go from one placement to another, given
    both as `gpu_counts()` [L, P, E]: for each GPU, the replicas it did not hold before (slot order
    within a GPU is free, so this is a multiset difference)."""
    if old_counts.shape != new_counts.shape:
        raise ValueError(
            f"placements differ in shape: {tuple(old_counts.shape)} vs {tuple(new_counts.shape)}"
        )
    return (new_counts - old_counts).clamp(min=0).sum((1, 2))


def unreplicated_counts(num_layers: int, num_experts: int, num_gpus: int) -> torch.Tensor:
    """[L, P, E] the layout without EPLB: each expert once, expert e on GPU floor(e * P / E)
    (E/P consecutive experts per GPU; with more GPUs than experts, some GPUs idle)."""
    gpu = torch.arange(num_experts) * num_gpus // num_experts
    counts = torch.zeros(num_gpus, num_experts, dtype=torch.long)
    counts[gpu, torch.arange(num_experts)] = 1
    return counts.expand(num_layers, -1, -1).clone()


def loads_from_counts(weight: torch.Tensor, gpu_counts: torch.Tensor) -> torch.Tensor:
    """weight [L, E], gpu_counts [L, P, E] -> [L, P] tokens per GPU, each expert's tokens split
    evenly over its replicas."""
    per_replica = weight.double() / gpu_counts.sum(1).clamp(min=1)
    return torch.einsum("lpe,le->lp", gpu_counts.double(), per_replica)
