"""Packing, sharding and resumable batching of tokenized documents (report §4.1, DESIGN §6).

Packing: each epoch the documents of the training split are shuffled (a permutation seeded by
(seed, epoch)) and concatenated into one token stream, which is cut into consecutive,
non-overlapping sequences of `seq_len + 1` tokens: inputs are `seq[:-1]`, labels `seq[1:]`.
Sequences cross document boundaries freely (no cross-sample attention mask, §4.1); the bos/eos of
each document mark the boundaries. Nothing is padded; the stream's tail that does not fill a
sequence is dropped for that epoch (a different tail each epoch, since the order changes).

The epoch's sequences are then served in a second seeded random order: documents can be tens of
thousands of tokens (a whole play, a whole module), and serving the stream in order would feed
dozens of consecutive batches from one document, which SGD overfits to (validation loss rose above
the unigram baseline on the default corpus before this). Each batch is thus a near-i.i.d. draw.

The stream is never materialised: with `cum` = prefix sums of the shuffled document lengths,
stream position p belongs to shuffled document d = searchsorted(cum, p) and sits at
`offsets[perm[d]] + p - cum[d]` in the flat token array, so a batch is one vectorised gather and
memory stays O(documents) however large the corpus.

Sharding (data parallelism): the g-th sequence of the epoch's serving order goes to rank
g % world_size, and every rank gets the same number of sequences per epoch (the last
`n % world_size` are dropped), so the ranks see disjoint data and stay in step. The serving order
depends on (seed, epoch) only, not on the number of ranks.

Resuming: the state is (epoch, position within the rank's shard of that epoch); the order is a pure
function of (seed, epoch), so a loader restored from `state_dict()` yields exactly the batches the
uninterrupted one would have, whatever batch sizes are requested (the trainer ramps them, §4.2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dsv3.data.dataset import TokenizedSplit


class Packing:
    """The packed order of one epoch: which tokens form global sequence g."""

    def __init__(self, split: TokenizedSplit, seq_len: int, order: np.ndarray) -> None:
        self.split, self.width, self.order = split, seq_len + 1, order
        lengths = np.diff(split.offsets)[order]
        self.cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # [D + 1]
        self.n_sequences = int(self.cum[-1]) // self.width

    def gather(self, seq_ids: np.ndarray) -> np.ndarray:
        """Tokens of global sequences `seq_ids` ([B]) as int64 [B, seq_len + 1]."""
        pos = seq_ids[:, None] * self.width + np.arange(self.width)  # [B, W] stream positions
        d = np.searchsorted(self.cum, pos, side="right") - 1  # [B, W] index into the shuffled order
        src = self.split.offsets[self.order[d]] + (pos - self.cum[d])
        return np.asarray(self.split.tokens[src.ravel()], dtype=np.int64).reshape(pos.shape)


class PackedLoader:
    """Shuffled, packed, sharded training batches with a resumable position."""

    def __init__(
        self, split: TokenizedSplit, seq_len: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        if seq_len < 1:
            raise ValueError(f"seq_len: must be positive, got {seq_len}")
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0  # position: sequences of this epoch already served (per rank)
        self._packing: Packing | None = None
        if self.per_rank < 1:
            raise ValueError(
                f"the training split has {len(split)} tokens: too few for one sequence of seq_len + 1 = "
                f"{seq_len + 1} tokens per rank ({world_size} ranks); use more data or a shorter seq_len"
            )

    @property
    def per_rank(self) -> int:
        """Sequences each rank gets per epoch (same every epoch: the total token count is fixed)."""
        return (len(self.split) // (self.seq_len + 1)) // self.world_size

    def _epoch_packing(self) -> Packing:
        if self._packing is None:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.split.n_docs)
            self._packing = Packing(self.split, self.seq_len, order)
            serve = np.random.default_rng([self.seed, self.epoch, 1]).permutation(self._packing.n_sequences)
            self._serve = serve.astype(np.int64)
        return self._packing

    def serving_order(self) -> np.ndarray:
        """The current epoch's packed-sequence ids in the order they are served (all ranks)."""
        self._epoch_packing()
        return self._serve

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next `batch_size` sequences of this rank: LongTensor [batch_size, seq_len + 1]."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        rows = []
        while batch_size > 0:
            take = min(batch_size, self.per_rank - self.position)
            local = np.arange(self.position, self.position + take, dtype=np.int64)
            packing = self._epoch_packing()
            rows.append(packing.gather(self._serve[local * self.world_size + self.rank]))
            self.position += take
            batch_size -= take
            if self.position == self.per_rank:  # epoch done: next one has a fresh shuffle
                self.epoch, self.position, self._packing = self.epoch + 1, 0, None
        return torch.from_numpy(np.concatenate(rows))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "n_tokens": len(self.split),
            "n_docs": self.split.n_docs,
            "layout": self._layout_hash(),
        }

    def _layout_hash(self) -> str:
        """A cheap fingerprint of the split (document lengths and a few tokens), checked on resume."""
        h = hashlib.sha256(np.ascontiguousarray(self.split.offsets, dtype=np.int64).tobytes())
        h.update(np.asarray(self.split.tokens[:: max(1, len(self.split) // 4096)], dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; the data and settings must be the same.

        The world size may differ (a checkpoint resumed on more or fewer ranks): the sequences of
        the epoch served so far, position x world_size, are then split over the new ranks, so the
        next global batches hold the same sequences. If the rest of the epoch cannot hold one more
        sequence per new rank, the next epoch starts."""
        now = self.state_dict()
        for name in ("seq_len", "seed", "n_tokens", "n_docs", "layout"):
            mine = now[name]
            if state[name] != mine:
                raise ValueError(f"loader state: {name} was {state[name]} when saved, is {mine} now")
        epoch, position = int(state["epoch"]), int(state["position"])
        if state["world_size"] != self.world_size:
            served = position * state["world_size"]
            if served % self.world_size:
                raise ValueError(
                    f"loader state: {served} sequences of epoch {epoch} were served by {state['world_size']} "
                    f"ranks; they do not split evenly over {self.world_size} ranks"
                )
            position = served // self.world_size
            if position >= self.per_rank:
                epoch, position = epoch + 1, 0
        if not 0 <= position < self.per_rank:
            raise ValueError(f"loader state: position {position} outside [0, {self.per_rank})")
        self.epoch, self.position, self._packing = epoch, position, None


def val_batches(
    split: TokenizedSplit,
    seq_len: int,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[torch.Tensor]:
    """The validation split, packed in stored order (no shuffle), sharded like training.

    Yields LongTensor [<= batch_size, seq_len + 1]; the last batch may be smaller. Every rank
    yields the same number of batches, so per-batch all-reduces line up.
    """
    packing = Packing(split, seq_len, np.arange(split.n_docs))
    per_rank = packing.n_sequences // world_size
    if per_rank < 1:
        raise ValueError(
            f"the validation split has {len(split)} tokens: too few for one sequence of {seq_len + 1} "
            f"tokens per rank ({world_size} ranks); raise val_fraction or lower seq_len"
        )
    local = np.arange(per_rank, dtype=np.int64) * world_size + rank
    for i, start in enumerate(range(0, per_rank, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield torch.from_numpy(packing.gather(local[start : start + batch_size]))
