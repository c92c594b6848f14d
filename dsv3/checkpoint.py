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
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from dsv3.config import ConfigError, ModelConfig
from dsv3.errors import Dsv3Error
from dsv3.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"  # written by dsv3.train.state.save_checkpoint
SCALE_SUFFIX = "_scale_inv"
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")


class CheckpointError(Dsv3Error, RuntimeError):
    """A checkpoint does not match the model: the message names the keys and shapes."""


class DiskFullError(CheckpointError):
    """No space left (or over quota) while writing a checkpoint; the message names the directory.
    What was partly written has been removed: the files that were there before are intact."""


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the writers that do not raise OSError say it: safetensors (Rust), torch.save's zip writer (which
# reports a short write as "unexpected pos A vs B" and keeps the OSError only as __context__).
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(exc: BaseException, directory: str | Path | None = None) -> bool:
    """Whether `exc` (or an error it was raised from) means the file system is full or over quota.
    With `directory`, torch's bare "unexpected pos" or "iostream error" also count when it has less
    than 1 MiB free (torch.save to a path hides the OSError)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    if directory is not None and any(t in str(exc) for t in ("unexpected pos", "iostream error")):
        try:
            return shutil.disk_usage(directory).free < 2**20
        except OSError:
            return False
    return False


def disk_full_message(directory: str | Path, what: str) -> str:
    """One line: the directory, what was being written, the space left."""
    try:
        usage = shutil.disk_usage(directory)
        space = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
    except OSError:
        space = "free space unknown"
    return f"no space left on {directory} ({space}) while writing {what}"


# ---- key mapping ---------------------------------------------------------------------------------
def _hf_prefix(name: str, n_layers: int) -> str:
    """Our module path -> the HF key prefix (without the expert split)."""
    if name.startswith("lm_head."):
        return name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        rest = rest[len("block.") :] if rest.startswith("block.") else rest
        return f"model.layers.{n_layers + k}.{rest}"
    return "model." + name


def hf_state_dict(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF key, tensor) for every weight, experts split per expert, MTP copies included."""
    cfg = model.config
    for name, t in model.state_dict().items():
        prefix = _hf_prefix(name, cfg.n_layers)
        short = name.rsplit(".", 1)[-1]
        if ".mlp.experts." in name and short in _EXPERT_NAMES:
            base = prefix.rsplit(".", 1)[0]
            for j in range(t.shape[0]):
                yield f"{base}.{j}.{_EXPERT_NAMES[short]}.weight", t[j].T  # [in, out] -> [out, in]
        else:
            yield prefix, t
    for k in range(cfg.n_mtp_layers):
        yield f"model.layers.{cfg.n_layers + k}.embed_tokens.weight", model.embed_tokens.weight.detach()
        yield f"model.layers.{cfg.n_layers + k}.shared_head.head.weight", model.lm_head.weight.detach()


def _our_target(hf_key: str, n_layers: int) -> tuple[str | None, int | None]:
    """HF key -> (our state-dict key, expert index or None). (None, None): a shared MTP copy."""
    expert = None
    m = _EXPERT_RE.match(hf_key)
    if m:
        hf_key = f"{m.group(1)}.{ {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}[m.group(3)] }"
        expert = int(m.group(2))
    if hf_key == "lm_head.weight":
        return hf_key, None
    m = _LAYER_RE.match(hf_key)
    if m and int(m.group(1)) >= n_layers:
        k, rest = int(m.group(1)) - n_layers, m.group(2)
        if rest in _MTP_SHARED:
            return None, None
        if not rest.startswith(_MTP_OWN):
            rest = "block." + rest
        return f"mtp.{k}.{rest}", expert
    if not hf_key.startswith("model."):
        return f"<unknown>{hf_key}", None
    return hf_key[len("model.") :], expert


# ---- reading -------------------------------------------------------------------------------------
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


# ---- integrity -----------------------------------------------------------------------------------
def _read_by_loading(name: str) -> bool:
    """Manifest entries the model and tokenizer are read from; the optimizer and RNG state (`*.pt`)
    and trainer.json are training's alone and not worth hashing for inference."""
    return not (name.endswith(".pt") or name == "trainer.json")


def verify_manifest(path: str | Path) -> bool:
    """Check the files loading reads against the checkpoint's manifest.json (size, then SHA-256).
    Returns False when there is no manifest (official checkpoints): nothing to verify. A missing,
    truncated or altered file, or an unreadable manifest, is a CheckpointError naming the file."""
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return False
    files = _read_json(manifest).get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest}: no 'files' object of name -> size and sha256")
    from dsv3.data.fetch import sha256_file

    for name, want in files.items():
        if not _read_by_loading(name):
            continue
        f = path / name
        if not isinstance(want, dict) or "bytes" not in want or "sha256" not in want:
            raise CheckpointError(f"{manifest}: entry {name!r} lacks 'bytes' or 'sha256'")
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {MANIFEST_FILE} but missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"{f}: truncated or altered ({size} bytes, {MANIFEST_FILE} says {want['bytes']})"
            )
        if sha256_file(f) != want["sha256"]:
            raise CheckpointError(
                f"{f}: corrupt (SHA-256 does not match {MANIFEST_FILE}); "
                "verify=False / --no-verify loads it anyway"
            )
    return True


def _check_kind(reader: _ShardReader, key: str, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Integers (or bools) for a float weight would be cast silently by copy_: refuse them."""
    if src.is_floating_point() != dst.is_floating_point():
        raise CheckpointError(
            f"{reader.path / reader.where[key]}: {key} is {str(src.dtype).removeprefix('torch.')}, "
            f"the model's parameter is {str(dst.dtype).removeprefix('torch.')}"
        )


def _finite(t: torch.Tensor) -> bool:
    """Whether every value is finite: min and max in one pass with no temporary (NaN propagates
    into both), ~25x cheaper than isfinite(t).all() and far below the cost of loading t."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _warn_non_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One warning naming every loaded tensor with NaN or inf values."""
    bad = [name for name, t in tensors.items() if not _finite(t)]
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        warnings.warn(
            f"{path}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): {shown}", stacklevel=3
        )


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    strict: bool = True,
    keep_fp8: bool | Callable[[str], bool] = False,
    verify: bool = True,
) -> Transformer | tuple[Transformer, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Build a Transformer from a checkpoint directory (config.json + safetensors, maybe sharded,
    BF16/FP32 or FP8 with block scales). Missing, unexpected or mis-shaped keys raise
    CheckpointError naming them; absent MTP weights drop the MTP modules with a warning.

    keep_fp8: True, or a predicate on module names (e.g. "layers.0.self_attn.q_a_proj"), keeps the
    FP8 weights of those nn.Linear projections as stored instead of dequantising them, so an FP8
    checkpoint served in FP8 never holds the dequantised copies (peak memory). Those modules' `weight`
    is left as a plain meta tensor (no storage, not a parameter) and the call returns
    (model, raw), raw mapping each module name to (weight e4m3 [out, in], weight_scale_inv FP32
    [ceil(out/128), ceil(in/128)]), for the caller to install (dsv3.infer.fp8_weights does). The
    fused routed experts are always dequantised.

    verify: check the files against the checkpoint's manifest.json when it has one (SHA-256 of
    every model and tokenizer file: a second read of them) and warn on NaN or inf weights; False
    skips both, for speed on a trusted checkpoint. Integer tensors for float weights are refused
    either way."""
    path = checkpoint_dir(path)
    if verify:
        verify_manifest(path)
    cfg = read_config(path)
    reader = _ShardReader(path)
    weight_keys = [k for k in reader.where if not k.endswith(SCALE_SUFFIX)]
    mtp_present = any(
        _LAYER_RE.match(k) and int(_LAYER_RE.match(k).group(1)) >= cfg.n_layers for k in weight_keys
    )
    if cfg.n_mtp_layers and not mtp_present:
        warnings.warn(
            f"{path}: config has {cfg.n_mtp_layers} MTP layer(s) but no MTP weights; dropping MTP",
            stacklevel=2,
        )
        cfg = cfg.replace(n_mtp_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    kept = _fp8_linears(model, reader, keep_fp8) if keep_fp8 else {}  # HF key -> module name
    for name in kept.values():
        module = model.get_submodule(name)
        weight = module.weight.detach()
        del module.weight
        module.weight = weight  # a plain meta tensor: `to_empty` allocates nothing for it
    model = model.to(dtype).to_empty(device=device)
    params = model.state_dict()
    loaded: set[tuple[str, int | None]] = set()
    unexpected, mismatched = [], []
    raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for key in tqdm(weight_keys, desc=f"loading {path.name}", disable=len(weight_keys) < 2000, unit="t"):
            if key in kept:
                w, scale = reader.raw_fp8(key)
                raw[kept[key]] = (w.to(device), scale.to(device))
                continue
            ours, expert = _our_target(key, cfg.n_layers)
            if ours is None:
                continue  # the MTP copy of a shared embedding / head
            if ours not in params:
                unexpected.append(key)
                continue
            dst = params[ours] if expert is None else params[ours][expert].T
            if expert is not None and expert >= params[ours].shape[0]:
                unexpected.append(key)
                continue
            src = reader.get(key)
            if tuple(src.shape) != tuple(dst.shape):
                mismatched.append(f"{key}: checkpoint {tuple(src.shape)} vs model {tuple(dst.shape)}")
                continue
            _check_kind(reader, key, src, dst)
            dst.copy_(src)
            loaded.add((ours, expert))
    expected = _expected_targets(model)
    missing = sorted(k for k in expected if k not in loaded)
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:10]))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected)[:10])}")
    if missing:
        names = [k if e is None else f"{k}[expert {e}]" for k, e in missing[:10]]
        problems.append(f"missing keys ({len(missing)}): {', '.join(names)}")
    if problems and (strict or mismatched):
        raise CheckpointError(f"{path}: " + " | ".join(problems))
    if problems:
        warnings.warn(f"{path}: " + " | ".join(problems), stacklevel=2)
    if verify:
        _warn_non_finite(path, {ours: params[ours] for ours, _ in loaded})
    model.reset_buffers()
    for moe in model.moe_layers():
        moe.last_counts.zero_()
    return (model, raw) if keep_fp8 else model


def _fp8_linears(
    model: Transformer, reader: _ShardReader, keep: bool | Callable[[str], bool]
) -> dict[str, str]:
    """HF weight key -> module name of every nn.Linear stored in FP8 (with its scale) that `keep`
    selects."""
    out = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not (keep is True or keep(name)):
            continue
        key = _hf_prefix(name + ".weight", model.config.n_layers)
        if key in reader.where and key + SCALE_SUFFIX in reader.where and reader.is_fp8(key):
            out[key] = name
    return out


def _expected_targets(model: Transformer) -> set[tuple[str, int | None]]:
    out: set[tuple[str, int | None]] = set()
    for name, t in model.state_dict().items():
        if ".mlp.experts." in name and name.rsplit(".", 1)[-1] in _EXPERT_NAMES:
            out.update((name, j) for j in range(t.shape[0]))
        else:
            out.add((name, None))
    return out


# ---- writing -------------------------------------------------------------------------------------
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


def _is_mtp_copy(key: str, n_layers: int) -> bool:
    """The MTP layers' copies of the shared embedding/head (safetensors refuses shared storage)."""
    m = _LAYER_RE.match(key)
    return bool(m) and int(m.group(1)) >= n_layers and m.group(2) in _MTP_SHARED


# ---- FP8 -> BF16 conversion ----------------------------------------------------------------------
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
