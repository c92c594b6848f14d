"""MTP module 1 on the fast path, for drafting (DESIGN §2.2, §8): `mtp_forward` runs the module
(eh_proj with enorm / hnorm folded into its halves, then its block over the MTP layer's cache) on the
positions whose output a draft reads; `mtp_latents` writes the cache rows alone for the others; and
`mtp_logits` the draft head, over a bounded draft vocabulary where asked. A part of
`dsv3.infer.decode.step.FastDecoder` (its weights, kernels, cache pools and pieces), kept apart.

Shapes: B rows, T new tokens per row, D dim, R kv_lora_rank, P qk_rope_head_dim, Vo vocabulary.
"""

from __future__ import annotations

import torch

from dsv3.infer.decode import moe as decode_moe


class MtpDraft:
    """FastDecoder's MTP methods (a mixin: it reads the decoder's `weights`, `model`, `cache`,
    `mtp_data` / `mtp_pools`, `R`, `P` and its private pieces)."""

    def can_draft(self) -> bool:
        """True when `mtp_forward` can run: MTP module 1 is supported and the cache holds its layer."""
        return self.weights.mtp is not None and self.mtp_data.shape[0] > 0

    @torch.no_grad()
    def mtp_forward(
        self, h_prev: torch.Tensor, tokens: list[list[int]], starts: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        """MTP module 1 (for drafting): the main model's final hidden states h_prev [B*T, D] and the
        tokens one ahead [B, T] at positions starts[b] + 0..T-1 -> h^1 [B*T, D] (before
        shared_head.norm). Writes the MTP layer's cache rows and sets its MoE's `last_counts`."""
        self._fresh()
        if not self.can_draft():
            raise RuntimeError("the fast path has no MTP module here (see DecodeWeights.mtp)")
        m = self.weights.mtp
        row = self._row_decoders()[1] if len(tokens) == 1 else None
        if row is not None:
            e, positions = self._embed(tokens[0]), [starts[0] + t for t in range(len(tokens[0]))]
        else:
            keys, e, positions = self._inputs(self.mtp_data, self.mtp_pools, tokens, starts, tables)
        cos, sin = self._rope_rows(positions)
        x = self._mtp_input(h_prev, e)
        if row is not None:
            x, counts = row.forward(x, cos, sin, tables[0], self.cache.block_size, starts[0])
        else:
            routed: list = []
            mtp_row = self._streamed(1)
            x = self._attention(x, m.attn, 0, [(x.shape[0], keys, False)], cos, sin, mtp_row)
            x = self._ffn(x, m.ffn, routed, mtp_row, 0)
            counts = decode_moe.counts(routed, self.n_experts) if routed else []
            keys.finish()
        if m.ffn.moe is not None:
            m.ffn.moe.record(counts[0])
        return x

    @torch.no_grad()
    def mtp_latents(
        self,
        h_prev: torch.Tensor,
        tokens: list[list[int]],
        starts: list[int],
        tables: list[list[int]],
        upto: list[int] | None = None,
    ) -> None:
        """MTP module 1's cache rows alone, at positions starts[b] + t for t < upto[b] (every t < T
        without upto): h_prev [B*T, D], the tokens one ahead [B, T]. The module is one block, so a
        position's cache row (its kv_a_layernorm(c_kv) | rope(k_pe)) depends on that position's input
        alone: positions whose output nobody reads (a prompt's, the accepted drafts' before the last)
        skip the block's query, attention and feed-forward. One GEMM over the latent columns of w_in."""
        self._fresh()
        m, T, R, P, bs = self.weights.mtp, len(tokens[0]), self.R, self.P, self.cache.block_size
        at = [(b, t) for b in range(len(tokens)) for t in range(T if upto is None else upto[b])]
        if not at:
            return
        flat = torch.tensor([b * T + t for b, t in at])
        e = self.model.embed_tokens.weight[torch.tensor([tokens[b][t] for b, t in at])]
        x, w = self._mtp_input(h_prev[flat], e), m.attn
        xn = x * self._inv_rms(x, w.norm_eps)
        a = self._mm(xn if w.norm_w is None else xn * w.norm_w, w.w_in[:, w.q_rank : w.q_rank + R + 2 * P])
        positions = [starts[b] + t for b, t in at]
        cos, sin = self._rope_rows(positions)
        rows = a.new_empty(len(at), R + P)
        self._latent_rows(a, w, cos, sin, rows)
        slots = torch.tensor([tables[b][p // bs] * bs + p % bs for (b, _), p in zip(at, positions)])
        pool = self.mtp_pools[0]
        pool.index_copy_(0, slots, rows.to(pool.dtype))

    def _mtp_input(self, h_prev: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """eh_proj([enorm(e); hnorm(h_prev)]) with the norms' weights folded into its halves: [N, D]."""
        m = self.weights.mtp
        x = self._mm(h_prev * self._inv_rms(h_prev, m.h_eps), m.w_hid)
        return self._mm(e * self._inv_rms(e, m.e_eps), m.w_emb, x)

    def mtp_logits(self, x: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        """MTP module 1's output [N, D] -> draft logits [N, Vo] (shared_head.norm, then the head);
        with `vocab`, only the first `vocab` columns of the head are read and the rest are -inf."""
        return self._head(x, self.model.mtp[0].shared_head.norm, vocab)
