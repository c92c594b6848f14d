"""`save_pretrained`: config.json and the weights in the official layout, sharded, each file atomic.

Every file is written to a temporary name and renamed over the target, so a crash leaves the old
file or the new one, never half of one; a full disk becomes DiskFullError naming the directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dsv3.checkpoint.errors import DiskFullError, disk_full_message, is_disk_full
from dsv3.checkpoint.keys import _is_mtp_copy, hf_state_dict
from dsv3.checkpoint.reader import INDEX_FILE, SINGLE_FILE
from dsv3.model.transformer import Transformer


def _write_shards(
    tensors: list[tuple[str, torch.Tensor]], path: Path, max_shard_bytes: int, desc: str | None = None
) -> None:
    """Group tensors into shards of at most max_shard_bytes, write them atomically, plus the index."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, t))
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, shard in tqdm(
        list(zip(names, shards)), desc=desc, disable=desc is None or n == 1, unit="shard"
    ):
        _atomic_save({k: t.contiguous() for k, t in shard}, path / name)
        weight_map.update({k: name for k, _ in shard})
    if n > 1:
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2))
    elif (path / INDEX_FILE).exists():
        (path / INDEX_FILE).unlink()


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    _atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _atomic_write_text(file: Path, text: str) -> None:
    _atomic_write(file, lambda tmp: tmp.write_text(text))


def _atomic_write(file: Path, write: Callable[[Path], object]) -> None:
    """write(tmp), then rename tmp over `file`. On failure the partial tmp file is removed, and a
    full disk becomes DiskFullError naming the directory (not the writer's "unexpected pos" or
    "Error while serializing")."""
    tmp = file.with_name(file.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, file)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e, file.parent):
            raise DiskFullError(disk_full_message(file.parent, file.name)) from e
        raise


def save_pretrained(
    model: Transformer, path: str | Path, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None
) -> None:
    """Write config.json and the weights in the official layout (sharded above max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = []
    for key, t in hf_state_dict(model):
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not key.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        tensors.append((key, t.clone() if _is_mtp_copy(key, model.config.n_layers) else t))
    hf = model.config.to_hf()
    hf.pop("quantization_config", None)
    hf["torch_dtype"] = str(dtype or model.embed_tokens.weight.dtype).removeprefix("torch.")
    _atomic_write_text(path / "config.json", json.dumps(hf, indent=2))
    _write_shards(tensors, path, max_shard_bytes)
