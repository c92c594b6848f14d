"""A small synthetic corpus for training tests: documents of random words from a short list, so a
tiny model learns something in a few steps and the data is prepared in well under a second."""

from pathlib import Path

import torch

WORDS = "the model routes every token to experts while the cache keeps latent keys and values".split()


def write_word_corpus(
    directory: Path, n_docs: int = 40, base_len: int = 60, step: int = 3, words: list[str] = WORDS
) -> Path:
    """`n_docs` text files in `directory` (created), document d holding base_len + step * d words."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for d in range(n_docs):
        idx = torch.randint(0, len(words), (base_len + step * d,), generator=g).tolist()
        (directory / f"doc{d:02d}.txt").write_text(" ".join(words[i] for i in idx) + ".\n")
    return directory
