"""Packing, sharding, epochs, resume and validation batches, on synthetic token arrays.

Every token of the synthetic split is unique (token value = its index in the flat array), so a
batch row can be traced back to the documents and positions it came from.
"""

import numpy as np
import pytest
import torch

from dsv3.data.dataset import TokenizedSplit
from dsv3.data.loader import PackedLoader, val_batches

L = 16  # seq_len; rows are L + 1 tokens


def make_split(n_docs: int = 40, seed: int = 0, max_len: int = 50) -> TokenizedSplit:
    lengths = np.random.default_rng(seed).integers(1, max_len, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedSplit(np.arange(offsets[-1], dtype=np.uint32), offsets)


def doc_of(split: TokenizedSplit, token: int) -> int:
    return int(np.searchsorted(split.offsets, token, side="right") - 1)


def epoch_stream(loader: PackedLoader) -> np.ndarray:
    """One epoch's rows put back into packed-stream order (they are served shuffled)."""
    assert loader.position == 0
    served = loader.serving_order()
    rows = loader.next_batch(loader.per_rank)
    assert loader.position == 0  # a whole epoch moves to the start of the next one
    assert sorted(served.tolist()) == list(range(len(served)))  # every sequence once
    return rows[np.argsort(served)].reshape(-1).numpy()


def test_sequences_are_served_shuffled_not_in_stream_order():
    split = make_split(n_docs=60)
    loader = PackedLoader(split, L, seed=3)
    rows = loader.next_batch(loader.per_rank)
    # the stream position of each served row: consecutive batches must not walk through one document
    starts = rows[:, 0].numpy()
    assert not np.all(np.diff(starts) > 0)
    step_docs = [doc_of(split, int(t)) for t in starts[:8]]
    assert len(set(step_docs)) > 4  # a batch of 8 mixes many documents


def test_packing_is_the_shuffled_document_stream():
    split = make_split()
    loader = PackedLoader(split, L, seed=3)
    batch = loader.next_batch(5)
    assert batch.shape == (5, L + 1) and batch.dtype == torch.int64
    loader = PackedLoader(split, L, seed=3)
    stream = epoch_stream(loader)
    n_seq = len(split) // (L + 1)
    assert len(stream) == n_seq * (L + 1)  # exact lengths, only the final partial sequence dropped
    assert len(split) - len(stream) < L + 1
    # every token of the stream appears in order: the stream is whole documents back to back
    docs = [doc_of(split, t) for t in stream]
    runs = [docs[0]] + [d for prev, d in zip(docs, docs[1:]) if d != prev]
    assert len(runs) == len(set(runs))  # each document appears in one contiguous run
    pos = 0
    for i, d in enumerate(runs):
        doc = split.doc(d)
        piece = stream[pos : pos + len(doc)]
        if i < len(runs) - 1:
            assert np.array_equal(piece, doc)  # complete and in order
        else:
            assert np.array_equal(piece, doc[: len(piece)])  # the cut at the end of the epoch
        pos += len(piece)
    assert pos == len(stream)
    assert runs != sorted(runs)  # shuffled


def test_epochs_reshuffle_and_cover_everything():
    split = make_split(n_docs=30, max_len=20)  # short docs: the dropped tail is less than one doc
    loader = PackedLoader(split, L, seed=0)
    streams = [epoch_stream(loader) for _ in range(3)]
    assert loader.epoch == 3
    orders = [list(dict.fromkeys(doc_of(split, t) for t in s)) for s in streams]
    assert len({tuple(o) for o in orders}) == 3  # a fresh order each epoch
    lengths = np.diff(split.offsets)
    for o in orders:  # only whole documents inside the dropped tail (< one row) may be missing
        missing = sorted(set(range(split.n_docs)) - set(o))
        assert lengths[missing].sum() < L + 1


def test_shards_are_disjoint_and_interleave_the_global_order():
    split = make_split(n_docs=60)
    world = 3
    full = PackedLoader(split, L, seed=7)
    global_rows = full.next_batch(full.per_rank)
    per_rank = (len(split) // (L + 1)) // world
    seen = []
    for rank in range(world):
        loader = PackedLoader(split, L, seed=7, rank=rank, world_size=world)
        assert loader.per_rank == per_rank
        rows = loader.next_batch(per_rank)
        assert torch.equal(rows, global_rows[rank : world * per_rank : world])
        seen.append(set(rows.reshape(-1).tolist()))
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen[a] & seen[b]


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_resume_equals_uninterrupted(world, rank):
    split = make_split(n_docs=12)
    sizes = [3, 1, 7, 2, 9, 4, 6, 5, 8, 3, 11, 2]  # ramping batch sizes that cross epoch boundaries
    ref = PackedLoader(split, L, seed=1, rank=rank, world_size=world)
    want = [ref.next_batch(b) for b in sizes]
    assert ref.epoch >= 2
    for cut in range(1, len(sizes)):
        first = PackedLoader(split, L, seed=1, rank=rank, world_size=world)
        for b in sizes[:cut]:
            first.next_batch(b)
        state = first.state_dict()
        resumed = PackedLoader(split, L, seed=1, rank=rank, world_size=world)
        resumed.load_state_dict(state)
        for b, w in zip(sizes[cut:], want[cut:]):
            assert torch.equal(resumed.next_batch(b), w)


def test_state_mismatch_is_rejected():
    split = make_split()
    state = PackedLoader(split, L).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(split, L + 1).load_state_dict(state)
    with pytest.raises(ValueError, match="n_tokens"):
        PackedLoader(make_split(seed=1), L).load_state_dict(state)
    same_shape = make_split()
    same_shape.tokens = same_shape.tokens[::-1].copy()  # other tokens, same sizes
    with pytest.raises(ValueError, match="layout"):
        PackedLoader(same_shape, L).load_state_dict(state)


def test_seed_changes_order():
    split = make_split()
    a = PackedLoader(split, L, seed=0).next_batch(4)
    b = PackedLoader(split, L, seed=1).next_batch(4)
    assert not torch.equal(a, b)
    assert torch.equal(a, PackedLoader(split, L, seed=0).next_batch(4))


def test_too_little_data_and_bad_arguments():
    tiny = TokenizedSplit(np.arange(10, dtype=np.uint16), np.array([0, 10]))
    with pytest.raises(ValueError, match="too few"):
        PackedLoader(tiny, 16)
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(make_split(), L, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PackedLoader(make_split(), L).next_batch(0)


def test_val_batches_stored_order_and_sharding():
    split = make_split(n_docs=20)
    rows = torch.cat(list(val_batches(split, L, batch_size=4)))
    n_seq = len(split) // (L + 1)
    assert rows.shape == (n_seq, L + 1)
    assert np.array_equal(rows.reshape(-1).numpy(), np.arange(n_seq * (L + 1)))  # stored order, no gaps
    per_rank = [list(val_batches(split, L, batch_size=3, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    r0, r1 = (torch.cat(b) for b in per_rank)
    assert torch.equal(r0, rows[0 : 2 * len(r0) : 2]) and torch.equal(r1, rows[1 : 2 * len(r1) : 2])
    assert len(list(val_batches(split, L, batch_size=1, max_batches=2))) == 2
