"""manifest.json: the size and SHA-256 of every file of a checkpoint written by training, written
last (so its presence marks a complete checkpoint) and checked in one place for both readers.

Loading (`verify_manifest`, used by `load_pretrained`) checks the files the model and tokenizer are
read from, and passes a checkpoint without a manifest (an official release: nothing to hash).
Resuming (dsv3.train.state.verify_checkpoint) checks every file and requires the manifest. A file
is compared by size first (cheap, catches truncation) and then by SHA-256.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from dsv3.checkpoint.errors import CheckpointError

MANIFEST_FILE = "manifest.json"


def write_manifest(directory: Path, extra: dict) -> None:
    """Hash every file under `directory` into its manifest.json (with `extra` fields, e.g. the step)."""
    from dsv3.data.fetch import sha256_file

    files = sorted(p for p in directory.rglob("*") if p.is_file())
    entries = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files
    }
    (directory / MANIFEST_FILE).write_text(json.dumps({**extra, "files": entries}, indent=2))


def check_manifest(
    path: Path,
    error: Callable[[str], Exception],
    select: Callable[[str], bool] = lambda name: True,
    hint: str = "",
) -> bool:
    """Check the files of checkpoint `path` that `select` picks against its manifest.json; False when
    it has none. A missing, truncated or altered file, or an unreadable manifest, raises
    `error(message)` naming the file (`hint` is appended to a SHA-256 mismatch)."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{manifest}: not valid JSON ({e})") from e
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise error(f"{manifest}: no 'files' object of name -> size and sha256")
    from dsv3.data.fetch import sha256_file  # looked up per call: tests count the hashing

    for name, want in files.items():
        if not select(name):
            continue
        f = path / name
        if not isinstance(want, dict) or "bytes" not in want or "sha256" not in want:
            raise error(f"{manifest}: entry {name!r} lacks 'bytes' or 'sha256'")
        if not f.is_file():
            raise error(f"{f}: listed in {MANIFEST_FILE} but missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise error(f"{f}: truncated or altered ({size} bytes, {MANIFEST_FILE} says {want['bytes']})")
        if sha256_file(f) != want["sha256"]:
            raise error(f"{f}: corrupt (SHA-256 does not match {MANIFEST_FILE}){hint}")
    return True


def _read_by_loading(name: str) -> bool:
    """Manifest entries the model and tokenizer are read from; the optimizer and RNG state (`*.pt`)
    and trainer.json are training's alone and not worth hashing for inference."""
    return not (name.endswith(".pt") or name == "trainer.json")


def verify_manifest(path: str | Path) -> bool:
    """Check the files loading reads against the checkpoint's manifest.json (size, then SHA-256).
    Returns False when there is no manifest (official checkpoints): nothing to verify. A missing,
    truncated or altered file, or an unreadable manifest, is a CheckpointError naming the file."""
    hint = "; verify=False / --no-verify loads it anyway"
    return check_manifest(Path(path), CheckpointError, _read_by_loading, hint)
