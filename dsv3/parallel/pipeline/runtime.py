"""Execute a pipeline `Schedule` with torch.distributed: one training step over C micro-batches.

Each rank walks its op list (`dsv3.parallel.pipeline.schedule`) in order; the same lists drive the event
simulator, so the planner's timelines and memory figures describe exactly what runs here.

  F  receive the activation (stage 0: embed the tokens), run the stage, keep (input, output) for
     the backward, send the output on. The last stage computes the loss instead of sending.
  B  receive the output gradient (last stage: start from the loss), back-propagate through the
     stage, send the input gradient back, free the saved state.
  I  the same with the weight gradients of the linear and expert GEMMs deferred (`wgrad.py`).
  W  run the deferred weight gradients of an earlier I; only then is its micro-batch freed.
  F&B  a forward and a backward of two other micro-batches as one op (`overlap.run_pair`).

Each stage's backward differentiates (its loss share)/C: the last stage's CE_main + lambda CE_MTP
and every stage's alpha * balance loss, so the gradients equal those of the mean loss over the C
micro-batches on one device. Messages are tagged by (micro-batch, stage, kind) and received ahead
(`comm.P2P`); when both ends of a hand-off are on one rank (DualPipeV's turn) it stays in memory.

After the last op, a weight held by several ranks gets the sum of their gradients: with DualPipe
the two copies of each stage (rank s chunk 0 and rank PP-1-s chunk 1), with 1F1B / ZB1P the
embedding, which the first stage uses for the tokens and the last for the MTP modules.
Gradients are accumulated into the model's Parameters, like `loss.backward()` would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# autograd.backward(..., grad_tensors) imports this module (and sympy) on first use, ~1 s here:
# import it with the runtime, so that it is not paid inside the first pipelined backward.
import torch.fx.experimental.symbolic_shapes  # noqa: F401
from torch import nn

from dsv3 import paper
from dsv3.model.transformer import Transformer
from dsv3.parallel.comm import CommStats
from dsv3.parallel.expert.moe import ExpertParallel, ExpertParallelMoE, parallelize_experts
from dsv3.parallel.pipeline.comm import ACTIVATION, GRADIENT, P2P, exchange_sum, message_tag
from dsv3.parallel.pipeline.overlap import run_pair
from dsv3.parallel.pipeline.phases import PhasedPass, StagePass
from dsv3.parallel.pipeline.schedule import (
    BACKWARD,
    FORWARD,
    INPUT_GRAD,
    Op,
    Schedule,
    Task,
    build_schedule,
)
from dsv3.parallel.pipeline.stages import PipelineStage, split_batch, split_layers, stage_parameter_names
from dsv3.parallel.pipeline.wgrad import WeightGradStore, defer_weight_grads


@dataclass(frozen=True)
class OpTime:
    """When one op of the last step ran on this rank (wall clock, seconds) and how long it waited."""

    start: float
    end: float
    wait: float  # blocked on pipeline receives inside the op
    op: Op
    comm_wait: float = 0.0  # blocked finishing expert-parallel all-to-alls (injected latency included)
    exchanges: int = 0  # expert-parallel dispatch/combine all-to-alls the op issued (their grads too)

    @property
    def compute(self) -> float:
        """Seconds the op computed: its time less both kinds of waiting."""
        return self.end - self.start - self.wait - self.comm_wait


@dataclass(frozen=True)
class StepLoss:
    """Means over the step's micro-batches, identical on every rank (the terms of `Transformer.loss`)."""

    total: float
    main: float
    mtp: float
    balance: float


def local_stages(schedule: Schedule, rank: int) -> list[tuple[int, int]]:
    """(stage, direction) of every chunk pipeline rank `rank` runs (DualPipe: both directions)."""
    directions = (0, 1) if schedule.name == "dualpipe" else (0,)
    return [(s, d) for s in range(schedule.num_stages) for d in directions if schedule.rank_of(s, d) == rank]


class PipelineRunner:
    """Runs `schedule` over the ranks of `group` (default: the world); every rank calls `step`.

    Every rank builds the same full `model` (same seed) and passes it in; the runner keeps the
    stages `schedule` puts on this rank (`self.module`, what the optimizer should see) and routes
    their work. A later trainer may build only those stages (meta device) to save memory.
    Schedules with I/W (ZB1P, DualPipe, DualPipeV) route the stages' linear and expert layers
    (plain, FP8; grouped experts too) through `wgrad` (same results outside a split backward;
    `restore_weight_grads` undoes it).

    Expert parallelism inside a stage: `ep` (its group: the ranks that hold the same stage in the
    pipelines of a pp x ep layout, `Mesh` group "ep"; `group` is then the "pp" group) swaps the
    MoEs of this rank's stages for `ExpertParallelMoE` (a model whose MoEs are already expert
    parallel works without it). Every pipeline of the EP group runs the same schedule on its own
    tokens, so their all-to-alls line up. In F&B pairs the dispatch and combine all-to-alls are
    started in one phase and waited for in the micro-batch's next one, after a phase of the other
    micro-batch (`phases.py`, `overlap.py`); overlap=False waits at once (the reference). The
    replicated weights' gradients are this pipeline's only: the caller reduces them over the
    stage's data-parallel ranks (the "stage" group) as for any data parallelism.
    """

    def __init__(
        self,
        model: Transformer,
        schedule: str,
        chunks: int,
        group: dist.ProcessGroup | None = None,
        mtp_lambda: float = paper.MTP_LAMBDA_EARLY,
        balance_alpha: float = paper.BALANCE_LOSS_ALPHA,
        latency: float = 0.0,
        lookahead: int = 2,
        phased: bool | None = None,
        ep: ExpertParallel | None = None,
        overlap: bool = True,
    ) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead: must be >= 0 ops, got {lookahead}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        num_stages = 2 * world if schedule == "dualpipev" else world
        self.schedule: Schedule = build_schedule(schedule, num_stages, chunks)
        self._check_agreement(model)
        self.ep, self.overlap = ep, overlap
        cfg = model.config
        self.layout = split_layers(cfg.n_layers, cfg.n_mtp_layers, num_stages)
        self.lookahead, self.dim = lookahead, cfg.dim
        self.chunks: dict[int, PipelineStage] = {}  # local chunk index -> stage module
        for s, d in local_stages(self.schedule, self.rank):
            stage = PipelineStage(model, s, self.layout, mtp_lambda, balance_alpha)
            if ep is not None:
                parallelize_experts(stage, ep)  # in place: the model's blocks are the stage's
            self.chunks[self.schedule.chunk_of(s, d)] = stage
        self.module = nn.ModuleList(self.chunks[c] for c in sorted(self.chunks))
        # phase by phase where F&B pairs interleave two passes (DualPipe, DualPipeV), else whole stages
        if phased is None:
            phased = any(len(op.tasks) == 2 for ops in self.schedule.ops for op in ops)
        self._pass_cls = PhasedPass if phased else StagePass
        self.store = WeightGradStore()
        if self.schedule.split_backward:
            defer_weight_grads(self.module, self.store)
        self._comm = self._comm_stats()
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._moe_names = {id(m): n for n, m in model.named_modules() if m in set(self._local_moe())}
        self._holders = self._parameter_holders(model)
        self.p2p = P2P(self.group, latency, stamp_offset=2 * chunks * num_stages)
        self.expert_counts: dict[str, torch.Tensor] = {}  # MoE module name -> tokens per expert, last step
        self.peak_inflight = 0  # most micro-batch activations alive at once on this rank, last step
        self.trace: list[OpTime] = []  # the last step's ops with their times

    # ---- set-up ------------------------------------------------------------------------------------
    def _check_agreement(self, model: Transformer) -> None:
        """Collective: every rank must run the same schedule on the same model shape."""
        mine = (self.schedule.name, self.schedule.num_stages, self.schedule.num_microbatches, model.config)
        seen: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(seen, mine, group=self.group)
        if any(s != mine for s in seen):
            per_rank = "; ".join(
                f"rank {r}: schedule={s[0]} stages={s[1]} chunks={s[2]}"
                + ("" if s[3] == seen[0][3] else " (other model config)")
                for r, s in enumerate(seen)
            )
            raise ValueError(f"PipelineRunner: ranks disagree on the schedule or the model: {per_rank}")

    def _comm_stats(self) -> CommStats:
        """The counters of this rank's expert-parallel exchanges (a fresh, unused one without EP)."""
        for m in self._local_moe():
            if isinstance(m, ExpertParallelMoE):
                return m.ep.stats
        return CommStats()

    def _local_moe(self) -> list[nn.Module]:
        return [m for st in self.module for m in st.moe_layers()]

    def _parameter_holders(self, model: Transformer) -> dict[str, tuple[int, ...]]:
        """Full-model parameter name -> the ranks that hold it, for every rank (no communication)."""
        holders: dict[str, set[int]] = {}
        world = dist.get_world_size(self.group)
        for r in range(world):
            for s, _ in local_stages(self.schedule, r):
                for name in stage_parameter_names(model, self.layout, s):
                    holders.setdefault(name, set()).add(r)
        return {n: tuple(sorted(r)) for n, r in holders.items()}

    def parameters(self) -> list[nn.Parameter]:
        """This rank's Parameters, each once (what an optimizer on this rank steps)."""
        return list(self.module.parameters())

    # ---- one step ----------------------------------------------------------------------------------
    def step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> StepLoss:
        """Forward and backward of the batch (every rank passes the same one; ranks holding neither
        the first nor the last stage only read its shape). Gradients accumulate into `parameters()`."""
        self._begin(input_ids, labels)
        before = self._shared_grads()  # gradients from earlier steps: not to be summed again
        ops = self.schedule.ops[self.rank]
        for i, op in enumerate(ops):
            self._post_receives([t for o in ops[i : i + 1 + self.lookahead] for t in o.tasks])
            start, waited = time.time(), self.p2p.waited
            comm_waited, exchanges = self._comm.waited, self._comm.exchanges
            if len(op.tasks) == 2:
                run_pair(self, *op.tasks)  # F&B
            else:
                self.run_task(op.tasks[0])
            self.trace.append(
                OpTime(
                    start,
                    time.time(),
                    self.p2p.waited - waited,
                    op,
                    self._comm.waited - comm_waited,
                    self._comm.exchanges - exchanges,
                )
            )
        self.p2p.finish()
        if self._saved or self.store.pending():
            raise RuntimeError(f"rank {self.rank}: state left after the step: {list(self._saved)}")
        self._sum_copies(before)
        return self._reduce_loss()

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> StepLoss:
        """The loss of the batch without gradients: only the schedule's forwards, in its order (they
        depend on forwards only, so the order stays deadlock-free). No balance loss, as in
        `Transformer.loss` under no_grad."""
        self._begin(input_ids, labels)
        forwards = [t for op in self.schedule.ops[self.rank] for t in op.tasks if t.kind == FORWARD]
        for i, task in enumerate(forwards):
            self._post_receives(forwards[i : i + 1 + self.lookahead])
            self.run_task(task)
            self._saved.clear()  # nothing to back-propagate
        self.p2p.finish()
        return self._reduce_loss()

    def _begin(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
        self._mbs = split_batch(input_ids, labels, self.schedule.num_microbatches)
        b, t = self._mbs[0].input_ids.shape
        self._shape = torch.Size((b, t, self.dim))
        self._dtype = next(self.module.parameters()).dtype
        self._saved: dict[tuple[int, int], StagePass] = {}  # (mb, stage) -> its forward, until backward
        self._local: dict[int, torch.Tensor] = {}
        self._parts = torch.zeros(4, dtype=torch.float64)
        self._counts = {id(m): torch.zeros_like(m.last_counts) for m in self._local_moe()}
        self._inflight = self.peak_inflight = 0
        self.trace = []

    def _post_receives(self, tasks: list[Task]) -> None:
        wanted = []
        for task in tasks:
            src = self.schedule.recv_from(task)
            if src is not None:
                wanted.append((self._input_tag(task), src, self._shape, self._dtype))
        self.p2p.post_recvs(wanted)

    def _input_tag(self, task: Task) -> int:
        S = self.schedule.num_stages
        if task.kind == FORWARD:
            return message_tag(task.mb, task.stage - 1, ACTIVATION, S)
        return message_tag(task.mb, task.stage + 1, GRADIENT, S)

    def _receive(self, task: Task) -> torch.Tensor:
        tag = self._input_tag(task)
        if self.schedule.recv_from(task) is None:  # produced on this rank (DualPipeV's turn)
            return self._local.pop(tag)
        if not self.p2p.posted(tag):
            self._post_receives([task])
        return self.p2p.recv(tag)

    def _deliver(self, task: Task, tensor: torch.Tensor, kind: int) -> None:
        tag = message_tag(task.mb, task.stage, kind, self.schedule.num_stages)
        dst = self.schedule.send_to(task)
        if dst is None:
            self._local[tag] = tensor.detach()
        else:
            self.p2p.send(tensor, dst, tag)

    def _stage(self, task: Task) -> PipelineStage:
        return self.chunks[self.schedule.chunk_of(task.stage, task.direction)]

    # ---- the work items ----------------------------------------------------------------------------
    def run_task(self, task: Task) -> None:
        if task.kind == FORWARD:
            p = self.begin_forward(task)
            for _ in p.forward_steps():
                pass
            self.end_forward(task, p)
        elif task.kind in (BACKWARD, INPUT_GRAD):
            p, steps = self.begin_backward(task)
            for _ in steps:
                pass
            self.end_backward(task, p)
        else:
            self.store.run((task.mb, task.stage))  # W: the deferred weight gradients of an earlier I
            self._inflight -= 1

    def begin_forward(self, task: Task) -> StagePass:
        stage = self._stage(task)
        x = None if stage.is_first else self._receive(task).requires_grad_()
        if self._pass_cls is PhasedPass:
            return PhasedPass(stage, x, self._mbs[task.mb], self.overlap)
        return self._pass_cls(stage, x, self._mbs[task.mb])

    def end_forward(self, task: Task, p: StagePass) -> None:
        self._saved[(task.mb, task.stage)] = p
        self._parts += p.parts
        for m in p.stage.moe_layers():
            self._counts[id(m)] += m.last_counts
        if p.hidden is not None:
            self._deliver(task, p.hidden, ACTIVATION)
        self._inflight += 1
        self.peak_inflight = max(self.peak_inflight, self._inflight)

    def begin_backward(self, task: Task) -> tuple[StagePass, Iterator[str]]:
        """The saved pass of `task`'s micro-batch and the steps of its backward (B, or I: the weight
        gradients of linears and experts deferred to a later W)."""
        p = self._saved.pop((task.mb, task.stage))
        steps = p.backward_steps(lambda: self._receive(task), 1.0 / self.schedule.num_microbatches)
        if task.kind == INPUT_GRAD:
            steps = self._deferring((task.mb, task.stage), steps)
        return p, steps

    def _deferring(self, key: tuple[int, int], steps: Iterator[str]) -> Iterator[str]:
        # per step, so that whatever runs between two steps (the other half of an F&B) is unaffected
        while True:
            with self.store.deferring(key):
                name = next(steps, None)
            if name is None:
                return
            yield name

    def end_backward(self, task: Task, p: StagePass) -> None:
        if task.kind == BACKWARD:
            self._inflight -= 1
        if not p.stage.is_first:
            self._deliver(task, p.input_grad, GRADIENT)

    # ---- end of step -------------------------------------------------------------------------------
    def _shared_groups(self) -> dict[tuple[int, ...], list[nn.Parameter]]:
        """Holder sets this rank belongs to (with another rank) -> their Parameters in name order."""
        groups: dict[tuple[int, ...], list[tuple[str, nn.Parameter]]] = {}
        for p in self.module.parameters():
            name = self._names[id(p)]
            holders = self._holders[name]
            if len(holders) > 1:
                groups.setdefault(holders, []).append((name, p))
        return {h: [p for _, p in sorted(ps, key=lambda x: x[0])] for h, ps in sorted(groups.items())}

    def _shared_grads(self) -> dict[int, torch.Tensor]:
        return {
            id(p): p.grad.clone() for ps in self._shared_groups().values() for p in ps if p.grad is not None
        }

    def _sum_copies(self, before: dict[int, torch.Tensor]) -> None:
        """Sum this step's gradients (and expert counts) over the ranks holding the same weights."""
        base = 2 * self.schedule.num_microbatches * self.schedule.num_stages * 2  # after data and clock tags
        for i, (holders, params) in enumerate(self._shared_groups().items()):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            delta = [p.grad - before[id(p)] if id(p) in before else p.grad for p in params]
            exchange_sum(delta, list(holders), self.group, tag=base + 2 * i)
            for p, d in zip(params, delta):
                p.grad = d + before[id(p)] if id(p) in before else d
        self._sum_counts(base)

    def _sum_counts(self, base: int) -> None:
        by_holders: dict[tuple[int, ...], list[tuple[str, int]]] = {}
        for m in self._local_moe():
            holders = self._holders[self._names[id(m.gate.weight)]]
            by_holders.setdefault(holders, []).append((self._moe_names[id(m)], id(m)))
        self.expert_counts = {}
        for i, (holders, mods) in enumerate(sorted(by_holders.items())):
            mods.sort()
            counts = [self._counts[key] for _, key in mods]
            exchange_sum(counts, list(holders), self.group, tag=base + 2 * i + 1)
            self.expert_counts.update({name: c for (name, _), c in zip(mods, counts)})

    def _reduce_loss(self) -> StepLoss:
        parts = self._parts.clone()
        dist.all_reduce(parts, group=self.group)  # every (micro-batch, stage) ran on exactly one rank
        parts /= self.schedule.num_microbatches
        return StepLoss(*(float(v) for v in parts))

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip by the norm of the whole model's gradient (each shared weight counted once); returns it.
        With expert parallelism the experts' shards are summed over the EP group; the replicated
        weights' gradients must have been reduced over the stage's data-parallel ranks first."""
        experts = {
            id(p): m.ep.ep.group
            for m in self._local_moe()
            if isinstance(m, ExpertParallelMoE)
            for p in m.experts.parameters()
        }
        sq = torch.zeros((), dtype=torch.float64)
        sq_experts = torch.zeros((), dtype=torch.float64)
        for p in self.module.parameters():
            if p.grad is not None:
                copies = len(self._holders[self._names[id(p)]])
                term = p.grad.double().pow(2).sum() / copies
                if id(p) in experts:
                    sq_experts += term
                else:
                    sq += term
        if experts:  # every rank of an EP group holds the same stages, so all of them get here
            dist.all_reduce(sq_experts, group=next(iter(experts.values())))
        sq += sq_experts
        dist.all_reduce(sq, group=self.group)
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm
