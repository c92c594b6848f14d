"""From a corpus to token arrays on disk: tokenizer, FIM, token splitting, cache (DESIGN §6).

`prepare_data(DataConfig)` does, each step cached under the cache directory:
1. load the corpus and split it by document (corpus.py);
2. load the given tokenizer.json, or train a byte-level BPE on the *training* documents only
   (cached by corpus fingerprint and vocabulary size);
3. tokenize every document: training documents get FIM with probability `fim_rate` (fim.py) and
   have tokens that merge punctuation with line breaks split with probability `split_punct_rate`
   (tokenizer.py, §4.1); validation documents stay plain `<bos> text <eos>`, so the validation loss
   measures ordinary next-token prediction and converts to bits per byte;
4. store each split as one flat token array plus document offsets (`.npy`, uint16 when the
   vocabulary fits), keyed by a hash of corpus + tokenizer + settings, and memory-map them.

Every file is written atomically (temporary file, then rename) and `meta.json` is written last, so
a directory with `meta.json` is complete. Several ranks may prepare at once: they write identical
bytes and the last rename wins (cheaper: rank 0 prepares, a barrier, then the others hit the
cache). The per-document random generator is seeded with (seed, name), so the result does not
depend on document order.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsv3 import paper
from dsv3.data.corpus import DEFAULT_VAL_FRACTION, EXTRA_PREFIX, Corpus, Document, load_corpus
from dsv3.data.fetch import atomic_write, cache_dir
from dsv3.data.fim import FIMConfig, document_ids
from dsv3.data.tokenizer import SPECIAL_TOKENS, PunctNewlineSplitter, Tokenizer, train_or_load

FORMAT_VERSION = 2  # bump when the tokenized layout or the FIM/splitting rules change


@dataclass(frozen=True)
class DataConfig:
    data: str | None = None  # user files/directories; None: the default corpus (stdlib + Shakespeare)
    extra: str | None = None  # more files whose documents join the training split only (corpus.load_corpus)
    tokenizer: str | None = None  # an existing tokenizer.json (or its directory); None: train one
    vocab_size: int = 8192  # for a trained tokenizer (the `small` preset's vocabulary)
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = 0  # split, FIM, token splitting, shuffling
    max_bytes: int | None = None  # corpus budget; None: 10 MB for the default corpus, all of user data
    fim_rate: float = paper.FIM_RATE
    fim_spm_rate: float = 0.0  # fraction of FIM documents in SPM order
    split_punct_rate: float = 0.1  # §4.1 gives no number; a small proportion, as it says
    cache: str | None = None  # cache directory; None: $DSV3_CACHE or ~/.cache/dsv3
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {self.seed!r}")
        if not 0 <= self.split_punct_rate <= 1:
            raise ValueError(f"split_punct_rate: must be in [0, 1], got {self.split_punct_rate}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes: must be positive, got {self.max_bytes}")
        FIMConfig(self.fim_rate, self.fim_spm_rate)  # validates both rates


@dataclass
class TokenizedSplit:
    """All documents of a split as one flat token array; document i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # [N] uint16 or uint32, usually memory-mapped
    offsets: np.ndarray  # [D + 1] int64, offsets[0] == 0, offsets[-1] == N

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


@dataclass
class Dataset:
    tokenizer: Tokenizer
    train: TokenizedSplit
    val: TokenizedSplit
    key: str  # hash of corpus + tokenizer + settings: what a resumed loader must match
    stats: dict[str, float | str] = field(default_factory=dict)  # sizes, timings, notes for the log


def prepare_data(cfg: DataConfig) -> Dataset:
    """Corpus -> tokenizer -> token arrays, each step cached (see the module docstring)."""
    root = cache_dir(cfg.cache)
    t0 = time.perf_counter()
    corpus = load_corpus(
        cfg.data,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        max_bytes=cfg.max_bytes,
        cache=root,
        extra=cfg.extra,
    )
    corpus = hold_out_tail(corpus, cfg.val_fraction)
    stats: dict[str, float | str] = {**corpus.stats(), "corpus_s": time.perf_counter() - t0}
    fingerprint = corpus.fingerprint()

    t0 = time.perf_counter()
    # the special tokens enter the key: a tokenizer cached before the chat tokens were added is not reused
    specials = ",".join(SPECIAL_TOKENS)
    own = [
        d for d in corpus.train if not d.name.startswith(EXTRA_PREFIX)
    ]  # a tokenizer learns the corpus's own
    own_print = fingerprint if len(own) == len(corpus.train) else Corpus(own, corpus.val, "").fingerprint()
    tok_cache = root / "tokenizers" / f"{_digest(own_print, cfg.vocab_size, FORMAT_VERSION, specials)}.json"
    texts = [d.text for d in own]
    tok, note = train_or_load(cfg.tokenizer, texts, cfg.vocab_size, tok_cache, show_progress=cfg.progress)
    stats["tokenizer_s"] = time.perf_counter() - t0
    stats["tokenizer"] = note

    # the tokenizer enters the key by its hash; vocab_size only matters when one is trained
    skip = ("data", "extra", "tokenizer", "cache", "progress", "vocab_size")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    tok_hash = hashlib.sha256(tok.hf.to_str(pretty=False).encode()).hexdigest()
    key = _digest(fingerprint, tok_hash, json.dumps(settings, sort_keys=True), FORMAT_VERSION)
    out = root / "tokenized" / key
    t0 = time.perf_counter()
    if not (out / "meta.json").exists():
        _tokenize_to_disk(corpus, tok, cfg, out)
    train, val = (_load_split(out, name) for name in ("train", "val"))
    stats.update(tokenize_s=time.perf_counter() - t0, train_tokens=len(train), val_tokens=len(val))
    return Dataset(tok, train, val, key, stats)


def hold_out_tail(corpus: Corpus, val_fraction: float) -> Corpus:
    """A corpus whose split by document held nothing out (a lone document, e.g. one text file) gets
    the last `val_fraction` of its largest document's lines as the validation document instead."""
    if corpus.val or val_fraction <= 0 or not corpus.train:
        return corpus
    own = [i for i, d in enumerate(corpus.train) if not d.name.startswith(EXTRA_PREFIX)] or [0]
    big = max(own, key=lambda i: len(corpus.train[i].text))  # never a training-only extra document
    doc = corpus.train[big]
    lines = doc.text.splitlines(keepends=True)
    total = sum(len(d.text) for d in corpus.train)
    want, cut = val_fraction * total, len(lines)
    tail = 0
    while cut > 1 and tail < want:  # whole lines from the end, leaving at least one for training
        cut -= 1
        tail += len(lines[cut])
    text = doc.text
    at = len("".join(lines[:cut])) if cut < len(lines) else int(len(text) * (1 - min(val_fraction, 0.5)))
    if not 0 < at < len(text):
        return corpus
    head = Document(text[:at], doc.source, doc.name)
    held = Document(text[at:], doc.source, f"{doc.name}#tail")
    train = corpus.train[:big] + [head] + corpus.train[big + 1 :]
    return Corpus(train, [held], f"{corpus.description} (validation: the last lines of {doc.name})")


def tokenize_documents(
    docs: list[Document],
    tok: Tokenizer,
    *,
    seed: int,
    fim: FIMConfig,
    split_punct_rate: float,
    progress: bool,
) -> TokenizedSplit:
    """Token ids of each document (FIM and token splitting applied as configured), concatenated."""
    splitter = PunctNewlineSplitter(tok) if split_punct_rate > 0 else None
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    pieces, lengths = [], []
    total = sum(len(d.text) for d in docs)
    bar = tqdm(
        total=total, desc="tokenizing", unit="char", unit_scale=True, disable=not progress, leave=False
    )
    for d in docs:
        bar.update(len(d.text))
        rng = np.random.default_rng([seed, int(_digest(d.name)[:16], 16)])
        ids = np.asarray(document_ids(tok, d.text, rng, fim), dtype=dtype)
        if splitter is not None:
            ids = splitter(ids, split_punct_rate, rng)
        pieces.append(ids)
        lengths.append(len(ids))
    bar.close()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return TokenizedSplit(tokens, offsets)


def _tokenize_to_disk(corpus: Corpus, tok: Tokenizer, cfg: DataConfig, out: Path) -> None:
    fim = FIMConfig(cfg.fim_rate, cfg.fim_spm_rate)
    common = dict(seed=cfg.seed, progress=cfg.progress)
    splits = {
        "train": tokenize_documents(
            corpus.train, tok, fim=fim, split_punct_rate=cfg.split_punct_rate, **common
        ),
        "val": tokenize_documents(corpus.val, tok, fim=FIMConfig(0.0), split_punct_rate=0.0, **common),
    }
    for name, split in splits.items():
        for part, arr in (("tokens", split.tokens), ("offsets", split.offsets)):
            with atomic_write(out / f"{name}_{part}.npy") as f:
                np.save(f, arr)
    meta = {"corpus": corpus.description, "vocab_size": tok.vocab_size, "format": FORMAT_VERSION}
    meta |= {f"{n}_tokens": len(s) for n, s in splits.items()} | {
        f"{n}_docs": s.n_docs for n, s in splits.items()
    }
    with atomic_write(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)


def _load_split(out: Path, name: str) -> TokenizedSplit:
    try:
        tokens = np.load(out / f"{name}_tokens.npy", mmap_mode="r")
    except ValueError:  # numpy cannot memory-map an empty array (e.g. val_fraction=0)
        tokens = np.load(out / f"{name}_tokens.npy")
    offsets = np.load(out / f"{name}_offsets.npy")
    return TokenizedSplit(tokens, offsets)


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:24]
