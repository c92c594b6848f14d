"""Reference numbers the trainer prints next to its losses.

- Bytes per token: how much text a token stands for, counted exactly from the vocabulary (each
  byte-level BPE token is a fixed byte string; special tokens count 0). It converts a loss in
  nats/token into bits per byte, `loss / ln 2 / bytes_per_token`, which is comparable across
  tokenizers.
- Unigram baseline: the cross-entropy (nats/token) of the validation tokens under the unigram
  distribution of the training tokens (add-one smoothed so unseen tokens cost a finite amount).
  It is what a model that ignores context achieves; a trained model must be far below it.
"""

from __future__ import annotations

import math

import numpy as np

from dsv3.data.tokenizer import Tokenizer


def bytes_per_token(ids: np.ndarray, tok: Tokenizer) -> float:
    """Average UTF-8 bytes of text per token of `ids` (special tokens count 0 bytes)."""
    ids = np.asarray(ids)
    if ids.size == 0:
        raise ValueError("bytes_per_token: empty token sequence")
    return float(tok.token_bytes()[ids.astype(np.int64)].sum()) / ids.size


def bits_per_byte(loss_nats_per_token: float, bytes_per_tok: float) -> float:
    return loss_nats_per_token / math.log(2) / bytes_per_tok


def unigram_entropy(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy in nats/token of `val_ids` under the add-one smoothed unigram of `train_ids`."""
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    val_counts = np.bincount(np.asarray(val_ids, dtype=np.int64), minlength=vocab_size)
    if val_counts.sum() == 0:
        raise ValueError("unigram_entropy: empty validation sequence")
    return float(-(val_counts * log_p).sum() / val_counts.sum())
