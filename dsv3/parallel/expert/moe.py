"""Expert parallelism applied to the single-device model from outside (DESIGN §5, paper §3.2.2).

`parallelize_experts(model, ep)` swaps every `MoE` of the model for an `ExpertParallelMoE`: the
same gate and shared experts (replicated, data-parallel), the same parameter names, but only this
rank's block of routed experts (`w1/w3/w2[El, ...]` sliced from the full `[E, ...]`), and its own
`dispatch` (token copies to the experts' ranks) and `combine` (outputs back), one hop or two
(`dispatch.py`); `route` and `run_experts` are the MoE's. Everything the trainer reads keeps its
meaning: the call's `counts` [E] count this rank's tokens per expert (the trainer sums them over
ranks for the bias update), its `balance` is per sequence and so local.

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
from dsv3.model.moe import MoE, MoECall
from dsv3.parallel.comm import WIRES, CommStats, Link
from dsv3.parallel.expert.dispatch import (
    Placement,
    all_gather_routed,
    nodes_per_token,
    one_hop_combine,
    one_hop_dispatch,
    one_hop_finish_combine,
    one_hop_finish_dispatch,
    one_hop_start_combine,
    one_hop_start_dispatch,
    two_hop_combine,
    two_hop_dispatch,
)
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
        if p.shape[0] == per_rank and not p.is_meta:  # materialised as this block (materialize.py)
            local._parameters[name] = p
            continue
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
            if p.shape[0] not in (moe.n_experts, ep.placement.local_experts):
                raise ValueError(
                    f"experts.{name}: expected [E={moe.n_experts}, ...] or this rank's block "
                    f"[{ep.placement.local_experts}, ...], got {tuple(p.shape)}"
                )
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

    def dispatch(self, call: MoECall) -> None:
        """The token copies to their experts' ranks (all-to-all): `rows` are the copies this rank's
        experts receive, grouped by local expert, `row_counts` [El]; the plan stays in the call."""
        ep = self.ep
        fan_out = nodes_per_token(call.indices, ep.placement)
        self.last_max_nodes = int(fan_out.max()) if fan_out.numel() else 0
        if ep.two_hop:
            call.rows, call.row_counts, call.plan = two_hop_dispatch(
                call.x, call.weights, call.indices, ep.placement, ep.inter, ep.intra, ep.dispatch_wire,
                ep.combine_wire,
            )  # fmt: skip
        else:
            call.rows, call.row_counts, call.plan = one_hop_dispatch(
                call.x, call.indices, ep.placement, ep.ep, ep.dispatch_wire, ep.combine_wire
            )

    def combine(self, call: MoECall) -> torch.Tensor:
        """The experts' outputs back to their tokens' ranks (all-to-all), weighted, summed, + shared."""
        ep = self.ep
        if ep.two_hop:
            routed = two_hop_combine(
                call.out, call.x.shape[0], call.plan, ep.inter, ep.intra, ep.combine_wire
            )
        else:
            routed = one_hop_combine(call.out, call.weights, call.plan, ep.ep, ep.combine_wire)
        return self.add_shared(call, routed)

    # ---- asynchronous (one hop; two hops fall back to the synchronous halves) ---------------------
    def start_dispatch(self, call: MoECall) -> None:
        """Start the dispatch all-to-all and leave it in flight: `run_experts` waits for it
        (`call.pending`), so another micro-batch's computation can run in between."""
        if self.ep.two_hop:
            self.dispatch(call)
            return
        ep = self.ep
        fan_out = nodes_per_token(call.indices, ep.placement)
        self.last_max_nodes = int(fan_out.max()) if fan_out.numel() else 0
        call.plan = one_hop_start_dispatch(
            call.x, call.indices, ep.placement, ep.ep, ep.dispatch_wire, ep.combine_wire
        )
        call.order = call.plan["order"]
        call.pending = self._finish_dispatch

    @staticmethod
    def _finish_dispatch(call: MoECall) -> None:
        call.rows, call.row_counts = one_hop_finish_dispatch(call.plan)

    def start_combine(self, call: MoECall) -> None:
        """Start the all-to-all back (one hop), in flight until `finish_combine`. The pending
        exchange and its token go into `call.plan`: fill a copy of the call and of its plan."""
        if self.ep.two_hop:
            return
        pending = one_hop_start_combine(call.out, call.plan, self.ep.ep, self.ep.combine_wire)
        call.plan = {**call.plan, "combine_pending": pending, "combine_token": pending.token}

    def finish_combine(self, call: MoECall) -> torch.Tensor:
        if "combine_pending" not in call.plan:
            return self.combine(call)
        plan = call.plan
        routed = one_hop_finish_combine(
            plan["combine_pending"], plan["combine_token"], call.weights, plan["order"]
        )
        return self.add_shared(call, routed)

    def extra_repr(self) -> str:
        first, n = self.ep.index * self.ep.placement.local_experts, self.ep.placement.local_experts
        return f"experts {first}..{first + n - 1} of {self.n_experts}"


class AllGatherMoE(ExpertParallelMoE):
    """The naive alternative to dispatch (a reference for tests and benchmarks): nothing moves in
    `dispatch`; the experts gather every token of the EP group and reduce-scatter the partial outputs
    (`dispatch.all_gather_routed`); `combine` adds the shared experts."""

    def dispatch(self, call: MoECall) -> None:
        fan_out = nodes_per_token(call.indices, self.ep.placement)
        self.last_max_nodes = int(fan_out.max()) if fan_out.numel() else 0

    def run_experts(self, call: MoECall) -> None:
        ep = self.ep
        call.out = all_gather_routed(call.x, call.weights, call.indices, self.experts, ep.placement, ep.ep)
        self.run_shared(call)

    def combine(self, call: MoECall) -> torch.Tensor:
        return self.add_shared(call, call.out)


def parallelize_experts(model: nn.Module, ep: ExpertParallel) -> list[str]:
    """Swap every MoE of `model` (in place) for an ExpertParallelMoE; returns their module names.
    Idempotent: MoEs that are already expert-parallel are left as they are."""
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, MoE) and not isinstance(m, ExpertParallelMoE)  # already parallel: kept
    ]
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
