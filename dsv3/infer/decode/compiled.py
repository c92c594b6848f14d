"""Compiled decode: a small-batch MoE swap and `torch.compile` of the model's decode forward
(`compile=True`; gpt-fast style). Plain decoding prefers the eager fast path of dsv3.infer.decode,
which measured faster (docs/inference.md); this compiled forward runs what that path does not
(speculative verification, models with swapped modules or hooks, `fast_decode=False`).

Decoding runs a few tokens per forward, so time goes to per-operator overhead, not FLOPs:
- The routed experts as a grouped GEMM over all E experts cost E small matmuls per projection even
  when a batch of one token visits K of them. `DecodeMoE` swaps in, for batches of at most
  `SMALL_ROUTED_ROWS` token-expert pairs, a gather of the K selected experts' weights and three
  batched matmuls: the same SwiGLU on the same weights, so the output is the same (held to the
  model's MoE by a test), and the same `last_counts` (the MoE's own `route` records them). It
  replaces only the MoE's `run_experts` half. Larger batches keep the grouped GEMM.
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

from dsv3.model.moe import MoE, MoECall
from dsv3.model.transformer import Transformer

SMALL_ROUTED_ROWS = 64  # token-expert pairs up to which gathering expert weights beats grouped GEMMs


@torch.compiler.disable
def _grouped_experts(moe: MoE, call: MoECall) -> None:
    MoE.run_experts(moe, call)


class DecodeMoE(MoE):
    """MoE whose routed experts gather the selected experts' weights for small batches."""

    def run_experts(self, call: MoECall) -> None:
        """Up to SMALL_ROUTED_ROWS dispatched rows: each row through its own expert's weights
        (gathered), three batched matmuls; more rows: the grouped GEMM."""
        if call.rows.shape[0] > SMALL_ROUTED_ROWS:
            _grouped_experts(self, call)
            return
        e = self.experts
        ids = call.indices.flatten()[call.order]  # (M,) the expert of each dispatched row
        xs = call.rows[:, None]  # (M, 1, D)
        h = F.silu(torch.bmm(xs, e.w1[ids])) * torch.bmm(xs, e.w3[ids])  # (M, 1, I)
        call.out = torch.bmm(h, e.w2[ids])[:, 0]  # (M, D), in the rows' order
        self.run_shared(call)


def swap_moe(model: Transformer) -> Transformer:
    """Turn every MoE of the model (main and MTP blocks) into a DecodeMoE, in place."""
    for moe in model.moe_layers():
        moe.__class__ = DecodeMoE  # same parameters and buffers, another `run_experts`
    return model


def compiled_decode(model: Transformer):
    """model.hidden_states compiled for decode-shaped calls (a few tokens per row, absorbed MLA)."""
    return torch.compile(model.hidden_states, dynamic=True)
