"""Multi-token prediction modules (§2.2).

Module k (k = 1..D) at position i combines the previous depth's representation h^{k-1}_i with the
embedding of token t_{i+k} and predicts t_{i+k+1}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])      (embedding first, as released)
    h^k  = Block_k(h')                                               (one full transformer block)
    logits = head(shared_head.norm(h^k))                             (embedding and head shared)
h^0 is the main model's final hidden state after its final norm, as vLLM and SGLang feed the
released MTP weights. At inference the modules are dropped or used as a speculative draft.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import RMSNorm


class SharedHeadNorm(nn.Module):
    """Holds `shared_head.norm`; the head itself is the main model's `lm_head`."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        from dsv3.model.transformer import Block  # a block is a block; imported here to avoid a cycle

        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, layer_id)
        self.shared_head = SharedHeadNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self,
        h_prev: torch.Tensor,
        emb_next: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache=None,
        absorb: bool = False,
    ) -> torch.Tensor:
        """h_prev [B, T, D] (h^{k-1}), emb_next [B, T, D] (Emb(t_{i+k})) -> h^k [B, T, D] (before norm)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(x, cos, sin, positions, cache, absorb)
