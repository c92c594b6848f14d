"""Materialise only this rank's slice of a model built on the meta device (DESIGN §5).

A pipeline rank holds one or two stages of the model and, with expert parallelism, one block of
each MoE layer's routed experts. The trainer builds the `Transformer` on the meta device (no
storage), the strategy says which weights this rank keeps (`Strategy.local_slice`: full-model
name -> None for the whole tensor, or the range of experts of a fused expert stack), and
`materialize` allocates exactly those, filled from a `WeightSource`:

  init        the model's seeded initialisation (dsv3.model.init): every weight from its own
              generator, so the slice equals the single-process model's weights bit for bit;
  checkpoint  the tensors of an HF-layout checkpoint directory (resume, `--init`), read one key
              at a time and, for routed experts, only this rank's `experts.{j}` keys.

Buffers are small and every rank gets all of them: routing biases (from the checkpoint, else 0),
counters (0), and the RoPE frequencies (recomputed). What stays on the meta device is dropped for
good by the pipeline strategy; its full size is still reported by `num_params`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.keys import _EXPERT_NAMES, _hf_prefix
from dsv3.checkpoint.reader import _ShardReader, checkpoint_dir
from dsv3.model.init import EXPERT_STACK, initial_value
from dsv3.model.transformer import Transformer


@dataclass(frozen=True)
class WeightSource:
    """Where the weights come from: a checkpoint directory, else the model's seeded init."""

    checkpoint: Path | None = None


def has_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of `model` lives on the meta device (no storage)."""
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _replace(model: nn.Module, new: dict[int, torch.Tensor], kind: str) -> None:
    """Put new[id(old)] wherever a module holds `old` (a weight shared by two modules moves once)."""
    for module in model.modules():
        slots = module._parameters if kind == "param" else module._buffers
        for leaf, t in list(slots.items()):
            if t is not None and id(t) in new:
                slots[leaf] = new[id(t)]


class _Reader:
    """One checkpoint's tensors by our state-dict name (experts: a range of `experts.{j}` keys)."""

    def __init__(self, path: Path, n_layers: int) -> None:
        self.path, self.n_layers = checkpoint_dir(path), n_layers
        self.shards = _ShardReader(self.path)

    def has(self, name: str) -> bool:
        return _hf_prefix(name, self.n_layers) in self.shards.where

    def get(self, name: str, shape: tuple[int, ...], rows: range | None) -> torch.Tensor:
        key = _hf_prefix(name, self.n_layers)
        short = name.rsplit(".", 1)[-1]
        if EXPERT_STACK.search(name):
            base = key.rsplit(".", 1)[0]
            rows = range(shape[0]) if rows is None else rows
            keys = [f"{base}.{j}.{_EXPERT_NAMES[short]}.weight" for j in rows]
            value = torch.stack([self._read(k).float().T for k in keys])  # [out, in] -> [in, out]
            want = (len(rows), *shape[1:])
        else:
            value, want = self._read(key).float(), shape
        if tuple(value.shape) != tuple(want):
            raise CheckpointError(f"{self.path}: {name} has shape {tuple(value.shape)}, the model {want}")
        return value

    def _read(self, key: str) -> torch.Tensor:
        if key not in self.shards.where:
            raise CheckpointError(f"{self.path}: missing key {key}")
        return self.shards.get(key)


@torch.no_grad()
def materialize(model: Transformer, wanted: dict[str, range | None], source: WeightSource) -> int:
    """Allocate and fill the parameters named in `wanted` (full-model names -> None, or the expert
    rows to keep of a fused stack, which then has shape [len(rows), ...]) and every buffer; the
    other parameters stay on the meta device. Returns the number of parameter elements allocated
    (the trainer keeps it as `model.materialized_slice`)."""
    cfg = model.config
    reader = _Reader(source.checkpoint, cfg.n_layers) if source.checkpoint is not None else None
    named = dict(model.named_parameters())
    unknown = sorted(set(wanted) - set(named))
    if unknown:
        raise KeyError(f"materialize: no parameter {unknown[0]} in the model")
    new: dict[int, torch.Tensor] = {}
    total = 0
    for name, rows in wanted.items():
        p = named[name]
        if not p.is_meta:
            continue
        shape = tuple(p.shape)
        if reader is not None:
            value = reader.get(name, shape, rows)
        else:
            value = initial_value(name, shape, cfg.init_std, model.init_seed, rows)
        new[id(p)] = nn.Parameter(value.to(p.dtype), requires_grad=p.requires_grad)
        total += value.numel()
    _replace(model, new, "param")
    persistent = {n for n, _ in model.named_buffers()} & set(model.state_dict())
    bufs: dict[int, torch.Tensor] = {}
    for name, b in model.named_buffers():
        if not b.is_meta:
            continue
        value = torch.zeros(b.shape, dtype=b.dtype)
        if reader is not None and name in persistent and reader.has(name):
            value.copy_(reader.get(name, tuple(b.shape), None))
        bufs[id(b)] = value
    _replace(model, bufs, "buffer")
    model.reset_buffers()  # the RoPE frequencies
    return total
