"""Resumable training state: atomic, verified, pruned checkpoints.

A checkpoint is a directory `step_00000100/` holding the model in the official HF layout
(config.json + safetensors: loadable as-is by `dsv3.load_pretrained`, the inference engine
and transformers), the tokenizer, `optimizer.pt`, `rng.pt`, `trainer.json` (step, loader position,
schedules' inputs, the training config) and, written last, `manifest.json` with the size and SHA-256
of every file. It is written into a hidden temporary directory that is renamed into place only when
complete, so a crash (even kill -9) mid-write leaves the previous checkpoint untouched; on resume,
a checkpoint whose files do not match its manifest is reported and the previous one is used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from dsv3.checkpoint import DiskFullError, disk_full_message, is_disk_full, save_pretrained
from dsv3.checkpoint.manifest import MANIFEST_FILE, check_manifest, write_manifest
from dsv3.errors import Dsv3Error

MANIFEST = MANIFEST_FILE
PREFIX = "step_"


class TrainCheckpointError(Dsv3Error, RuntimeError):
    """A training checkpoint is incomplete or corrupt; the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer: Any | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep_last` ones.

    If writing fails (a full disk, Ctrl-C, ...) the partial temporary directory is removed and the
    earlier checkpoints are left as they were; a full disk (or quota) raises DiskFullError, whose
    one-line message names `root` and the free space."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_contents(tmp, step, model, optimizer_state, trainer_state, tokenizer)
    except BaseException as e:
        full = isinstance(e, Exception) and is_disk_full(e, root)
        if full:  # measured before the clean-up gives the space back
            written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
            message = (
                f"{disk_full_message(root, f'checkpoint step {step}')} ({written / 2**20:.1f} MiB written)"
            )
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(
                f"{message}; removed the partial checkpoint, the earlier ones are intact"
            ) from e
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_contents(
    tmp: Path,
    step: int,
    model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer: Any | None,
) -> None:
    """Every file of the checkpoint, the manifest last, all fsynced: into the directory `tmp`."""
    tmp.mkdir()
    save_pretrained(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    _torch_save(optimizer_state, tmp / "optimizer.pt")
    _torch_save(_rng_state(), tmp / "rng.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
    _pause_for_tests()
    write_manifest(tmp, {"step": step})
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    # Through a Python file object, so that a failed write keeps its OSError (ENOSPC) as the
    # context of torch's "unexpected pos" error instead of losing it.
    with open(path, "wb") as f:
        torch.save(obj, f)


def _pause_for_tests() -> None:
    # Lets the crash test kill the writer mid-checkpoint at a known point.
    delay = os.environ.get("DSV3_TEST_CKPT_PAUSE")
    if delay:
        marker = os.environ.get("DSV3_TEST_CKPT_MARKER")
        if marker:
            Path(marker).write_text("writing")
        time.sleep(float(delay))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Completed checkpoint directories (renamed into place), oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify_checkpoint(path: str | Path) -> None:
    """Raise TrainCheckpointError unless every file matches the manifest (size, then SHA-256)."""
    path = Path(path)
    if not check_manifest(path, TrainCheckpointError):
        raise TrainCheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete")


def latest_valid_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported in a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except TrainCheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    return None


def load_checkpoint(path: str | Path, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify `path` (unless the caller just did: `verify=False`) and restore the RNG state; return
    (trainer state, optimizer state). The model is loaded by `load_pretrained(path)` before the
    optimizer is built."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
    return json.loads((path / "trainer.json").read_text()), optimizer_state


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
