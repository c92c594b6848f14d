"""The evaluation harness (`dsv3 eval --tasks ...`): declarative tasks scored on a checkpoint or on
any OpenAI-compatible server. See docs/evaluation.md and dsv3.evals.tasks for the task format."""

from dsv3.evals.metrics import mean_stderr, pass_at_k
from dsv3.evals.tasks import Task, TaskFileError, load_task

__all__ = ["Task", "TaskFileError", "load_task", "mean_stderr", "pass_at_k"]
