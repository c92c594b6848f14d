"""Multi-head latent attention (MLA, §2.1.1), with its two equivalent computations side by side.

Queries: c_q = RMSNorm(W_DQ h) (q_lora_rank wide), q = W_UQ c_q, per head [q_nope | q_pe].
Keys/values: W_DKV h = [c_kv | k_pe]; c_kv = RMSNorm(c_kv); W_UKV c_kv = per head [k_nope | v].
k_pe is one rotary key shared by all heads, so a token's whole KV cache is [c_kv | k_pe]
(kv_lora_rank + qk_rope_head_dim values per layer, 576 for V3).

- naive path (training, prefill): materialise per-head K and V from the latents and run SDPA.
- absorbed path (decoding on the latent cache): fold W_UK into the query and W_UV into the output,
  attend directly over the cached latents; no per-head K/V is ever formed.

Shapes: B batch, T query tokens, S key tokens, H heads, D model dim, R kv_lora_rank,
P qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import RMSNorm
from dsv3.model.rope import apply_rope, softmax_scale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps in the official code


class LatentKVCache(Protocol):
    """What attention needs from a KV cache (contiguous in dsv3.model.cache, paged in dsv3.infer)."""

    def update(
        self, layer_id: int, kv: torch.Tensor, pe: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store kv [B, T, R] and the rotated pe [B, T, P] at `positions` [B, T]; return every cached
        latent of the batch's sequences as (kv [B, S, R], pe [B, S, P], key_positions [B, S]),
        key_positions being -1 for empty slots."""
        ...


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: LatentKVCache | None = None,
        absorb: bool = False,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. Without a cache, attention is causal over the T tokens."""
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, -1)  # (B, T, H, N+P)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)

        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_a_layernorm(kv)  # (B, T, R)
        k_pe = apply_rope(k_pe, cos, sin)  # (B, T, P)

        mask = None  # None: plain causal over these T tokens
        if cache is not None:
            kv, k_pe, key_pos = cache.update(self.layer_id, kv, k_pe, positions)  # (B, S, R), (B, S, P)
            mask = (key_pos[:, None, :] <= positions[:, :, None]) & (key_pos[:, None, :] >= 0)  # (B, T, S)
        if absorb:
            o = self._absorbed(q_nope, q_pe, kv, k_pe, mask)
        else:
            o = self._naive(q_nope, q_pe, kv, k_pe, mask)
        return self.o_proj(o.flatten(2))  # (B, T, H*V) -> (B, T, D)

    def kv_b_weight(self) -> torch.Tensor:
        """W_UKV as [H, N+V, R] (a quantised projection may override `weight` with a dequantised view)."""
        return self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)

    def _naive(self, q_nope, q_pe, kv, k_pe, mask) -> torch.Tensor:
        B, S, _ = kv.shape
        kv_heads = self.kv_b_proj(kv).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv_heads.split([self.nope_dim, self.v_dim], dim=-1)  # (B, S, H, N), (B, S, H, V)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (B, H, T, N+P)
            k.transpose(1, 2),  # (B, H, S, N+P)
            v.transpose(1, 2),  # (B, H, S, V)
            attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None,
            scale=self.softmax_scale,
        )
        return o.transpose(1, 2)  # (B, T, H, V)

    def _absorbed(self, q_nope, q_pe, kv, k_pe, mask) -> torch.Tensor:
        T, S = q_nope.shape[1], kv.shape[1]
        w = self.kv_b_weight()
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (H, N, R), (H, V, R)
        q_latent = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)  # W_UK folded into the query
        scores = torch.einsum("bthr,bsr->bhts", q_latent, kv) + torch.einsum("bthp,bsp->bhts", q_pe, k_pe)
        scores = scores.float() * self.softmax_scale
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=kv.device).tril(S - T)[None]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype)
        o_latent = torch.einsum("bhts,bsr->bthr", probs, kv)
        return torch.einsum("bthr,hvr->bthv", o_latent, w_uv)  # W_UV folded into the output
