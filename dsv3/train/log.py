"""Run logging: a JSONL file (the record plots and tools read), TensorBoard, and a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    def __init__(self, out: Path, total_steps: int, start_step: int = 0, tensorboard: bool = True, show=True):
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses nothing
        self.loads = open(out / "expert_load.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
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


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_log(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training log (is {out} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
