"""Checkpoints in the official DeepSeek-V3 Hugging Face layout (DESIGN §3.7).

Keys are `model.`-prefixed module names, `lm_head.weight` for the head, routed experts one per key
(`mlp.experts.{j}.{gate,up,down}_proj.weight`, [out, in]; dsv3 keeps them fused as [E, in, out]),
and MTP module k (k = 1..D) at layer index n_layers + k - 1 with its extra `enorm`, `hnorm`,
`eh_proj`, `shared_head.norm`, plus copies of the shared `embed_tokens` and `shared_head.head`.
FP8 checkpoints store `float8_e4m3fn` weights with `<name>.weight_scale_inv` [ceil(out/128),
ceil(in/128)]; they are dequantised block by block on load.

Loading builds the model on the meta device and fills it tensor by tensor, so peak memory is the
model plus one tensor; `convert_fp8_to_bf16` works shard by shard.

Integrity on load (`verify=True`, the default): a checkpoint written by training carries
`manifest.json` with the size and SHA-256 of every file (dsv3.train.state); the files the model and
tokenizer are read from are checked against it first, so flipped bytes are refused instead of
loaded. Official checkpoints have no manifest: nothing to hash, no extra pass over the files. The
loaded weights are also scanned once in memory, and NaN or inf weights give one warning naming
them; `verify=False` skips the hashing and the scan. A tensor whose kind does not fit its
parameter (integers for float weights) is always an error. Every unreadable input (no directory,
no or invalid config.json, a malformed index, a truncated or garbled safetensors file, a shard the
index names but that is missing) is a CheckpointError whose one-line message starts with the file.

The package, by job: dsv3.checkpoint.keys (the HF key mapping), .reader (config, index, shards,
manifest), .load (`load_pretrained`), .save (`save_pretrained`, atomic files), .convert
(`convert_fp8_to_bf16`), .manifest (manifest.json written and checked), .errors (CheckpointError, DiskFullError). Everything public is importable
from `dsv3.checkpoint`, as before the split.
"""

from dsv3.checkpoint.convert import convert_fp8_to_bf16
from dsv3.checkpoint.errors import CheckpointError, DiskFullError, disk_full_message, is_disk_full
from dsv3.checkpoint.keys import _hf_prefix, hf_state_dict
from dsv3.checkpoint.load import load_pretrained
from dsv3.checkpoint.manifest import MANIFEST_FILE, check_manifest, verify_manifest, write_manifest
from dsv3.checkpoint.reader import (
    CONFIG_FILE,
    INDEX_FILE,
    SCALE_SUFFIX,
    SINGLE_FILE,
    checkpoint_dir,
    read_config,
)
from dsv3.checkpoint.save import save_pretrained

__all__ = [
    "CONFIG_FILE", "INDEX_FILE", "MANIFEST_FILE", "SCALE_SUFFIX", "SINGLE_FILE", "CheckpointError",
    "DiskFullError", "_hf_prefix", "checkpoint_dir", "convert_fp8_to_bf16", "disk_full_message",
    "check_manifest", "hf_state_dict", "is_disk_full", "load_pretrained", "read_config", "save_pretrained",
    "verify_manifest", "write_manifest",
]  # fmt: skip
