"""One rank of an expert-parallel inference engine group (DESIGN §8, paper §3.4 "decoding").

A group of P ranks (a torch.distributed process group: gloo here, NCCL on GPUs) serves as one
engine: attention is data-parallel -- every rank owns its requests, their paged latent cache,
scheduler, runner and sampling, all the single-process `Engine`'s -- and the routed experts are
sharded over the group (`ep_moe.EPMoE`: dispatch/combine of dsv3.parallel.expert, FP8 dispatch
wire, node-limited two-hop when the group spans nodes, EPLB replicas or dynamic redundancy).

Synchronised steps. An MoE layer's all-to-all must be entered by every rank the same number of
times, and ranks differ in work: one runs a decode forward and three prefill chunks, another only
decodes, a third has no request at all. So each `step` first agrees on the step's number of
forwards (one all_reduce of [forwards, has work] with MAX) and, after its own forwards, a rank
calls every MoE layer with 0 tokens (`EPMoE.empty_call`) until it has made the group's number of
layer calls. Every MoE layer runs the same sequence of collectives, so counting layer calls is
enough: a forward that failed half-way between two MoE layers (its requests fail as in `Engine`)
is completed the same way. (An exception inside a layer's exchanges, or a dead peer, breaks the
group: the collectives raise `PeerFailure` within the group's timeout and `step` re-raises it.)
Every rank must call `step` together, also with nothing to do; `group_has_unfinished` (a
collective) says whether the group has work left, `run_group` drives a group to completion.

Two-micro-batch prefill (`EPConfig.two_batch_prefill`, on by default in groups of 2+ ranks: the
paper's prefill, whose all-to-alls it hides; a one-rank group has no exchange to hide and keeps
one batch, whose kernels are larger: bench/deploy.py's prefill section measures both). It runs
through `two_batch.two_batch_hidden`: its halves call the MoE halves directly (never `forward`,
so `EPMoE.calls` does not move) and make every layer's exchanges twice, so it cannot be padded
by one-batch empty calls. The agreement is then on two numbers, the step's one-batch forwards
(the decode forward) and its two-batch prefill calls, and one mechanism (`_pad`) joins both in
the order every rank's step runs them: the one-batch layer calls first (a rank without a decode
joins the group's before its first prefill call), then two-batch calls with no rows. A two-batch
call is counted whole: a failure in a half's attention goes on as an empty half and still makes
every exchange (`two_batch.MicroBatchFailed`). Load statistics see every token either way: the
halves route through `EPMoE.route`, which adds each half's counts to `counts` / `take_counts`
(live EPLB) -- module forward hooks (`ExpertLoadStats.attach`) would not fire, none is used here.
EPMoE runs the asynchronous halves of `ExpertParallelMoE` (one hop; two-hop dispatch falls back
to synchronous exchanges inside the same schedule); routing to slots, static, live and dynamic
EPLB happen in `route`, before the exchange starts (dynamic: one all-gather per half and layer).

What this engine leaves out, for correctness first:
  - the fast decode path (dsv3.infer.decode: one fused kernel per layer) is off: it routes and runs
    the experts inside its kernel, so the swapped MoE layers run on the model's reference forward
    (as the runner does for any swapped module);
  - the shared expert stays a data-parallel MLP on every rank unless `EPConfig.shared_as_routed`
    (the paper's decode: one more routed expert, 9 per token, replicated by EPLB);
  - speculative decoding and `compile` are refused (the MTP module's MoE would need the same
    synchronisation).
Re-planning between steps (`eplb_live.LiveEPLB`) runs inside `step`, after the forwards.

Shapes: P ranks of the group, L MoE layers, E logical experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv3.config import ConfigError
from dsv3.infer.engine import Engine, EngineConfig, _group_chunks
from dsv3.infer.eplb.planner import POLICIES
from dsv3.infer.outputs import RequestOutput
from dsv3.model.moe import MoE
from dsv3.model.transformer import Transformer
from dsv3.parallel.comm import WIRES, CommStats, Link, PeerFailure
from dsv3.parallel.expert.dispatch import Placement as SlotLayout
from dsv3.parallel.expert.moe import ExpertParallel

from .ep_moe import EPMoE, SlotTable
from .eplb_live import EPLB_MODES, LiveEPLB, initial_placement
from .two_batch import MicroBatchFailed, two_batch_hidden


@dataclass(frozen=True)
class EPConfig:
    """How the group runs its experts."""

    two_hop: bool = False  # node-limited two-hop dispatch (the group spans nodes of ranks_per_node)
    dispatch: str = "same"  # wire format of the dispatch: same | bf16 | fp8 (V3: fp8)
    combine: str = "same"  # wire format of the combine: same | bf16 (V3: bf16)
    eplb: str = "none"  # none | static (planned once) | live (re-planned) | dynamic (active set per step)
    slots_per_rank: int | None = None  # expert slots per rank (dynamic: hosted); None: E / ranks
    active_per_rank: int | None = None  # dynamic: slots active per step and layer (V3 decode: 9 of 16)
    loads: torch.Tensor | None = None  # [L, E] loads the first plan uses (ExpertLoadStats); None: uniform
    policy: str = "global"  # planner policy (the paper: global for decode, hierarchical for prefill)
    eplb_interval: int = 100  # live: steps between two re-plans
    eplb_window: int = 1000  # live: steps of load statistics the planner sees
    max_moves: int | None = None  # live: experts moved per layer and re-plan at most (None: full plan)
    shared_as_routed: bool = False  # the shared expert as logical expert E (the paper's decode, ep_moe.py)
    two_batch_prefill: bool = (
        True  # prefill as two overlapped micro-batches (two_batch.py; groups of 2+ ranks)
    )

    def __post_init__(self) -> None:
        if self.dispatch not in WIRES:
            raise ConfigError(f"dispatch: expected one of {WIRES}, got {self.dispatch!r}")
        if self.combine not in ("same", "bf16"):
            raise ConfigError(f"combine: expected 'same' or 'bf16', got {self.combine!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: expected one of {POLICIES}, got {self.policy!r}")
        if self.eplb not in EPLB_MODES:
            raise ConfigError(f"eplb: expected one of {EPLB_MODES}, got {self.eplb!r}")
        for name in ("slots_per_rank", "active_per_rank", "max_moves"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < (0 if name == "max_moves" else 1)):
                raise ConfigError(f"{name}: must be a positive integer or None, got {v!r}")
        for name in ("eplb_interval", "eplb_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if (self.eplb == "dynamic") != (self.active_per_rank is not None):
            raise ConfigError("active_per_rank: set it exactly when eplb='dynamic'")
        if self.eplb in ("none",) and self.slots_per_rank is not None:
            raise ConfigError("slots_per_rank: redundant slots need eplb='static', 'live' or 'dynamic'")


@dataclass
class EngineGroup:
    """This rank's links inside its engine group: the whole group, and for two hops the ranks of
    its node (intra) and those with its local index on every node (inter)."""

    ep: Link
    intra: Link
    inter: Link
    ranks_per_node: int
    stats: CommStats

    @property
    def size(self) -> int:
        return self.ep.size

    @property
    def index(self) -> int:
        return self.ep.index

    def expert_parallel(self, n_slots: int, cfg: EPConfig) -> ExpertParallel:
        layout = SlotLayout(n_slots, self.size, min(self.ranks_per_node, self.size))
        return ExpertParallel(
            layout, self.ep, self.inter, self.intra, cfg.two_hop, cfg.dispatch, cfg.combine, self.stats
        )


def build_engine_groups(
    groups: Seq[Seq[int]] | None = None, ranks_per_node: int | None = None, timeout: float = 60.0
) -> EngineGroup | None:
    """Create the process groups of every engine group (a collective: every rank of the world calls
    it with the same `groups`, global ranks; default: one group of the whole world) and return this
    rank's `EngineGroup` (None if it is in none). `ranks_per_node` (default: the group) splits a
    group into nodes of consecutive members, for two-hop dispatch."""
    if not dist.is_initialized():
        raise RuntimeError("build_engine_groups: torch.distributed is not initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [list(g) for g in (groups if groups is not None else [range(world)])]
    seen = [r for g in groups for r in g]
    if len(seen) != len(set(seen)) or any(not 0 <= r < world for r in seen):
        raise ValueError(f"groups: each rank of [0, {world}) at most once, got {groups}")
    stats, mine = CommStats(), None
    for members in groups:
        L = min(ranks_per_node or len(members), len(members))
        if len(members) % L:
            raise ValueError(f"ranks_per_node: {L} does not divide the group {members}")
        nodes = [i // L for i in range(len(members))]
        subsets = [("ep", members)]
        subsets += [("intra", members[b : b + L]) for b in range(0, len(members), L)]
        subsets += [("inter", members[i::L]) for i in range(L)]
        links = {}
        for name, ranks in subsets:  # the same order on every rank (new_group is a collective)
            pg = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
            if rank in ranks:
                links[name] = Link(
                    f"engine-{name}",
                    pg,
                    ranks,
                    rank,
                    [nodes[members.index(r)] for r in ranks],
                    stats,
                    timeout,
                )
        if rank in members:
            mine = EngineGroup(links["ep"], links["intra"], links["inter"], L, stats)
    return mine


def main_moe_blocks(model: Transformer) -> list:
    """The main model's blocks whose feed-forward is a MoE (the MTP blocks are not run here)."""
    return [b for b in model.layers if isinstance(b.mlp, MoE)]


class EPEngine(Engine):
    """`Engine` on one rank of an expert-parallel group (module docstring): the same interface
    (add_request(s), step, has_unfinished, abort_request -> RequestOutput), with `step` a
    collective of the group."""

    def __init__(
        self,
        model: Transformer,
        group: EngineGroup,
        config: EngineConfig | None = None,
        ep_config: EPConfig | None = None,
        tokenizer=None,
    ) -> None:
        config, ep_config = config or EngineConfig(), ep_config or EPConfig()
        if config.speculative:
            raise ConfigError("speculative: not supported by the expert-parallel engine yet")
        if config.compile:
            raise ConfigError("compile: not supported by the expert-parallel engine (MoE layers swapped)")
        config = dataclasses.replace(config, fast_decode=False)  # see the module docstring
        self.group, self.ep_config = group, ep_config
        blocks = main_moe_blocks(model)
        placement = initial_placement(model.config, len(blocks), group.size, ep_config, group.ranks_per_node)
        ep = group.expert_parallel(placement.num_replicas, ep_config)
        for i, b in enumerate(blocks):
            table = SlotTable.of(placement, i)
            b.mlp = EPMoE.from_slots(b.mlp, ep, table, ep_config.active_per_rank, ep_config.shared_as_routed)
        self.moe: list[EPMoE] = [b.mlp for b in blocks]
        self.placement = placement  # the routing tables of every layer (Placement, [L, R])
        super().__init__(model, config, tokenizer)
        self.live = LiveEPLB(self, ep_config) if ep_config.eplb == "live" else None
        self.two_batch = ep_config.two_batch_prefill and group.size > 1  # nothing to hide on one rank
        self.empty_calls = 0  # MoE layer calls made with no tokens (the synchronisation's cost)
        self.two_batch_calls = 0  # two-micro-batch prefill calls made (each: every layer's exchanges twice)
        self.empty_two_batch = 0  # of which with no rows (joining the group's prefill forwards)
        self._target: tuple[list[int], int] = ([m.calls for m in self.moe], 0)  # this step's (see step)

    # ---- the group ---------------------------------------------------------------------------------
    def _agree(self, one: int, two: int, busy: bool) -> tuple[int, int, bool]:
        """(most one-batch forwards, most two-batch prefill forwards of any rank this step, any rank
        busy): one all_reduce (MAX)."""
        t = torch.tensor([one, two, int(busy)], dtype=torch.long, device=self.runner.device)  # NCCL: on GPU
        link = self.group.ep
        link.run(
            "all_reduce (step agreement)", lambda: dist.all_reduce(t, dist.ReduceOp.MAX, group=link.group)
        )
        return int(t[0]), int(t[1]), bool(t[2])

    def group_has_unfinished(self) -> bool:
        """Whether any rank of the group has unfinished requests (a collective)."""
        return self._agree(0, 0, self.has_unfinished())[2]

    def _pad_one_batch(self) -> None:
        """Empty calls until every MoE layer has made this step's one-batch calls (`_target`)."""
        target = self._target[0]
        while any(m.calls < t for m, t in zip(self.moe, target)):
            for m, t in zip(self.moe, target):
                if m.calls < t:
                    m.empty_call()
                    self.empty_calls += 1

    def _pad(self) -> None:
        """Join the group's remaining forwards of the step: the one-batch layer calls first (they
        come first in every rank's step), then the two-batch prefill calls, with no rows."""
        self._pad_one_batch()
        while self.two_batch_calls < self._target[1]:
            self.empty_two_batch += 1
            self._two_batch([], [], [])

    def _two_batch(self, seqs: list, rows: list[list[int]], start: list[int]) -> torch.Tensor:
        """One two-batch prefill call, counted once its exchanges are all made (also when a half
        failed: `MicroBatchFailed`); any other failure leaves the group out of step."""
        try:
            h = two_batch_hidden(self.runner, seqs, rows, start)
        except MicroBatchFailed:
            self.two_batch_calls += 1
            raise
        self.two_batch_calls += 1
        return h

    def _merged_forward(self, decodes: list, chunks: list) -> None:
        """Never merged here: the group agrees on this rank's number of forwards before running them."""
        return None

    def _prefill_hidden(self, seqs: list, rows: list[list[int]], start: list[int]) -> torch.Tensor:
        """A prefill forward: two overlapped micro-batches (`two_batch_prefill`), after the group's
        one-batch forwards of the step (a rank without a decode forward joins the others' first)."""
        if not self.two_batch:
            return super()._prefill_hidden(seqs, rows, start)
        self._pad_one_batch()
        return self._two_batch(seqs, rows, start)

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One synchronised step of the group (every rank calls it): schedule, agree on the number
        of forwards, run this rank's, join the others' with empty calls, then re-plan if due."""
        batch = self.scheduler.schedule()
        decodes, prefills = (1 if batch.decodes else 0), sum(1 for _ in _group_chunks(batch.prefills))
        stuck = not (decodes or prefills) and self.scheduler.has_unfinished()
        two = self.two_batch
        one, two, _ = self._agree(
            decodes + (0 if two else prefills), prefills if two else 0, self.has_unfinished()
        )
        self._target = ([m.calls + one for m in self.moe], self.two_batch_calls + two)
        self._count(batch)
        outputs: list[RequestOutput] = []
        try:
            self._run(batch, outputs)
        except PeerFailure:
            raise  # the group is broken: no collective can line up any more
        except Exception as e:  # a failing forward: its rows fail, the group goes on (as Engine)
            touched = batch.decodes + [seq for seq, _, _ in batch.prefills]
            outputs += self._fail([seq for seq in touched if not seq.finished], e)
        self._pad()
        if self.live is not None:
            self.live.after_step(self.stats.steps)
        if stuck:  # after the group's collectives, so that the other ranks are not left waiting
            raise RuntimeError("step: requests are queued but none could be scheduled (cache too small?)")
        return outputs

    # ---- figures -----------------------------------------------------------------------------------
    def rank_load(self) -> torch.Tensor:
        """[L] token copies this rank's expert slots processed per layer since the last reset."""
        return torch.stack([m.slot_rows.sum() for m in self.moe])

    def metrics(self) -> dict:
        """This rank's figures for /metrics (local, no collective; `rank_balance` combines ranks)."""
        live, st = self.live, self.group.stats
        return {
            "rank": self.group.index,
            "ranks": self.group.size,
            "expert_load": [m.slot_rows.tolist() for m in self.moe],  # [L][S] copies per hosted slot
            "slot_experts": [
                m.table.rank_experts(self.group.index, self.group.size).tolist() for m in self.moe
            ],
            "rank_load": int(self.rank_load().sum()),  # copies this rank's slots processed
            "empty_calls": self.empty_calls,
            "two_batch_calls": self.two_batch_calls,
            "empty_two_batch_calls": self.empty_two_batch,
            "dispatch_bytes": st.total(what="dispatch"),
            "combine_bytes": st.total(what="combine"),
            "eplb_replans": live.replans if live else 0,
            "eplb_experts_moved": live.experts_moved if live else 0,
            "eplb_bytes_moved": live.bytes_moved if live else 0,  # received by this rank
            "eplb_seconds": live.seconds if live else 0.0,
            "dynamic_plan_seconds": sum(m.plan_seconds for m in self.moe),
        }

    def reset_counters(self) -> None:
        for m in self.moe:
            m.reset_counters()
        self.group.stats.reset()
        self.empty_calls = self.two_batch_calls = self.empty_two_batch = 0  # `step` re-reads them


def rank_balance(rank_loads: Seq[int]) -> float:
    """max / mean of the ranks' loads (`metrics()["rank_load"]` of every rank); 1.0 when idle."""
    mean = sum(rank_loads) / max(len(rank_loads), 1)
    return max(rank_loads) / mean if mean > 0 else 1.0


def run_group(engine: EPEngine) -> dict[str, RequestOutput]:
    """Step the group until no rank has work; this rank's final outputs by request id."""
    done: dict[str, RequestOutput] = {}
    while engine.group_has_unfinished():
        for out in engine.step():
            done[out.request_id] = out
    return done
