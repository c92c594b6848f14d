"""FP8 -> BF16 conversion of a checkpoint, shard by shard (never the whole model in memory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.reader import (
    CONFIG_FILE,
    INDEX_FILE,
    SCALE_SUFFIX,
    _read_json,
    _ShardReader,
    checkpoint_dir,
    read_config,
)
from dsv3.checkpoint.save import _atomic_save, _atomic_write_text


def convert_fp8_to_bf16(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantise an FP8 checkpoint shard by shard (never the whole model in memory) into `dst`,
    keeping shard names and key names, dropping the scales and `quantization_config`."""
    src, dst = checkpoint_dir(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"dst: must differ from src ({src})")
    read_config(src)  # a missing or invalid config.json is named before any shard is read
    reader = _ShardReader(src)
    cfg = _read_json(src / CONFIG_FILE)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for file in tqdm(reader.files(), desc="fp8 -> bf16", unit="shard"):
        keys = [k for k, f in reader.where.items() if f == file and not k.endswith(SCALE_SUFFIX)]
        out = {}
        for k in keys:
            t = reader.get(k)
            out[k] = t.to(dtype) if t.is_floating_point() and not k.endswith("e_score_correction_bias") else t
        _atomic_save(out, dst / file)
        weight_map.update(dict.fromkeys(out, file))
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out
    if (src / INDEX_FILE).exists():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_text(dst / INDEX_FILE, json.dumps(index, indent=2))
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    _atomic_write_text(dst / "config.json", json.dumps(cfg, indent=2))
    for extra in src.iterdir():  # tokenizer files, generation config, ...
        if (
            extra.is_file()
            and extra.suffix != ".safetensors"
            and extra.name not in ("config.json", INDEX_FILE)
        ):
            shutil.copy2(extra, dst / extra.name)
