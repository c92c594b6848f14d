"""Expert parallelism applied to the single-device model from outside (DESIGN §5, paper §3.2.2).

`parallelize_experts(model, ep)` swaps every `MoE` of the model for an `ExpertParallelMoE`: the
same gate and shared experts (replicated, data-parallel), the same parameter names, but only this
rank's block of routed experts (`w1/w3/w2[El, ...]` sliced from the full `[E, ...]`), and a
`routed()` that dispatches token copies to the experts' ranks and combines the outputs
(`dispatch.one_hop` or `dispatch.two_hop`). Everything the trainer reads keeps its meaning:
`last_counts` [E] counts this rank's tokens per expert (the trainer sums them over ranks for the
bias update), `balance_loss` is per sequence and so local.

`gather_full_state(model, ep)` is the inverse for checkpoints: the model's state dict with every
expert gathered from the EP group, which builds an ordinary single-device model.

Shapes: E experts, El = E / ep experts on this rank, N tokens, K experts per token, D dim.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.moe import MoE
from dsv3.parallel.comm import WIRES, CommStats, Link
from dsv3.parallel.dispatch import Placement, nodes_per_token, one_hop, two_hop
from dsv3.parallel.mesh import Mesh


@dataclass
class ExpertParallel:
    """Everything an expert-parallel MoE layer needs: placement, links, wire formats, counters."""

    placement: Placement
    ep: Link
    inter: Link  # same local index on every node of the EP group (hop 1)
    intra: Link  # the EP group's ranks on my node (hop 2)
    two_hop: bool = False
    dispatch_wire: str = "same"
    combine_wire: str = "same"
    stats: CommStats = field(default_factory=CommStats)

    def __post_init__(self) -> None:
        if self.dispatch_wire not in WIRES:
            raise ValueError(f"parallel.dispatch: expected one of {WIRES}, got {self.dispatch_wire!r}")
        if self.combine_wire not in ("same", "bf16"):
            raise ValueError(f"parallel.combine: expected 'same' or 'bf16', got {self.combine_wire!r}")

    @classmethod
    def from_mesh(
        cls,
        mesh: Mesh,
        cfg: ModelConfig,
        two_hop: bool = False,
        dispatch: str = "same",
        combine: str = "same",
    ) -> ExpertParallel:
        stats = CommStats()
        layout = mesh.layout

        def link(name: str) -> Link:
            members = mesh.members[name]
            nodes = [layout.node_of(r) for r in members]
            return Link(name, mesh.group(name), members, mesh.rank, nodes, stats, mesh.timeout)

        placement = Placement(
            cfg.n_routed_experts,
            layout.ep,
            layout.node_ranks_in_ep,
            cfg.n_expert_groups,
            cfg.n_limited_groups,
        )
        return cls(placement, link("ep"), link("inter"), link("intra"), two_hop, dispatch, combine, stats)

    @property
    def index(self) -> int:
        return self.ep.index


def shard_experts(experts: nn.Module, index: int, per_rank: int) -> nn.Module:
    """A copy of a fused experts module holding only experts [index*per_rank, (index+1)*per_rank)."""
    local = copy.copy(experts)
    local._parameters, local._buffers, local._modules = {}, dict(experts._buffers), dict(experts._modules)
    for name, p in experts.named_parameters(recurse=False):
        block = p.detach()[index * per_rank : (index + 1) * per_rank].clone()
        local._parameters[name] = nn.Parameter(block, requires_grad=p.requires_grad)
    return local


class ExpertParallelMoE(MoE):
    """`MoE` with its routed experts sharded over an EP group; forward semantics unchanged."""

    ep: ExpertParallel
    last_max_nodes: int  # most nodes one token of the last batch was sent to

    @classmethod
    def from_moe(cls, moe: MoE, ep: ExpertParallel) -> ExpertParallelMoE:
        for name, p in moe.experts.named_parameters(recurse=False):
            if p.shape[0] != moe.n_experts:
                raise ValueError(f"experts.{name}: expected [E={moe.n_experts}, ...], got {tuple(p.shape)}")
        new = cls.__new__(cls)
        new.__dict__.update(moe.__dict__)  # same gate, shared experts, buffers, hooks
        new._parameters, new._buffers, new._modules = (
            dict(moe._parameters),
            dict(moe._buffers),
            dict(moe._modules),
        )
        new.experts = shard_experts(moe.experts, ep.index, ep.placement.local_experts)
        new.ep, new.last_max_nodes = ep, 0
        return new

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights/indices [N, K] -> [N, D], experts on other ranks reached by all-to-all."""
        ep = self.ep
        self.last_counts = torch.bincount(indices.flatten(), minlength=self.n_experts).detach()
        fan_out = nodes_per_token(indices, ep.placement)
        self.last_max_nodes = int(fan_out.max()) if fan_out.numel() else 0
        if ep.two_hop:
            return two_hop(
                x, weights, indices, self.experts, ep.placement, ep.inter, ep.intra, ep.dispatch_wire,
                ep.combine_wire,
            )  # fmt: skip
        return one_hop(
            x, weights, indices, self.experts, ep.placement, ep.ep, ep.dispatch_wire, ep.combine_wire
        )

    def extra_repr(self) -> str:
        first, n = self.ep.index * self.ep.placement.local_experts, self.ep.placement.local_experts
        return f"experts {first}..{first + n - 1} of {self.n_experts}"


def parallelize_experts(model: nn.Module, ep: ExpertParallel) -> list[str]:
    """Swap every MoE of `model` (in place) for an ExpertParallelMoE; returns their module names."""
    names = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertParallelMoE.from_moe(getattr(parent, child), ep))
    return names


def expert_param_names(model: nn.Module) -> dict[str, int]:
    """Names of the sharded expert parameters -> their full first dimension E."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallelMoE):
            for p_name, _ in m.experts.named_parameters(recurse=False):
                out[f"{name}.experts.{p_name}"] = m.n_experts
    return out


def gather_rows(t: torch.Tensor, link: Link) -> torch.Tensor:
    """Concatenate each member's t [n, ...] along dim 0 (equal n), in member order."""
    t = t.detach().contiguous()
    out = t.new_empty((link.size * t.shape[0], *t.shape[1:]))
    link.run("all-gather", lambda: dist.all_gather_single(out, t, group=link.group))
    return out


def gather_full_state(model: nn.Module, ep: ExpertParallel) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert parameter gathered over the EP group (collective)."""
    state = model.state_dict()
    for name in expert_param_names(model):
        state[name] = gather_rows(state[name], ep.ep)
    return state
