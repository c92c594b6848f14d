"""The one place that applies parallelism to a model (DESIGN §5; the torchtitan arrangement).

The trainer builds (or loads) the single-device model and calls `parallelize(model, settings,
strategy)` once; everything that changes the model for precision or for more than one process
happens here, in this fixed order (each step assumes the ones before it):

  0. materialisation    a model built on the meta device (the trainer does so with pipeline
                        stages) gets only this rank's weights: its stages, its experts, from the
                        seeded init or a checkpoint (materialize.py); no rank builds the whole.
  1. precision          FP8: the linears and experts become FP8 GEMMs (dsv3.fp8.convert);
                        BF16 on a CPU without fast BF16 matmuls: BF16 numerics on FP32 kernels
                        (dsv3.bf16.convert; rank 0 decides, so every rank builds the same modules).
                        First, because expert sharding and the pipeline's weight-gradient
                        deferral wrap the modules this step creates.
  2. recomputation      activation checkpointing of every block (main and MTP).
  3. expert parallelism the weights are broadcast over the stage group, then every MoE's routed
                        experts are sharded over the EP group (expert/moe.py).
  4. pipeline stages    with parallel.pp > 1: the model is cut into the schedule's stages over the
                        pp group (`PipelineRunner`), and what no local stage uses is dropped to the
                        meta device (pipelined.py).
  5. ZeRO-1             the optimizer state is sharded over the data-parallel groups when the
                        returned strategy builds the optimizer (`strategy.build_optimizer`), which
                        is the only step that needs the optimizer factory.

The returned `Strategy` is the trainer's seam for the rest of the step (forward/backward, gradient
reduction, clipping, counts, checkpoints' rank-independent state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from dsv3 import bf16
from dsv3.config import ConfigError
from dsv3.parallel.materialize import WeightSource, has_meta, materialize

if TYPE_CHECKING:  # dsv3.train imports this module: no import of dsv3.train at load time
    from dsv3.train.strategy import Strategy


@dataclass(frozen=True)
class Parallelization:
    """What `parallelize` applies besides the strategy's own `parallel.*` settings."""

    precision: str = "fp32"  # the resolved precision: fp32 | bf16 | fp8
    recompute: bool = False  # activation checkpointing of every block
    chunks: int | None = None  # micro-batches per step of one pipeline (pp > 1)


def apply_recompute(model: nn.Module) -> None:
    """Activation checkpointing of every block (main and MTP), applied from outside the model."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        inner = block.forward
        block.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def pipeline_chunks(
    batch_start: int, batch_end: int, micro_batch: int, data_world: int, pp: int
) -> int | None:
    """Micro-batches per step of one pipeline (None without pipeline stages). A pipeline schedule is
    built for a fixed number of micro-batches, so with pp > 1 the global batch must not ramp."""
    if pp <= 1:
        return None
    if batch_start != batch_end:
        raise ConfigError(
            f"batch_start, batch_end: {batch_start} != {batch_end}; with parallel.pp={pp} the global batch "
            "must be constant (the pipeline schedule is built for a fixed number of micro-batches)"
        )
    return batch_end // (micro_batch * data_world)


def parallelize(
    model: nn.Module, settings: Parallelization, strategy: Strategy, source: WeightSource | None = None
) -> nn.Module:
    """Apply precision, recomputation, expert parallelism and pipeline stages to `model`, in that
    order (the module docstring), through `strategy`; returns the model the trainer steps. ZeRO-1
    follows at `strategy.build_optimizer`. A model built on the meta device first gets this rank's
    slice (`strategy.local_slice`) from `source` (step 0)."""
    from dsv3.train.metrics import decided_by_rank0

    if settings.chunks is not None:
        strategy.chunks = settings.chunks
    if has_meta(model):  # built on the meta device: this rank's slice only
        if source is None:
            raise ValueError(
                "parallelize: the model is on the meta device; give the WeightSource to fill it from"
            )
        # every rank filled its slice from the same source: no broadcast (strategy.py)
        model.materialized_slice = materialize(model, strategy.local_slice(model), source)
    on_gpu = torch.cuda.is_available()
    if settings.precision == "fp8":
        from dsv3.fp8 import convert

        convert(model)
    low = settings.precision == "bf16" or (settings.precision == "fp8" and on_gpu)
    if low and decided_by_rank0(bf16.needed):  # every rank the same modules
        bf16.convert(model)  # BF16 numerics on FP32 kernels: this CPU has no fast BF16 matmul
    if settings.recompute:
        apply_recompute(model)
    return strategy.parallelize(model)
