"""Runs the model on rows of sequences over the paged latent cache.

The model is used as written (dsv3.model): the runner only builds the `CacheContext` of a forward
(block tables, positions, context lengths) and picks the MLA path: the naive path for prefill
chunks (per-head K/V materialised once for the chunk, efficient for many queries) and the absorbed
path for decode and speculative verification (a few queries attend straight over the latents).
Plain decoding (one new token per row), speculative verification and short MTP drafting forwards
run on the eager fast path (dsv3.infer.decode) when it can: not when a module was swapped (FP8
weights, EPLB replicas) or forward hooks are set, and not with `fast=False`; then the model's
forward runs, compiled with `compile=True`. Logits are computed
only for the positions that are sampled: the output head over a long prefill chunk would cost as
much as a layer.

Shapes: B rows, T tokens per row, D model dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from dsv3.infer.decode.limits import MTP_BLOCK_POSITIONS
from dsv3.infer.decode.step import FastDecoder
from dsv3.infer.decode.weights import supported
from dsv3.infer.paged_cache import PagedLatentCache, make_context
from dsv3.infer.scheduler import Sequence
from dsv3.model.transformer import Transformer


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cache: PagedLatentCache,
        compile: bool = False,
        fast: bool = True,
        draft_vocab: int | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.draft_vocab = draft_vocab  # MTP drafts among ids < draft_vocab only (None: all)
        self.device = next(model.parameters()).device
        self.decode_forward = model.hidden_states
        self.fast: FastDecoder | None = None  # the eager fast decode path, when it knows the model
        if fast and supported(model) is None:
            self.fast = FastDecoder(model, cache, weight_dtype=weight_dtype)
        if compile:  # the model's decode forward compiled (dsv3.infer.decode.compiled); prefill stays eager
            from dsv3.infer.decode.compiled import compiled_decode, swap_moe

            self.decode_forward = compiled_decode(swap_moe(model))

    def _bind(
        self, seqs: Seq[Sequence], positions: torch.Tensor, context_lens: list[int]
    ) -> PagedLatentCache:
        ctx = make_context([s.block_table for s in seqs], positions, context_lens, self.cache.block_size)
        return self.cache.bind(ctx)

    def tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def hidden(
        self, seqs: Seq[Sequence], tokens: list[list[int]], start: list[int], absorb: bool
    ) -> torch.Tensor:
        """Main model on tokens [B, T] placed at positions start[b] + 0..T-1 -> final hidden [B, T, D]."""
        ids = self.tensor(tokens)
        positions = self.tensor(start)[:, None] + torch.arange(ids.shape[1], device=self.device)
        lens = [s + ids.shape[1] for s in start]
        forward = self.decode_forward if absorb else self.model.hidden_states
        return forward(ids, positions, self._bind(seqs, positions, lens), absorb)

    @torch.no_grad()
    def prefill_hidden(self, seqs: Seq[Sequence], tokens: list[list[int]], start: list[int]) -> torch.Tensor:
        """A prefill chunk, tokens [B, C] at start[b] + 0..C-1 -> final hidden [B, C, D]: on the fast
        path where it pays (`FastDecoder.prefill_pays`), else the model's naive-MLA forward."""
        fast = self._fast()
        B, C = len(tokens), len(tokens[0])
        if fast is not None and fast.prefill_pays(B, C, max(start) + C):
            return fast.prefill(tokens, start, [s.block_table for s in seqs])
        return self.hidden(seqs, tokens, start, absorb=False)

    @torch.no_grad()
    def mixed(
        self, decodes: Seq[Sequence], chunks: list[tuple[Seq[Sequence], list[list[int]], list[int]]]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]] | None:
        """Plain decodes (each sequence's next token; may be none) and prefill chunks, each
        (seqs, tokens [G, C], start: tokens at start[g] + 0..C-1), in ONE forward on the fast path
        (`FastDecoder.mixed`: the weights read once for all) where every chunk runs there anyway
        (`FastDecoder.prefill_pays`) -> (decode logits [B, V] or None, each chunk's final hidden
        [G, C, D]); None elsewhere (`decode_logits` and `prefill_hidden` apart)."""
        fast = self._fast()
        if fast is None or not all(
            fast.prefill_pays(len(t), len(t[0]), max(s) + len(t[0])) for _, t, s in chunks
        ):
            return None
        d = None
        if decodes:
            d = (
                [[s.tokens[-1]] for s in decodes],
                [s.num_computed for s in decodes],
                [s.block_table for s in decodes],
            )
        x, hidden = fast.mixed(d, [(t, s, [q.block_table for q in seqs]) for seqs, t, s in chunks])
        return (None if x is None else fast.logits(x)), hidden

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., D] -> logits [..., V]: through the fast path's copy of the head
        when it runs (BF16-stored for BF16 weights: half the bytes; the prompt's last token of
        every prefill), else the model's."""
        fast = self._fast()
        if fast is not None:
            return fast.head_logits(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)
        return self.model.lm_head(h)

    def _fast(self) -> FastDecoder | None:
        """The fast path when it can run: not while a module is swapped or forward hooks are set."""
        return self.fast if self.fast is not None and self.fast.usable() else None

    @torch.no_grad()
    def decode_logits(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """Logits [B, V] of each sequence's next token after its last one (plain decoding)."""
        tokens, start = [[s.tokens[-1]] for s in seqs], [s.num_computed for s in seqs]
        fast = self._fast()
        if fast is not None:
            return fast.logits(fast.forward(tokens, start, [s.block_table for s in seqs]))
        return self.logits(self.hidden(seqs, tokens, start, True)[:, -1])

    @torch.no_grad()
    def verify(
        self, seqs: Seq[Sequence], tokens: list[list[int]], start: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative verification: tokens [B, T] at start[b] + 0..T-1 -> final hidden states
        [B, T, D] (for MTP drafting) and logits [B, T, V]."""
        fast = self._fast()
        if fast is None:
            h = self.hidden(seqs, tokens, start, True)
            return h, self.logits(h)
        B, T = len(tokens), len(tokens[0])
        x = fast.forward(tokens, start, [s.block_table for s in seqs])  # (B*T, D)
        return fast.hidden(x).view(B, T, -1), fast.logits(x).view(B, T, -1)

    @torch.no_grad()
    def mtp_hidden(
        self,
        seqs: Seq[Sequence],
        h_prev: torch.Tensor,
        tokens: list[list[int]],
        start: list[int],
        take: list[int] | None,
        absorb: bool = True,
    ) -> torch.Tensor | None:
        """MTP module 1 over positions start[b] + 0..T-1 (h_prev [B, T, D], the tokens one ahead
        [B, T]), writing its cache rows -> h^1 [B, D] at position start[b] + take[b] of each row
        (before its output norm), or None without take (a prompt chunk that drafts nothing). On the
        fast path nothing runs past take[b] (provisional positions: the next step rewrites them); up
        to MTP_BLOCK_POSITIONS positions the module's block runs on all those before, more (a prompt)
        write their cache rows alone (`FastDecoder.mtp_latents`) and the block runs on the taken one.
        absorb: the model's path, decode-sized."""
        fast = self._fast()
        B, T, D = h_prev.shape
        if fast is not None and fast.can_draft():
            tables, flat = [s.block_table for s in seqs], h_prev.reshape(B * T, D)
            if take is not None and T <= MTP_BLOCK_POSITIONS:  # the block on positions 0..max(take)
                n = max(take) + 1
                x = fast.mtp_forward(h_prev[:, :n].reshape(B * n, D), [t[:n] for t in tokens], start, tables)
                return x.view(B, n, D)[torch.arange(B), torch.tensor(take)]
            fast.mtp_latents(flat, tokens, start, tables, take)
            if take is None:
                return None
            rows = torch.tensor([b * T + t for b, t in enumerate(take)])
            picked = [[tokens[b][t]] for b, t in enumerate(take)]
            return fast.mtp_forward(flat[rows], picked, [s + t for s, t in zip(start, take)], tables)
        ids = self.tensor(tokens)
        positions = self.tensor(start)[:, None] + torch.arange(ids.shape[1], device=self.device)
        lens = [s + ids.shape[1] for s in start]
        h = self.model.mtp_hidden(1, h_prev, ids, positions, self._bind(seqs, positions, lens), absorb)
        return None if take is None else h[torch.arange(B), self.tensor(take)]

    @torch.no_grad()
    def mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft logits [B, V] from MTP module 1's output h [B, D]; ids >= draft_vocab get -inf
        (the fast path does not compute them: it reads only draft_vocab columns of the head)."""
        fast = self._fast()
        if fast is not None and fast.can_draft():
            return fast.mtp_logits(h, self.draft_vocab)
        logits = self.model.mtp_logits(1, h)
        if self.draft_vocab is not None and self.draft_vocab < logits.shape[-1]:
            logits[..., self.draft_vocab :] = float("-inf")
        return logits
