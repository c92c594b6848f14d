"""Pipeline-parallel training runtime (DESIGN §5): stages, split weight gradients, P2P schedules."""

from dsv3.parallel.pipeline.runtime import PipelineRunner, StepLoss
from dsv3.parallel.pipeline.stages import PipelineStage, StageLayout, split_layers
from dsv3.parallel.pipeline.wgrad import WeightGradStore, defer_weight_grads, restore_weight_grads

__all__ = [
    "PipelineRunner",
    "PipelineStage",
    "StageLayout",
    "StepLoss",
    "WeightGradStore",
    "defer_weight_grads",
    "restore_weight_grads",
    "split_layers",
]
