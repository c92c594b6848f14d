"""Expert-load statistics for EPLB: per-layer, per-expert token counts over a sliding window.

DESIGN §8: redundant experts are planned "from observed loads (statistics over a window, re-planned
periodically, ~10 min in prefill)". `ExpertLoadStats` keeps the last `window` records, a record
being the [L, E] token counts of one forward pass (or of one step a trainer or engine pushes);
`loads()` sums them, the weight the planner takes.

Collecting: `attach(model)` hooks every `model.moe_layers()` module (or the `ReplicatedMoE` that
wraps it), so each MoE forward adds its `last_counts` to the current record, and the model's own
forward closes the record. Attach after `routing.replicate_model`, not before. Hooking the
layers rather than reading `last_counts` after the fact means a layer that did not run (an MTP
block during plain decoding) adds nothing instead of repeating its stale counts.

File format: safetensors with one tensor "counts" [W, L, E] int64 (the window, oldest first) and
string metadata format="dsv3-eplb-loads", version, n_layers, n_experts, window. A JSON file
{"loads": [[...], ...]} (one row per layer) is also read, for hand-written loads.

Shapes: W records in the window, L MoE layers, E routed experts.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "dsv3-eplb-loads"
VERSION = 1


class ExpertLoadStats:
    """Sliding window of [L, E] expert token counts."""

    def __init__(self, n_layers: int, n_experts: int, window: int = 1000) -> None:
        for name, value in (("n_layers", n_layers), ("n_experts", n_experts), ("window", window)):
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        self.n_layers, self.n_experts, self.window = n_layers, n_experts, window
        self.records: deque[torch.Tensor] = deque(maxlen=window)
        self._current: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ---- recording ----------------------------------------------------------------------------------
    def push(self, counts: torch.Tensor) -> None:
        """Add one record: counts [L, E] (or a list of L tensors [E]), already summed over the step."""
        if isinstance(counts, (list, tuple)):
            counts = torch.stack([torch.as_tensor(c) for c in counts])
        counts = counts.detach().to("cpu", torch.long)
        if counts.shape != (self.n_layers, self.n_experts):
            raise ValueError(
                f"counts: expected shape ({self.n_layers}, {self.n_experts}), got {tuple(counts.shape)}"
            )
        self.records.append(counts.clone())

    def collect(self, model: nn.Module) -> None:
        """Push one record read from `last_counts` of every `model.moe_layers()`."""
        self.push([m.last_counts for m in model.moe_layers()])

    def attach(self, model: nn.Module) -> None:
        """Record every forward of `model` automatically (see the module docstring)."""
        layers = model.moe_layers()
        if len(layers) != self.n_layers:
            raise ValueError(f"model: has {len(layers)} MoE layers, the statistics expect {self.n_layers}")
        self.detach()

        def add(i: int):
            def hook(module: nn.Module, args: object, output: object) -> None:
                if self._current is None:
                    self._current = torch.zeros(self.n_layers, self.n_experts, dtype=torch.long)
                self._current[i] += layers[i].last_counts.detach().to("cpu", torch.long)

            return hook

        def close(module: nn.Module, args: object, output: object) -> None:
            if self._current is not None:
                self.records.append(self._current)
                self._current = None

        # a layer wrapped by `routing.ReplicatedMoE` runs through the wrapper: hook that instead
        wrapper = {id(getattr(mod, "moe", None)): mod for mod in model.modules() if hasattr(mod, "moe")}
        runs = [wrapper.get(id(m), m) for m in layers]
        self._handles = [m.register_forward_hook(add(i)) for i, m in enumerate(runs)]
        self._handles.append(model.register_forward_hook(close))

    def detach(self) -> None:
        """Remove the hooks `attach` installed."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- reading ------------------------------------------------------------------------------------
    def loads(self) -> torch.Tensor:
        """[L, E] tokens per expert summed over the window (zeros when empty)."""
        if not self.records:
            return torch.zeros(self.n_layers, self.n_experts, dtype=torch.long)
        return torch.stack(list(self.records)).sum(0)

    def __len__(self) -> int:
        return len(self.records)

    # ---- files --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        counts = (
            torch.stack(list(self.records)) if self.records else torch.zeros(0, self.n_layers, self.n_experts)
        )
        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "n_layers": str(self.n_layers),
            "n_experts": str(self.n_experts),
            "window": str(self.window),
        }
        save_file({"counts": counts.to(torch.long).contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> ExpertLoadStats:
        """Read a file written by `save` (or a JSON {"loads": [[...]]}, taken as one record)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"loads: {path} does not exist")
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
            counts = torch.tensor(rows["loads"] if isinstance(rows, dict) else rows, dtype=torch.long)
            if counts.dim() != 2:
                raise ValueError(
                    f"{path}: 'loads' must be a list of per-layer lists, got {counts.dim()} dims"
                )
            stats = cls(counts.shape[0], counts.shape[1], window=1)
            stats.push(counts)
            return stats
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
        counts = load_file(str(path))["counts"]
        stats = cls(int(meta["n_layers"]), int(meta["n_experts"]), int(meta["window"]))
        if counts.shape[1:] != (stats.n_layers, stats.n_experts):
            raise ValueError(f"{path}: counts of shape {tuple(counts.shape)} do not match the header")
        for record in counts:
            stats.push(record)
        return stats


def read_loads(path: str | Path) -> torch.Tensor:
    """[L, E] summed loads from a statistics file (safetensors or JSON)."""
    return ExpertLoadStats.load(path).loads()
