"""EPLB across the ranks of an engine group: the first placement, and live re-planning while
serving (DESIGN §8, paper §3.4: redundant experts "periodically adjusted based on the statistical
expert load during the online service").

`initial_placement` gives every MoE layer its routing table from the loads in `EPConfig.loads`
(an `ExpertLoadStats` window; uniform when absent): the identity without EPLB, the planner's
(`eplb.planner.plan`, global policy by default for decode) with S slots per rank for static and
live EPLB, the hosting of `eplb.dynamic.plan_hosting` (H hosted, A active) for dynamic redundancy.

`LiveEPLB` (eplb="live"): after every step each rank pushes its logical counts of the step into
a sliding window (`ExpertLoadStats`, `eplb_window` steps); every `eplb_interval` steps
  1. the windows are summed over the group (one all_reduce: the group's loads [L, E]);
  2. the group's first rank plans (a full plan, or `incremental.rebalance_incremental` within
     `max_moves` moved experts per layer) and broadcasts the new phy2log [L, R];
  3. `plan_moves` lists, identically on every rank, where each new slot's weights come from: the
     rank's own old slots when it held the expert (a local copy), else a rank that held it (the
     holders take turns); only those cross-rank copies travel, as one point-to-point message per
     expert (w1|w3|w2 packed) in one `dist.batch_isend_irecv`, bounded by the group's timeout;
  4. every layer's new slot weights are assembled aside and the routing tables switched together.
All of it runs between two steps, on every rank at the same step (steps are synchronised), so no
token ever sees a half-moved layer and requests in flight are unchanged: every replica holds its
expert's exact weights. Counters for /metrics: `replans`, `experts_moved` (cross-rank copies,
the group's), `bytes_moved` (bytes this rank received), `seconds` spent re-planning and moving.

Shapes: L MoE layers, E logical experts, R physical slots, P ranks, S = R/P slots per rank,
I expert hidden size, D dim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config import ConfigError, ModelConfig
from dsv3.infer.eplb.dynamic import plan_hosting
from dsv3.infer.eplb.incremental import rebalance_incremental
from dsv3.infer.eplb.placement import Placement
from dsv3.infer.eplb.planner import plan
from dsv3.infer.eplb.stats import ExpertLoadStats

from .ep_moe import SlotTable

if TYPE_CHECKING:
    from .ep_engine import EPConfig, EPEngine

EPLB_MODES = ("none", "static", "live", "dynamic")


def _planner_layout(cfg: ModelConfig, ep: EPConfig, ranks: int, ranks_per_node: int) -> tuple[int, int]:
    """(groups, nodes) the planner sees: one of each for the global policy."""
    if ep.policy == "global":
        return 1, 1
    return cfg.n_expert_groups, max(1, ranks // ranks_per_node)


def initial_placement(
    cfg: ModelConfig, n_layers: int, ranks: int, ep: EPConfig, ranks_per_node: int = 1
) -> Placement:
    """The routing tables [L, R] an engine group starts with (module docstring)."""
    E = cfg.n_routed_experts + (1 if ep.shared_as_routed else 0)  # logical experts
    if ep.eplb == "none":
        if E % ranks:
            raise ConfigError(
                f"n_routed_experts: {E} experts do not divide over {ranks} ranks (use eplb='static' "
                "with slots_per_rank)"
            )
        return Placement.from_phy2log(torch.arange(E).expand(n_layers, E), E, ranks)
    loads = ep.loads if ep.loads is not None else torch.ones(n_layers, E)
    if tuple(loads.shape) != (n_layers, E):
        raise ConfigError(
            f"loads: expected shape ({n_layers}, {E}) (MoE layers, experts), got {tuple(loads.shape)}"
        )
    S = ep.slots_per_rank if ep.slots_per_rank is not None else -(-E // ranks)
    if S * ranks < E:
        raise ConfigError(f"slots_per_rank: {S} x {ranks} ranks cannot hold the {E} experts")
    groups, nodes = _planner_layout(cfg, ep, ranks, ranks_per_node)
    if ep.eplb == "dynamic":
        assert ep.active_per_rank is not None
        if ep.active_per_rank * ranks < E:
            raise ConfigError(f"active_per_rank: {ep.active_per_rank} x {ranks} ranks cannot run {E} experts")
        return plan_hosting(loads.double(), ranks, S, ep.active_per_rank, groups, nodes)
    return plan(loads.double(), S * ranks, groups, nodes, ranks, policy=ep.policy)


@dataclass(frozen=True)
class Move:
    """Slot `dst_slot` of rank `dst` (local index) gets expert `expert`'s weights from rank `src`'s
    old slot `src_slot` (local index); src == dst is a local copy."""

    layer: int
    expert: int
    src: int
    src_slot: int
    dst: int
    dst_slot: int


def plan_moves(old: torch.Tensor, new: torch.Tensor, ranks: int) -> list[Move]:
    """old, new phy2log [L, R] -> one Move per slot of the new placement (deterministic: every rank
    computes the same list). A rank that held the expert copies it locally; otherwise the old
    holders take turns sending (the one that has sent least so far, lowest rank first)."""
    L, R = new.shape
    S = R // ranks
    moves: list[Move] = []
    for layer in range(L):
        old_rank = old[layer].view(ranks, S).tolist()
        holders: dict[int, list[tuple[int, int]]] = {}
        for g, slots in enumerate(old_rank):
            for s, e in enumerate(slots):
                holders.setdefault(e, []).append((g, s))
        sent = [0] * ranks
        for g, slots in enumerate(new[layer].view(ranks, S).tolist()):
            for s, e in enumerate(slots):
                if e in old_rank[g]:
                    moves.append(Move(layer, e, g, old_rank[g].index(e), g, s))
                    continue
                src, src_slot = min(holders[e], key=lambda h: (sent[h[0]], h[0]))
                sent[src] += 1
                moves.append(Move(layer, e, src, src_slot, g, s))
    return moves


def _pack(experts: nn.Module, slot: int) -> torch.Tensor:
    """One slot's weights as one flat tensor: w1 [D, I] | w3 [D, I] | w2 [I, D]."""
    return torch.cat([experts.w1[slot].flatten(), experts.w3[slot].flatten(), experts.w2[slot].flatten()])


def _assemble(experts: nn.Module, rows: list[torch.Tensor]) -> nn.Module:
    """A copy of a fused experts module whose slot j holds the packed weights rows[j]."""
    import copy

    out = copy.copy(experts)
    out._parameters = {}
    a, b = experts.w1.shape[1:]
    n1 = a * b
    flat = torch.stack(rows)  # (S, 3 * D * I)
    out._parameters["w1"] = nn.Parameter(flat[:, :n1].reshape(-1, a, b).clone(), requires_grad=False)
    out._parameters["w3"] = nn.Parameter(flat[:, n1 : 2 * n1].reshape(-1, a, b).clone(), requires_grad=False)
    out._parameters["w2"] = nn.Parameter(flat[:, 2 * n1 :].reshape(-1, b, a).clone(), requires_grad=False)
    return out


class LiveEPLB:
    """Live re-planning of an `EPEngine`'s placement (module docstring)."""

    def __init__(self, engine: EPEngine, cfg: EPConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.n_experts = engine.moe[0].n_logical
        self.stats = ExpertLoadStats(len(engine.moe), self.n_experts, cfg.eplb_window)
        self.replans, self.experts_moved, self.bytes_moved, self.seconds = 0, 0, 0, 0.0
        self.last_loads: torch.Tensor | None = None  # [L, E] the group's loads of the last re-plan

    def after_step(self, step: int) -> None:
        """Record this step's counts; re-plan every `eplb_interval` steps (a collective)."""
        self.stats.push(torch.stack([m.take_counts() for m in self.engine.moe]))
        if step % self.cfg.eplb_interval == 0:
            self.replan()

    @torch.no_grad()
    def replan(self) -> Placement:
        """Plan from the group's window, move the changed weights, switch the tables."""
        start = time.perf_counter()
        eng, link = self.engine, self.engine.group.ep
        device = eng.runner.device  # the collectives' tensors live where the backend wants them
        loads = self.stats.loads().to(device)
        link.run("all_reduce (EPLB loads)", lambda: dist.all_reduce(loads, group=link.group))
        loads = self.last_loads = loads.cpu()
        current = eng.placement
        if link.index == 0:
            groups, nodes = _planner_layout(
                eng.model.config, self.cfg, current.num_gpus, eng.group.ranks_per_node
            )
            if self.cfg.max_moves is None:
                new = plan(
                    loads.double(),
                    current.num_replicas,
                    groups,
                    nodes,
                    current.num_gpus,
                    policy=self.cfg.policy,
                )
            else:
                new = rebalance_incremental(
                    loads.double(), current, self.cfg.max_moves, groups, nodes, policy=self.cfg.policy
                )
            phy2log = new.phy2log.to(device)
        else:
            phy2log = torch.empty_like(current.phy2log, device=device)
        link.run(
            "broadcast (EPLB plan)", lambda: dist.broadcast(phy2log, src=link.members[0], group=link.group)
        )
        placement = Placement.from_phy2log(phy2log.cpu(), self.n_experts, current.num_gpus)
        self.apply(placement)
        self.replans += 1
        self.seconds += time.perf_counter() - start
        return placement

    @torch.no_grad()
    def apply(self, placement: Placement) -> None:
        """Move the weights `placement` needs (point-to-point) and switch every layer's table."""
        eng, link = self.engine, self.engine.group.ep
        P, me = link.size, link.index
        moves = plan_moves(eng.placement.phy2log, placement.phy2log, P)
        ops, recv = [], {}
        for tag, mv in enumerate(moves):
            if mv.src == mv.dst:
                continue
            self.experts_moved += 1
            if mv.src == me:
                payload = _pack(eng.moe[mv.layer].experts, mv.src_slot)
                ops.append(dist.P2POp(dist.isend, payload, group=link.group, group_peer=mv.dst, tag=tag))
            elif mv.dst == me:
                buf = torch.empty_like(_pack(eng.moe[mv.layer].experts, 0))
                recv[(mv.layer, mv.dst_slot)] = buf
                ops.append(dist.P2POp(dist.irecv, buf, group=link.group, group_peer=mv.src, tag=tag))
        if ops:
            works = link.run("batch_isend_irecv (EPLB weights)", lambda: dist.batch_isend_irecv(ops))
            limit = timedelta(seconds=link.timeout) if link.timeout else None
            for w in works:
                link.run("EPLB weight transfer wait", lambda w=w: w.wait(limit) if limit else w.wait())
        self.bytes_moved += sum(b.numel() * b.element_size() for b in recv.values())
        S = placement.slots_per_gpu
        new_experts = []
        for layer, m in enumerate(eng.moe):
            rows = [None] * S
            for mv in moves:
                if mv.layer == layer and mv.dst == me:
                    rows[mv.dst_slot] = (
                        _pack(m.experts, mv.src_slot) if mv.src == me else recv[(layer, mv.dst_slot)]
                    )
            new_experts.append(_assemble(m.experts, rows))
        for layer, m in enumerate(eng.moe):  # the switch: every layer's table and weights together
            m.set_table(SlotTable.of(placement, layer), new_experts[layer])
        eng.placement = placement
