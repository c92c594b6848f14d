"""Checkpoint errors: a checkpoint that does not match the model, and a full disk while writing one.

A full disk is recognised however the writer reports it (ENOSPC/EDQUOT, or the text safetensors and
torch.save's zip writer use), so the run stops with one line naming the directory and its free space.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from dsv3.errors import Dsv3Error


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
