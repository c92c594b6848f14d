"""Expert parallelism + ZeRO-1 data parallelism behind the trainer's `Strategy` seam (DESIGN §5).

`build_strategy(**cfg.parallel)` reads the `parallel.*` settings and returns the Strategy the
trainer drives; the order of application is torchtitan's: build the single-device model, then
parallelise it from outside.

  parallelize     broadcast the initial weights from the stage's first rank (every rank starts
                  identical), then shard the routed experts over the EP group (expert/moe.py)
  data shard      every rank of a stage reads different tokens: data_rank / data_world are its
                  index among them (EP ranks are data-parallel ranks for everything else)
  gradients       replicated weights: summed over the stage, / data_world. Routed experts: each
                  rank's expert gradient already holds its EP group's tokens (through the
                  all-to-all), so it is summed over the ranks holding the same experts, / data_world
  ZeRO-1          the optimizer state of both is sharded over those same groups (zero.py)
  clipping        the global norm: replicated weights counted once, expert shards summed
  bias update     the trainer accumulates the step's counts of every MoE layer ([L, E], from each
                  micro-batch's `LossOutput.counts`) and sums them with ONE `reduce_sum` over every
                  data rank, so every rank applies the same sign update from the global batch (§2.1.2)
  checkpoints     `full_model` gathers every expert so the main rank writes one ordinary HF-layout
                  model; `optimizer_state` is the single-process optimizer's state dict, which
                  this strategy re-shards for any world size and the plain `Strategy` loads as is

Failures: every collective runs with the mesh's timeout (`parallel.timeout`, seconds) and a dead
or stuck peer raises `PeerFailure` naming the collective and the ranks, instead of hanging.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv3.model.init import EXPERT_STACK
from dsv3.parallel.comm import CommStats, Link
from dsv3.parallel.expert.moe import (
    ExpertParallel,
    expert_param_names,
    gather_full_state,
    parallelize_experts,
)
from dsv3.parallel.mesh import Mesh, build_mesh
from dsv3.parallel.zero import ParamSet, ZeroOptimizer
from dsv3.train.strategy import Strategy


@dataclass(frozen=True)
class ParallelSettings:
    """`parallel.<key>=value` settings of a training run."""

    ep: int = 1  # expert-parallel size: the routed experts are sharded over this many ranks
    dp: int | None = None  # replicas of the expert sharding (default: world / (pp * ep))
    pp: int = 1  # pipeline ranks per pipeline (dualpipev: 2 model stages on each)
    schedule: str = "1f1b"  # pipeline schedule with pp > 1: 1f1b | zb1p | dualpipe | dualpipev
    ranks_per_node: int | None = None  # "node" size for node-limited routing (default LOCAL_WORLD_SIZE)
    zero: bool = True  # ZeRO-1: shard the optimizer state over the data-parallel ranks
    two_hop: bool = False  # dispatch across nodes first, then inside the node (§3.2.2)
    dispatch: str = "same"  # wire format of the dispatch: same | bf16 | fp8 (V3: fp8)
    combine: str = "same"  # wire format of the combine and of gradients: same | bf16 (V3: bf16)
    timeout: float | None = None  # seconds before a collective gives up on a silent peer

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ParallelSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ValueError(f"parallel.{key}: unknown setting (known: {', '.join(sorted(known))})")
        return cls(**values)


def build_strategy(chunks: int | None = None, **settings: Any) -> Strategy:
    """The Strategy for `parallel.*` settings: the plain one for one process, ParallelStrategy for
    pp = 1, PipelineStrategy for pp > 1 (`chunks`: micro-batches per step of one pipeline)."""
    s = ParallelSettings.from_dict(settings)
    if not (dist.is_available() and dist.is_initialized()):
        if s.ep == 1 and s.dp in (None, 1) and s.pp == 1:
            return Strategy()
        size = s.ep * (s.dp or 1) * s.pp
        raise ValueError(
            f"parallel.ep={s.ep}, dp={s.dp}, pp={s.pp}: needs {size} processes; launch with "
            f"`torchrun --nproc-per-node {size} -m dsv3.train ...`"
        )
    if s.pp != 1:
        from dsv3.parallel.pipelined import PipelineStrategy  # the runtime is only imported when used

        return PipelineStrategy(s, chunks)
    return ParallelStrategy(s)


class ParallelStrategy(Strategy):
    """Expert parallelism over the mesh's EP groups, ZeRO-1 over its data-parallel groups."""

    def __init__(self, settings: ParallelSettings, mesh: Mesh | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.mesh = mesh or build_mesh(settings.ep, settings.dp, settings.pp, settings.ranks_per_node,
                                       settings.timeout)  # fmt: skip
        self.ep: ExpertParallel | None = None
        self.optimizer: ZeroOptimizer | None = None
        self.grad_stats = CommStats()
        self.stage = self._link("stage")

    def _link(self, name: str) -> Link:
        members = self.mesh.members[name]
        nodes = [self.mesh.layout.node_of(r) for r in members]
        return Link(
            name, self.mesh.group(name), members, self.rank, nodes, self.grad_stats, self.mesh.timeout
        )

    @property
    def data_rank(self) -> int:
        return self.mesh.data_rank

    @property
    def data_world(self) -> int:
        return self.mesh.data_world

    # ---- model and optimizer ----------------------------------------------------------------------------
    def local_slice(self, model: nn.Module) -> dict[str, range | None]:
        """Every weight, but of each fused expert stack only this rank's block of the EP group."""
        out = super().local_slice(model)
        ep = self.settings.ep
        if ep > 1:
            per_rank = model.config.n_routed_experts // ep
            index = self.mesh.members["ep"].index(self.rank)
            for name in out:
                if EXPERT_STACK.search(name):
                    out[name] = range(index * per_rank, (index + 1) * per_rank)
        return out

    def parallelize(self, model: nn.Module) -> nn.Module:
        if not getattr(model, "materialized_slice", False):  # else: every rank read the same source
            self._broadcast(model)
        full_params = sum(p.numel() for p in model.parameters())
        if self.settings.ep > 1:
            s = self.settings
            self.ep = ExpertParallel.from_mesh(self.mesh, model.config, s.two_hop, s.dispatch, s.combine)
            parallelize_experts(model, self.ep)
            model.num_params = lambda: full_params  # the logged size is the whole model's
        return model

    def _broadcast(self, model: nn.Module) -> None:
        """Every rank starts from the first rank's weights and buffers (one broadcast per dtype)."""
        src, group = self.stage.members[0], self.stage.group
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for t in [*model.parameters(), *model.buffers()]:
            by_dtype[t.dtype].append(t)
        with torch.no_grad():
            for tensors in by_dtype.values():
                flat = torch.cat([t.reshape(-1) for t in tensors])
                self.stage.run("initial broadcast", lambda f=flat: dist.broadcast(f, src, group=group))
                for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                    t.copy_(part.view_as(t))

    def param_sets(self, model: nn.Module) -> list[ParamSet]:
        experts = expert_param_names(model) if self.ep is not None else {}
        named = dict(model.named_parameters())
        scale = 1.0 / self.data_world
        sets = [ParamSet("replicated", [p for n, p in named.items() if n not in experts], self.stage, scale)]
        if experts:
            sets.append(
                ParamSet("experts", [named[n] for n in experts], self._link("expert_dp"), scale, self.ep.ep)
            )
        return sets

    def build_optimizer(
        self, model: nn.Module, make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer], groups
    ) -> ZeroOptimizer:
        self.optimizer = ZeroOptimizer(make, groups, self.param_sets(model), self.stage, self.settings.zero)
        return self.optimizer  # type: ignore[return-value]

    def _opt(self) -> ZeroOptimizer:
        if self.optimizer is None:
            raise RuntimeError("ParallelStrategy: build_optimizer() must be called first")
        return self.optimizer

    # ---- the step ---------------------------------------------------------------------------------------
    def reduce_gradients(self, model: nn.Module) -> None:
        self._opt().reduce_gradients()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        return self._opt().clip_grad_norm(max_norm)

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        self.reduce_sum(t)
        return t.div_(self.data_world)

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        link = self.stage
        link.run("all-reduce", lambda: dist.all_reduce(t, group=link.group))
        return t

    # ---- checkpoints ------------------------------------------------------------------------------------
    def full_model(self, model: nn.Module) -> nn.Module:
        if self.ep is None:
            return model  # every weight is already full on every rank
        state = gather_full_state(model, self.ep)
        if not self.is_main:
            return model
        from dsv3.model.transformer import Transformer

        with torch.device("meta"):
            full = Transformer(model.config)
        weight = model.embed_tokens.weight
        full = full.to(weight.dtype).to_empty(device=weight.device)
        full.load_state_dict(state)
        full.reset_buffers()
        for moe in full.moe_layers():
            moe.last_counts.zero_()
        return full

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self._opt().full_state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        self._opt().load_full_state_dict(state)
