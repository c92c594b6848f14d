"""Run logging: a JSONL file (the record plots and tools read), TensorBoard, and a progress bar."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    def __init__(
        self,
        out: Path,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        show: bool = True,
        purge_after: int | None = None,
    ) -> None:
        """Append to the run's logs; TensorBoard hides its events past step `purge_after` (those a
        resumed run trains again), all of them when None (a fresh run); `truncate_logs` does the same
        for the JSONL files."""
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses nothing
        self.loads = open(out / "expert_load.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the events of steps trained again, as the JSONL truncation does
                purge = 0 if purge_after is None else purge_after + 1
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge)
            except ImportError:  # optional: the JSONL log is the record
                self.tb = None
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not show, unit="step", dynamic_ncols=True
        )

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def expert_load(self, step: int, per_layer: list[list[int]]) -> None:
        self.loads.write(json.dumps({"step": step, "counts": per_layer}) + "\n")

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        self.loads.close()
        if self.tb is not None:
            self.tb.close()


def logged(out: Path, kind: str, step: int) -> bool:
    """Whether the run's metrics.jsonl holds a `kind` record of `step` (torn lines are skipped)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == kind and record.get("step") == step:
            return True
    return False


def truncate_logs(out: Path, keep_until: int | None) -> None:
    """Drop the records past step `keep_until` from the run's JSONL logs (all of them when None): a
    resumed run trains those steps again, and a fresh run starts a new log. Main rank only."""
    for name in ("metrics.jsonl", "expert_load.jsonl"):
        truncate_log(out / name, -1 if keep_until is None else keep_until)


def truncate_log(path: Path, keep_until: int) -> None:
    """Keep the JSONL records of `path` up to step `keep_until` (and no torn last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            continue
        if record.get("step", 0) <= keep_until:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_log(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training log (is {out} a run directory?)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]  # a bad line in the middle is an error
    if lines:
        try:
            records.append(json.loads(lines[-1]))
        except json.JSONDecodeError:  # the last line torn by a kill mid-write: the run is still plottable
            warnings.warn(f"{path}: ignoring a torn last line", stacklevel=2)
    return records
