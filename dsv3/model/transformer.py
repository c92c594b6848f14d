"""The DeepSeek-V3 model: blocks, the transformer, and the training loss (§2).

Single-device code: FP8, parallelism and serving are applied to this model from outside.
Module names follow the Hugging Face checkpoint layout (`dsv3.checkpoint` adds the `model.` prefix,
splits the fused experts and places MTP module k at layer n_layers + k - 1).

Loss (§2.2, §2.1.2): L = CE_main + lambda * mean_k CE_k(MTP) + alpha * sum_layers L_bal.
Shapes: B batch, T tokens, D dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import paper
from dsv3.config import ModelConfig
from dsv3.model.attention import MLA, LatentKVCache
from dsv3.model.init import draw_seed, initial_value
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.moe import MoE, update_bias
from dsv3.model.mtp import MTPModule
from dsv3.model.rope import Rotary

IGNORE_INDEX = -100
ABSORB_MAX_TOKENS = (
    8  # with a cache, chunks up to this many tokens (decode, spec verify) use the absorbed path
)


class Block(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(x)); the FFN is dense in the first layers."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = MLA(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: nn.Module = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def forward(self, x, cos, sin, positions, cache=None, absorb: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, absorb)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class LossOutput:
    total: torch.Tensor  # what to back-propagate
    main: torch.Tensor  # next-token cross-entropy
    mtp: torch.Tensor  # mean cross-entropy of the MTP modules (0 without MTP)
    balance: torch.Tensor  # sum over MoE layers of the sequence-wise balance loss (before alpha)
    mtp_per_depth: list[torch.Tensor]
    counts: torch.Tensor | None = None  # [L, E] tokens per expert of every MoE layer (`moe_layers()` order)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.init_seed = draw_seed()  # first, so a meta-device build draws the same (dsv3.model.init)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.n_mtp_layers))
        self.rotary = Rotary(cfg)
        self.init_weights()

    # ---- set-up -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Every weight ~ N(0, init_std) (§4.2), each from its own generator seeded by (seed, name)
        so that a slice of the model reproduces it (dsv3.model.init); norms 1; routing biases 0.
        seed: default the one drawn at construction (`init_seed`)."""
        seed = self.init_seed if seed is None else seed
        for name, p in self.named_parameters():
            if not p.is_meta:
                p.copy_(initial_value(name, tuple(p.shape), self.config.init_std, seed))
        for moe in self.moe_layers():
            if not moe.gate.e_score_correction_bias.is_meta:
                moe.gate.e_score_correction_bias.zero_()

    def reset_buffers(self) -> None:
        """Recompute derived buffers (after building on the meta device and loading weights)."""
        self.rotary.reset_buffers()

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, main model first, then the MTP blocks'."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_expert_bias(self, gamma: float, counts: list[torch.Tensor] | None = None) -> None:
        """Sign-rule bias update for every MoE layer, from `counts` (one [E] per layer, in
        `moe_layers()` order, already summed over the step) or from each layer's `last_counts`."""
        layers = self.moe_layers()
        if counts is None:
            counts = [m.last_counts for m in layers]
        if len(counts) != len(layers):
            raise ValueError(f"counts: expected {len(layers)} tensors (one per MoE layer), got {len(counts)}")
        for moe, c in zip(layers, counts):
            update_bias(moe.gate.e_score_correction_bias, c, gamma)

    # ---- forward ----------------------------------------------------------------------------------
    def _prepare(self, ids: torch.Tensor, positions: torch.Tensor | None, cache, absorb: bool | None):
        """Default positions (0..T-1), their RoPE angles, and the attention path for this chunk."""
        if positions is None:
            B, T = ids.shape
            positions = torch.arange(T, device=ids.device).expand(B, T)
        if absorb is None:
            absorb = cache is not None and ids.shape[1] <= ABSORB_MAX_TOKENS
        cos, sin = self.rotary(positions)
        return positions, cos, sin, absorb

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, D] after the final norm (h^0 of MTP).

        positions [B, T] (default 0..T-1) place tokens in RoPE and in the cache. With a cache, short
        chunks (decoding) use the absorbed attention path unless `absorb` says otherwise."""
        positions, cos, sin, absorb = self._prepare(input_ids, positions, cache, absorb)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, cache, absorb)
        return self.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] of the main model."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache, absorb))

    def mtp_hidden(
        self,
        k: int,
        h_prev: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """Run MTP module k (1-based): h^{k-1} [B, T, D] and tokens t_{i+k} [B, T] -> h^k [B, T, D]."""
        positions, cos, sin, absorb = self._prepare(next_ids, positions, cache, absorb)
        return self.mtp[k - 1](h_prev, self.embed_tokens(next_ids), cos, sin, positions, cache, absorb)

    def mtp_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """h^k [B, T, D] -> logits [B, T, V] through `shared_head.norm` and the shared head."""
        return self.lm_head(self.mtp[k - 1].shared_head.norm(h))

    # ---- loss -------------------------------------------------------------------------------------
    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        mtp_lambda: float = paper.MTP_LAMBDA_EARLY,
        balance_alpha: float = paper.BALANCE_LOSS_ALPHA,
    ) -> LossOutput:
        """Training loss. input_ids [B, T] with labels [B, T] (label i is the token after input i,
        IGNORE_INDEX where there is none), or packed sequences [B, T+1] alone.

        MTP module k at position i reads token t_{i+k} = labels[i+k-1] and is trained on
        t_{i+k+1} = labels[i+k]; the last k positions have no target and are ignored (mtp_shift)."""
        if labels is None:
            input_ids, labels = input_ids[:, :-1], input_ids[:, 1:]
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels: shape {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}")
        h = self.hidden_states(input_ids)
        main = token_cross_entropy(self.lm_head(h), labels)
        per_depth = []
        for k in range(1, len(self.mtp) + 1):
            next_ids, targets = mtp_shift(labels, k)
            h = self.mtp_hidden(k, h, next_ids)
            per_depth.append(token_cross_entropy(self.mtp_logits(k, h), targets))
        zero = main.new_zeros(())
        mtp = torch.stack(per_depth).mean() if per_depth else zero
        layers = self.moe_layers()  # each one ran once above: what it recorded is this batch's
        bal = [m.balance_loss for m in layers if m.balance_loss is not None]
        balance = torch.stack(bal).sum() if bal else zero
        total = main + mtp_lambda * mtp + balance_alpha * balance
        E = self.config.n_routed_experts
        counts = (
            torch.stack([m.last_counts for m in layers]) if layers else torch.zeros(0, E, dtype=torch.long)
        )
        return LossOutput(total, main, mtp, balance, per_depth, counts)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mtp_shift(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of MTP module k from labels [B, T] (label i = the token after input i):
    at position i it reads t_{i+k} = labels[i+k-1] and predicts t_{i+k+1} = labels[i+k]; the last k
    positions have no target (IGNORE_INDEX), and their input token is any valid id."""
    next_ids = F.pad(labels[:, k - 1 :], (0, k - 1), value=IGNORE_INDEX)
    next_ids = next_ids.masked_fill(next_ids == IGNORE_INDEX, 0)
    targets = F.pad(labels[:, k:], (0, k), value=IGNORE_INDEX)
    return next_ids, targets


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the targets that exist (0, not NaN, when there are none)."""
    targets = targets.flatten()
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
