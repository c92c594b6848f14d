"""Shared helpers for the fast decode paths' tests: rows prefilled into the paged cache through the
model, and the check that one token at a time after a prefill equals the full forward."""

from __future__ import annotations

import torch

from dsv3 import Transformer
from dsv3.infer.decode.step import FastDecoder
from dsv3.infer.paged_cache import PagedLatentCache, make_context


def prefill_rows(
    model: Transformer, cache: PagedLatentCache, ids: torch.Tensor, lens: list[int], tables: list[list[int]]
) -> None:
    """Row b's first lens[b] tokens of ids [B, T] through the model (naive attention) into the
    cache blocks tables[b], one row at a time: the state the engine leaves after prefilling them."""
    with torch.no_grad():
        for b, n in enumerate(lens):
            pos = torch.arange(n)[None]
            cache.bind(make_context([tables[b]], pos, [n], cache.block_size))
            model.hidden_states(ids[b : b + 1, :n], pos, cache, absorb=False)


def assert_decode_matches_forward(
    model: Transformer, cache: PagedLatentCache, fast: FastDecoder, ids: torch.Tensor, tol: float = 1e-5
) -> None:
    """Prefill ids[:, :5] through the model (naive attention) into a fresh 8-block table, then decode
    positions 5..8 one token at a time through `fast`: each step's logits within `tol` of the full
    forward's (ids: [1, T >= 9])."""
    table = cache.allocator.allocate(8)
    with torch.no_grad():
        full = model(ids)
        pos = torch.arange(5)[None]
        cache.bind(make_context([table], pos, [5], 4))
        model.hidden_states(ids[:, :5], pos, cache, absorb=False)
    for p in range(5, 9):
        logits = fast.logits(fast.forward([[int(ids[0, p])]], [p], [table]))
        assert (logits[0] - full[0, p]).abs().max() <= tol
