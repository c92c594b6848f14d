"""Pipeline stages x expert parallelism x ZeRO-1 behind the trainer's `Strategy` seam (DESIGN §5).

`PipelineStrategy` is `ParallelStrategy` (EP over the mesh's EP groups, ZeRO-1 over its data- and
expert-data-parallel groups) plus a `PipelineRunner` over the mesh's pp group: the pp ranks that
hold one index of every stage group form one pipeline, and every pipeline reads its own data shard
(`data_rank` is the rank's index in its stage group, the same on every stage of a pipeline).

  parallelize   with a model the trainer built on the meta device, `local_slice` names this
                rank's weights (the schedule's `local_stages`, its EP block of every expert stack),
                which `parallelize` materialises from the seeded init or a checkpoint (no rank
                builds the whole model; materialize.py); else the weights are broadcast over the
                stage group. Then the experts are sharded (EP), the model cut into the schedule's
                stages (`PipelineRunner`), and every parameter and buffer that no stage of this rank
                uses is dropped to the meta device: the model object keeps its full structure
                (names, `moe_layers()` order) but a rank holds only its stages.
  step          the trainer's micro-batches are concatenated into one batch of `chunks`
                micro-batches and run by `PipelineRunner.step` (each stage's backward differentiates
                its share / chunks: the gradient of the mean micro-batch loss, as accumulation on
                one process computes). lambda and alpha are set on the stages every step.
  counts        [L, E] of every MoE layer: each layer is filled by its first holder only (DualPipe
                has two holders, whose counts the runner already summed), then one all-reduce over
                the world sums the pipelines: the global batch's counts for the bias update.
  bias update   each rank applies the sign rule to the layers it holds (copies stay equal).
  gradients     ZeRO-1 as for pp = 1, over the rank's own parameters; the clipping norm sums the
                squares over the world, a weight held by k pipeline ranks (the embedding of
                1F1B / ZB1P, DualPipe's two copies of each stage) counted 1/k on each.
  evaluation    a forward-only pass through the stages in stage order (blocking send/recv between
                pipeline ranks), the main and MTP CE from the last stage shared over the pipeline.
  checkpoints   `full_model` gathers the experts over EP, then every stage's tensors to the main
                rank, which builds one ordinary HF-layout model; `optimizer_state` is the single-
                process optimizer's state dict (ids in the full model's parameter-group order),
                assembled the same way, so any (pp, ep, dp) layout -- or one process -- resumes it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv3.model.moe import MoE, update_bias
from dsv3.parallel.comm import Link
from dsv3.parallel.expert.moe import expert_param_names, gather_rows
from dsv3.parallel.mesh import Mesh
from dsv3.parallel.pipeline.runtime import PipelineRunner, local_stages
from dsv3.parallel.pipeline.schedule import build_schedule
from dsv3.parallel.pipeline.stages import PipelineStage, split_batch, split_layers, stage_parameter_names
from dsv3.parallel.strategy import ParallelSettings, ParallelStrategy
from dsv3.parallel.zero import ZeroOptimizer


def _is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def drop_to_meta(model: nn.Module, keep: set[int]) -> int:
    """Replace every parameter and buffer of `model` whose id is not in `keep` by a meta tensor of
    the same shape (a tensor shared by several modules stays shared); returns the elements freed."""
    done: dict[int, torch.Tensor] = {}
    freed = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or id(t) in keep or _is_meta(t):
                    continue
                if id(t) not in done:
                    meta = t.detach().to("meta")
                    done[id(t)] = (
                        nn.Parameter(meta, requires_grad=t.requires_grad)
                        if isinstance(t, nn.Parameter)
                        else meta
                    )
                    freed += t.numel()
                table[name] = done[id(t)]
    return freed


class PipelineStrategy(ParallelStrategy):
    """Pipeline stages over the mesh's pp groups, EP and ZeRO-1 inside each stage group."""

    def __init__(
        self, settings: ParallelSettings, chunks: int | None = None, mesh: Mesh | None = None
    ) -> None:
        super().__init__(settings, mesh)
        self.chunks = chunks
        self.pp = self._link("pp")
        world = list(range(self.world))
        self.everyone = Link("world", None, world, self.rank, [self.mesh.layout.node_of(r) for r in world],
                             self.grad_stats, self.mesh.timeout)  # fmt: skip
        self.runner: PipelineRunner | None = None
        self._global_index: list[int] = []  # optimizer slot on this rank -> slot in the full model's groups
        self._group_sizes: list[int] = []  # parameters per group of the full model

    # ---- model ------------------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        if self.chunks is None:
            raise ValueError("PipelineStrategy: set chunks (micro-batches per step) before parallelize()")
        full_params = sum(p.numel() for p in model.parameters())
        model = super().parallelize(model)  # broadcast over the stage group, experts sharded
        self.runner = PipelineRunner(model, self.settings.schedule, self.chunks, group=self.pp.group)
        keep = {id(t) for t in [*self.runner.module.parameters(), *self.runner.module.buffers()]}
        drop_to_meta(model, keep)
        model.num_params = lambda: full_params  # the logged size is the whole model's
        return model

    def local_slice(self, model: nn.Module) -> dict[str, range | None]:
        """The weights of this rank's stages (`local_stages` of the schedule), of each fused
        expert stack only this rank's EP block."""
        if self.chunks is None:
            raise ValueError("PipelineStrategy: set chunks (micro-batches per step) before local_slice()")
        cfg = model.config
        schedule = self.settings.schedule
        num_stages = 2 * self.pp.size if schedule == "dualpipev" else self.pp.size
        layout = split_layers(cfg.n_layers, cfg.n_mtp_layers, num_stages)
        mine = {
            name
            for s, _ in local_stages(build_schedule(schedule, num_stages, self.chunks), self.pp.index)
            for name in stage_parameter_names(model, layout, s)
        }
        return {name: rows for name, rows in super().local_slice(model).items() if name in mine}

    def describe(self) -> str:
        s, sched = self.settings, self._run().schedule
        return (f"pipeline: {sched.name} over pp={s.pp} ranks ({sched.num_stages} stages), "
                f"{sched.num_microbatches} micro-batches per step, ep={s.ep}, {self.data_world} data ranks")  # fmt: skip

    def _run(self) -> PipelineRunner:
        if self.runner is None:
            raise RuntimeError("PipelineStrategy: parallelize() must be called first")
        return self.runner

    def param_sets(self, model: nn.Module):
        sets = super().param_sets(model)
        for s in sets:  # only this rank's parameters reach the optimizer
            s.params = [p for p in s.params if not _is_meta(p)]
        return sets

    def build_optimizer(
        self, model: nn.Module, make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer], groups
    ) -> ZeroOptimizer:
        """`groups` are the full model's; the optimizer steps this rank's part of each."""
        self._group_sizes = [len(g["params"]) for g in groups]
        local_groups, self._global_index, i = [], [], 0
        for g in groups:
            mine = []
            for p in g["params"]:
                if not _is_meta(p):
                    mine.append(p)
                    self._global_index.append(i)
                i += 1
            local_groups.append({**g, "params": mine})
        opt = ZeroOptimizer(make, local_groups, self.param_sets(model), self.everyone, self.settings.zero)
        runner = self._run()
        opt.copies = {id(p): len(runner._holders[runner._names[id(p)]]) for p in runner.parameters()}
        self.optimizer = opt
        return opt

    # ---- the step ---------------------------------------------------------------------------------------
    def forward_backward(
        self, model: nn.Module, batches: list[torch.Tensor], mtp_lambda: float, balance_alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        runner = self._run()
        if len(batches) != runner.schedule.num_microbatches:
            raise ValueError(
                f"pipeline: {len(batches)} micro-batches this step, the schedule was built for "
                f"{runner.schedule.num_microbatches} (the global batch must not change with pp > 1)"
            )
        for stage in runner.module:
            stage.mtp_lambda, stage.balance_alpha = mtp_lambda, balance_alpha
        batch = torch.cat(batches)
        loss = self.pp.run("pipeline step", lambda: runner.step(batch))  # a dead stage: PeerFailure
        parts = torch.tensor([loss.total, loss.main, loss.mtp, loss.balance], dtype=torch.float64)
        return parts, self._layer_counts(model, runner.expert_counts)

    def _layer_counts(self, model: nn.Module, by_name: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L, E]: this pipeline's counts of the MoE layers whose first holder this rank is."""
        runner = self._run()
        names = [n for n, m in model.named_modules() if isinstance(m, MoE)]  # `moe_layers()` order
        counts = torch.zeros(len(names), model.config.n_routed_experts, dtype=torch.long)
        for i, name in enumerate(names):
            if name in by_name and runner._holders[f"{name}.gate.weight"][0] == runner.rank:
                counts[i] += by_name[name].cpu()
        return counts

    def reduce_counts(self, t: torch.Tensor) -> torch.Tensor:
        link = self.everyone
        link.run("count all-reduce", lambda: dist.all_reduce(t, group=link.group))
        return t

    def update_expert_bias(self, model: nn.Module, gamma: float, counts: torch.Tensor) -> None:
        for moe, c in zip(model.moe_layers(), counts):
            bias = moe.gate.e_score_correction_bias
            if bias is not None and not _is_meta(bias):
                update_bias(bias, c, gamma)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        return self._opt().clip_grad_norm(max_norm)

    # ---- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """(main CE, MTP CE, [L, E] counts of this pipeline's layers held first here) of one batch
        [b, T+1], through the stages in order; the CE values are the same on every pipeline rank."""
        runner = self._run()
        sched = runner.schedule
        mb = split_batch(batch, None, 1)[0]
        h, ce = None, torch.zeros(2, dtype=torch.float64)
        by_name: dict[str, torch.Tensor] = {}
        names = {id(m): n for n, m in model.named_modules() if isinstance(m, MoE)}
        shape = (*mb.input_ids.shape, model.config.dim)
        for s in range(sched.num_stages):
            if sched.rank_of(s, 0) != runner.rank:
                continue
            prev = sched.rank_of(s - 1, 0) if s > 0 else runner.rank
            if prev != runner.rank:
                h = torch.empty(shape, dtype=next(runner.module.parameters()).dtype)
                self.pp.run(
                    "pipeline eval recv",
                    lambda h=h, src=prev: dist.recv(h, group=self.pp.group, group_src=src),
                )
            stage: PipelineStage = runner.chunks[sched.chunk_of(s, 0)]
            out = stage(h, mb)
            for m in stage.moe_layers():
                by_name[names[id(m)]] = m.last_counts.clone()
            if stage.is_last:
                ce = out.parts[1:3].clone()
            else:
                h, nxt = out.hidden, sched.rank_of(s + 1, 0)
                if nxt != runner.rank:
                    out_h = h.contiguous()
                    self.pp.run("pipeline eval send",
                                lambda t=out_h, dst=nxt: dist.send(t, group=self.pp.group, group_dst=dst))  # fmt: skip
        self.pp.run("eval loss all-reduce", lambda: dist.all_reduce(ce, group=self.pp.group))
        return float(ce[0]), float(ce[1]), self._layer_counts(model, by_name)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _to_main(self, obj: Any) -> list[Any] | None:
        """Gather `obj` from every rank of the main rank's pipeline onto the main rank (others: None)."""
        if self.mesh.members["pp"][0] != 0:
            return None  # not the main rank's pipeline: its stages hold the same tensors
        out: list[Any] | None = [None] * self.pp.size if self.is_main else None
        self.pp.run("checkpoint gather", lambda: dist.gather_object(obj, out, dst=0, group=self.pp.group))
        return out

    def full_model(self, model: nn.Module) -> nn.Module:
        state = {k: v for k, v in model.state_dict().items() if not _is_meta(v)}
        if self.ep is not None:
            for name in expert_param_names(model):
                if name in state:
                    state[name] = gather_rows(state[name], self.ep.ep)
        parts = self._to_main(state)
        if not self.is_main:
            return model
        from dsv3.model.transformer import Transformer

        merged: dict[str, torch.Tensor] = {}
        for part in parts or []:
            merged.update(part)
        with torch.device("meta"):
            full = Transformer(model.config)
        dtype = next(t.dtype for t in merged.values() if t.is_floating_point())
        full = full.to(dtype).to_empty(device="cpu")
        full.load_state_dict(merged)
        full.reset_buffers()
        for moe in full.moe_layers():
            moe.last_counts.zero_()
        return full

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        local = self._opt().full_state_dict()
        state = {self._global_index[i]: v for i, v in local["state"].items()}
        parts = self._to_main(state)
        if not self.is_main:
            return local
        merged: dict[int, Any] = {}
        for part in parts or []:
            merged.update(part)
        groups, start = copy.deepcopy(local["param_groups"]), 0
        for g, n in zip(groups, self._group_sizes):
            g["params"] = list(range(start, start + n))
            start += n
        return {"state": dict(sorted(merged.items())), "param_groups": groups}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        saved = state["state"]
        mine = {i: saved[g] for i, g in enumerate(self._global_index) if g in saved}
        groups, i = copy.deepcopy(state["param_groups"]), 0
        for g, local in zip(groups, self._opt().param_groups):
            g["params"] = list(range(i, i + len(local["params"])))
            i += len(local["params"])
        self._opt().load_full_state_dict({"state": mine, "param_groups": groups})
