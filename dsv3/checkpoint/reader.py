"""Reading a checkpoint directory: its config.json, its shard index, its safetensors shards (lazily,
FP8 weights dequantised block by block with their `weight_scale_inv`); manifest.json is
dsv3.checkpoint.manifest.

Every unreadable input (no directory, no or invalid config.json, a malformed index, a truncated or
garbled safetensors file, a shard the index names but that is missing) is a CheckpointError whose
one-line message starts with the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dsv3.checkpoint.errors import CheckpointError
from dsv3.config import ConfigError, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SCALE_SUFFIX = "_scale_inv"


def checkpoint_dir(path: str | Path) -> Path:
    """`path` as a checkpoint directory, or a CheckpointError saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory with {CONFIG_FILE})")
    return path


def read_config(path: Path) -> ModelConfig:
    """The ModelConfig of checkpoint directory `path`; any problem names config.json."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; {path} is not a checkpoint directory")
    hf = _read_json(file)
    try:
        return ModelConfig.from_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"{file}: required field {e.args[0]!r} missing") from e
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from e


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_index(file: Path) -> dict[str, str]:
    """The weight_map of a shard index: key -> shard file name (a plain name in the directory)."""
    where = _read_json(file).get("weight_map")
    if not isinstance(where, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in where.items()
    ):
        raise CheckpointError(f"{file}: no 'weight_map' object of key -> shard file name")
    for shard in set(where.values()):
        # a shard is a file next to the index: never a path out of the checkpoint directory
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{file}: shard name {shard!r} is not a file name in the directory")
    return where


def _open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a valid safetensors file (truncated or corrupt: {e})") from e


class _ShardReader:
    """Opens the shards of a checkpoint lazily; finds any key (weights and their FP8 scales)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if (path / INDEX_FILE).exists():
            self.where: dict[str, str] = _read_index(path / INDEX_FILE)
        elif (path / SINGLE_FILE).exists():
            with _open_safetensors(path / SINGLE_FILE) as f:
                self.where = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self._open: dict[str, object] = {}

    def files(self) -> list[str]:
        return sorted(set(self.where.values()))

    def handle(self, file: str):
        if file not in self._open:
            if not (self.path / file).is_file():
                raise CheckpointError(f"{self.path / file}: listed in {INDEX_FILE} but missing")
            self._open[file] = _open_safetensors(self.path / file)
        return self._open[file]

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor under `key` as stored; a key the index names but its shard lacks, or data the
        header promises but the file cannot give, is a CheckpointError naming the shard."""
        file = self.path / self.where[key]
        try:
            return self.handle(self.where[key]).get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: cannot read {key} ({e})") from e

    def is_fp8(self, key: str) -> bool:
        """Whether `key` is stored as float8_e4m3fn (read from the header, not the data)."""
        return self.handle(self.where[key]).get_slice(key).get_dtype() == "F8_E4M3"

    def raw_fp8(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An FP8 weight as stored (e4m3 [out, in]) and its weight_scale_inv (FP32)."""
        scale_key = key + SCALE_SUFFIX
        return self.tensor(key), self.tensor(scale_key).float()

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor under `key`, FP8 weights dequantised with their scale (to `dtype` if given)."""
        t = self.tensor(key)
        if t.dtype == torch.float8_e4m3fn:
            scale_key = key + SCALE_SUFFIX
            if scale_key not in self.where:
                raise CheckpointError(f"{key}: float8 weight without {scale_key}")
            from dsv3.fp8.quant import dequantize_blocks

            t = dequantize_blocks(t, self.tensor(scale_key).float(), dtype=torch.float32)
        return t if dtype is None else t.to(dtype)
