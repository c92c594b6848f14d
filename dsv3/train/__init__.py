"""The training system: the V3 recipe, resumable checkpoints, logging (DESIGN §6-7)."""

from dsv3.train.config import TrainConfig
from dsv3.train.loop import Trainer, TrainingDiverged

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged"]
