"""Compiled decode: a small-batch MoE swap and `torch.compile` of the model's decode forward
(`compile=True`; gpt-fast style). Plain decoding prefers the eager fast path of dsv3.infer.decode,
which measured faster (docs/inference.md); this compiled forward runs what that path does not
(speculative verification, models with swapped modules or hooks, `fast_decode=False`).

Decoding runs a few tokens per forward, so time goes to per-operator overhead, not FLOPs:
- The routed experts as a grouped GEMM over all E experts cost E small matmuls per projection even
  when a batch of one token visits K of them. `DecodeMoE` swaps in, for batches of at most
  `SMALL_ROUTED_ROWS` token-expert pairs, a gather of the K selected experts' weights and three
  batched matmuls: the same SwiGLU on the same weights, so the output is the same (held to the
  model's MoE by a test), and the same `last_counts`. Larger batches keep the grouped GEMM.
- `torch.compile` fuses the remaining elementwise work of the absorbed-attention decode forward
  into a few generated kernels (dynamic shapes: batch and context length vary every step). The
  grouped GEMM is left out of the graph (its CPU kernel has no compile support).
Both are applied from outside to the single-device model, like the FP8 module swaps; `apply`
changes the model in place.

Shapes: N tokens, K experts per token, D dim, I expert hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.moe import MoE, combine
from dsv3.model.transformer import Transformer

SMALL_ROUTED_ROWS = 64  # token-expert pairs up to which gathering expert weights beats grouped GEMMs


@torch.compiler.disable
def _grouped_routed(moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return MoE.routed(moe, x, weights, indices)


class DecodeMoE(MoE):
    """MoE whose routed experts gather the selected experts' weights for small batches."""

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        N, K = indices.shape
        if N * K > SMALL_ROUTED_ROWS:
            return _grouped_routed(self, x, weights, indices)
        e, flat = self.experts, indices.flatten()  # (N*K,)
        self.last_counts = torch.bincount(flat, minlength=self.n_experts)  # as MoE.routed sets it
        xs = x.repeat_interleave(K, dim=0)[:, None]  # (N*K, 1, D), token n's copy for each of its experts
        h = F.silu(torch.bmm(xs, e.w1[flat])) * torch.bmm(xs, e.w3[flat])  # (N*K, 1, I)
        y = torch.bmm(h, e.w2[flat]).view(N, K, -1)  # (N, K, D)
        return combine(weights, y)


def swap_moe(model: Transformer) -> Transformer:
    """Turn every MoE of the model (main and MTP blocks) into a DecodeMoE, in place."""
    for moe in model.moe_layers():
        moe.__class__ = DecodeMoE  # same parameters and buffers, another `routed`
    return model


def compiled_decode(model: Transformer):
    """model.hidden_states compiled for decode-shaped calls (a few tokens per row, absorbed MLA)."""
    return torch.compile(model.hidden_states, dynamic=True)
