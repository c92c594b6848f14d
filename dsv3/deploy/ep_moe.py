"""The MoE layer of an expert-parallel serving group: token copies to physical expert slots spread
over the group's ranks, with EPLB replicas or dynamic redundancy (DESIGN §8, paper §3.4).

A routing table per layer (`SlotTable`, one layer's row of an EPLB `Placement`) maps every logical
expert to its physical slots; rank g of the group hosts slots g*S .. g*S+S-1 (GPU-major, the
planner's numbering) and holds the expert weights of those slots only. `route` is the MoE's gate
(logical experts and counts, unchanged) followed by the replica choice, which turns the call's
expert ids into slot ids; from there dispatch and combine are `ExpertParallelMoE`'s (one hop or
two, FP8 dispatch wire), over a `dispatch.Placement` of the R slots on the P ranks. Without EPLB
the table is the identity (R = E slots, E/P consecutive experts per rank): exactly the layout of
`ExpertParallelMoE`, and with groups on nodes node-limited routing bounds a token's nodes as there.
(Replicas placed by the global policy may sit on other nodes: correct, but a token may then reach
more than M nodes; the hierarchical policy keeps every replica on its group's node.)

Replica choice:
  round-robin  over the expert's replicas, as `routing.replica_of_copies` does, each rank's copies
               starting at replica (rank index + layer calls so far): ranks holding one copy each
               of an expert do not all pick its first replica, and the replica that gets a step's
               odd copy rotates, so that over a window each replica carries the planner's even
               share (no communication; bench/deploy.py, static plan on the run's own loads:
               max/mean 1.048 with a fixed start per rank, 1.029 rotating, the planner's 1.032);
  dynamic      (`active_per_rank` = A of the H hosted slots per rank): the layer's counts of the
               group are all-gathered ([P, E], one small collective), every rank computes the same
               active set and per-slot token quota (`eplb.dynamic.dynamic_layer`, deterministic,
               `DYNAMIC_SWEEPS` sweeps of the split),
               and this rank's copies of expert e take the quota's blocks after the copies of the
               lower ranks (offset = exclusive prefix of the counts over ranks).
Every replica holds a copy of its expert's weights, so the output equals the single-device MoE's
whatever the choice: the same expert function on the same tokens, only on another slot.

Shared expert as a routed expert (`shared_as_routed`, the paper's decode deployment: every token
selects 9 experts): the shared expert becomes logical expert E, which every token visits with gate
value 1 (so EPLB replicates it like a hot expert, its load being one copy per token); it is then
computed on its slots and summed by the combine instead of data-parallel on every rank. Otherwise
(prefill's treatment) it runs on every rank for its own tokens.

Zero tokens: a rank without work still calls the layer (`empty_call`, x [1, 0, D]): the gate,
dispatch and combine then send and receive nothing but join every collective of the layer.

Counters (the engine's load figures; `reset_counters` zeroes them): `calls`, `counts` [E] logical
copies of this rank's tokens, `slot_rows` [S] copies each hosted slot processed (this rank's
expert load), `seconds` in the layer, `plan_seconds` of it spent choosing replicas dynamically.

Shapes: N tokens, K experts per token, D dim, E logical experts, R physical slots, P ranks,
S = R/P slots per rank.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from dsv3.infer.eplb.dynamic import dynamic_layer
from dsv3.infer.eplb.placement import Placement
from dsv3.infer.eplb.routing import replica_of_copies
from dsv3.model.moe import MoE, MoECall
from dsv3.parallel.expert.dispatch import Placement as SlotLayout
from dsv3.parallel.expert.moe import ExpertParallel, ExpertParallelMoE, gather_rows

# Sweeps of the token split's descent per layer-step: on skewed loads (8 to 256 experts) 2-5 sweeps
# come within a token or two of the 50-sweep optimum (often to it) at a tenth of the cost, which
# decides whether the choice fits in a layer's compute.
DYNAMIC_SWEEPS = 4


@dataclass(frozen=True)
class SlotTable:
    """One layer's routing table: which logical expert each physical slot holds and back."""

    phy2log: torch.Tensor  # [R] long: logical expert of each slot (GPU-major)
    log2phy: torch.Tensor  # [E, max_replicas] long: slots of each expert, padded with -1
    logcnt: torch.Tensor  # [E] long: replicas of each expert

    @classmethod
    def of(cls, placement: Placement, layer: int) -> SlotTable:
        return cls(placement.phy2log[layer], placement.log2phy[layer], placement.logcnt[layer])

    @classmethod
    def identity(cls, n_experts: int) -> SlotTable:
        """No redundancy: slot e holds expert e."""
        return cls.of(Placement.from_phy2log(torch.arange(n_experts)[None], n_experts, 1), 0)

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[0]

    def to(self, device: torch.device) -> SlotTable:
        return SlotTable(self.phy2log.to(device), self.log2phy.to(device), self.logcnt.to(device))

    def rank_experts(self, rank: int, ranks: int) -> torch.Tensor:
        """[S] logical experts of rank's slots."""
        return self.phy2log.view(ranks, -1)[rank]


def experts_for(experts: nn.Module, logical: torch.Tensor) -> nn.Module:
    """A copy of a fused experts module ([E, ...] per parameter) holding rows `logical` [S]."""
    local = copy.copy(experts)
    local._parameters, local._buffers, local._modules = {}, dict(experts._buffers), dict(experts._modules)
    for name, p in experts.named_parameters(recurse=False):
        local._parameters[name] = nn.Parameter(p.detach()[logical].clone(), requires_grad=False)
    return local


def with_shared_expert(moe: MoE) -> nn.Module:
    """The routed experts [E, ...] and the shared expert as row E: [E + 1, ...] (the shared MLP's
    hidden size must be one expert's, V3's n_shared_experts = 1)."""
    s, ex = moe.shared_experts, moe.experts
    if s is None or s.gate_proj.weight.shape != (ex.w1.shape[2], ex.w1.shape[1]):
        raise ValueError("shared_as_routed: needs one shared expert of the routed experts' size")
    w = {"w1": s.gate_proj.weight.T, "w3": s.up_proj.weight.T, "w2": s.down_proj.weight.T}  # [in, out]
    out = copy.copy(ex)
    out._parameters = {
        n: nn.Parameter(torch.cat([p.detach(), w[n].detach()[None]]), requires_grad=False)
        for n, p in ex.named_parameters(recurse=False)
    }
    return out


class EPMoE(ExpertParallelMoE):
    """`ExpertParallelMoE` routed to physical slots (module docstring); forward semantics unchanged."""

    table: SlotTable
    active_per_rank: int | None

    @classmethod
    def from_slots(
        cls,
        moe: MoE,
        ep: ExpertParallel,
        table: SlotTable,
        active_per_rank: int | None = None,
        shared_as_routed: bool = False,
    ) -> EPMoE:
        """moe holds all E experts; keep only this rank's slots' weights. `ep`'s links are shared,
        its placement replaced by the R slots over the group. shared_as_routed: the shared expert
        is logical expert E (module docstring)."""
        P = ep.ep.size
        n_logical = moe.n_experts + (1 if shared_as_routed else 0)
        if table.num_slots % P:
            raise ValueError(f"slots: {table.num_slots} physical slots do not divide over {P} ranks")
        if int(table.phy2log.max()) >= n_logical or table.logcnt.shape != (n_logical,):
            raise ValueError(f"slots: the routing table is not one of {n_logical} logical experts")
        S = table.num_slots // P
        if active_per_rank is not None and not 1 <= active_per_rank <= S:
            raise ValueError(f"active_per_rank: {active_per_rank} must be in [1, {S}] (slots per rank)")
        new = cls.__new__(cls)
        new.__dict__.update(moe.__dict__)  # same gate, shared experts, buffers
        new._parameters, new._buffers, new._modules = (
            dict(moe._parameters),
            dict(moe._buffers),
            dict(moe._modules),
        )
        layout = SlotLayout(table.num_slots, P, ep.placement.ranks_per_node)
        new.ep = dataclasses.replace(ep, placement=layout)  # same links and counters
        new.last_max_nodes, new.active_per_rank = 0, active_per_rank
        new.shared_as_routed, new.n_logical = shared_as_routed, n_logical
        new.table = table.to(moe.experts.w1.device)
        full = with_shared_expert(moe) if shared_as_routed else moe.experts
        new.experts = experts_for(full, new.table.rank_experts(ep.index, P))
        new.reset_counters()
        new.fresh_counts = torch.zeros(n_logical, dtype=torch.long)  # since `take_counts`
        return new

    def reset_counters(self) -> None:
        S = self.table.num_slots // self.ep.ep.size
        self.calls, self.seconds, self.plan_seconds = 0, 0.0, 0.0
        self.counts = torch.zeros(self.n_logical, dtype=torch.long)
        self.slot_rows = torch.zeros(S, dtype=torch.long)

    def take_counts(self) -> torch.Tensor:
        """[E] logical counts of this rank's tokens since the last take (live EPLB's records)."""
        out, self.fresh_counts = self.fresh_counts, torch.zeros_like(self.fresh_counts)
        return out

    def set_table(self, table: SlotTable, experts: nn.Module) -> None:
        """Switch the routing table and this rank's slot weights together (between steps)."""
        if table.num_slots != self.table.num_slots:
            raise ValueError(f"slots: {table.num_slots} slots, the layer has {self.table.num_slots}")
        self.table, self.experts = table.to(experts.w1.device), experts

    # ---- the halves ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D] (T may be 0: see `empty_call`)."""
        start = time.perf_counter()
        out = super().forward(x)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return out

    def empty_call(self) -> None:
        """Join the layer's collectives with no tokens."""
        w = self.experts.w1
        self(w.new_zeros(1, 0, self.gate.weight.shape[1]))

    def route(self, x: torch.Tensor) -> MoECall:
        """The MoE's gate (logical ids and counts), then each copy's physical slot in `indices`."""
        call = super().route(x)
        if self.shared_as_routed:  # every token also visits expert E, weight 1; counts [E + 1]
            N = call.indices.shape[0]
            call.indices = torch.cat([call.indices, call.indices.new_full((N, 1), self.n_experts)], 1)
            call.weights = torch.cat([call.weights, call.weights.new_ones(N, 1)], 1)
            call.counts = torch.cat([call.counts, call.counts.new_full((1,), N)])
        self.counts += call.counts.cpu()
        self.fresh_counts += call.counts.cpu()
        call.indices = self.replica_slots(call)
        return call

    def replica_slots(self, call: MoECall) -> torch.Tensor:
        """call.indices [N, K] logical experts -> [N, K] physical slots."""
        t, index = self.table, self.ep.index
        if self.active_per_rank is None:
            offset = torch.full_like(t.logcnt, index + self.calls)  # rotates over ranks and calls
            return replica_of_copies(call.indices, t.log2phy, t.logcnt, offset=offset)
        start = time.perf_counter()
        group = gather_rows(call.counts[None], self.ep.ep)  # (P, E) the group's counts
        load = group.sum(0).cpu()
        _, quota = dynamic_layer(t.phy2log.cpu(), self.ep.ep.size, load, self.active_per_rank, DYNAMIC_SWEEPS)
        offset = group[:index].sum(0)
        slots = replica_of_copies(call.indices, t.log2phy, t.logcnt, quota.to(offset.device), offset)
        self.plan_seconds += time.perf_counter() - start
        return slots

    def run_shared(self, call: MoECall) -> None:
        if self.shared_as_routed:
            call.shared = None  # computed on its slots, added by the combine
        else:
            super().run_shared(call)

    def run_experts(self, call: MoECall) -> None:
        super().run_experts(call)
        self.slot_rows += call.row_counts.cpu()

    def extra_repr(self) -> str:
        P = self.ep.ep.size
        mine = self.table.rank_experts(self.ep.index, P).tolist()
        return f"slots {self.table.num_slots} over {P} ranks, this rank's experts {mine}"
