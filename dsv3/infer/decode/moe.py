"""Decode-time experts of the fast decode path on a few tokens (DESIGN §3.4).

Routing is the model's own (`dsv3.model.moe.route`, through `Gate.route_logits`); only the
execution of the experts differs:
- ONE token (batch-1 decoding without the native RowDecoder): only the K selected experts run,
  each as two matmuls on views of its weights: no copy of expert weights, no per-group GEMM over
  all E experts;
- a FEW tokens (speculative verification at batch 1, up to `FEW_ROWS`): each selected expert once
  for the tokens that chose it (CPU grouped_mm over all E groups costs far more than these few
  small matmuls);
- more tokens: the rows sorted by expert, one grouped GEMM for w1 | w3 and one for w2 (each row's
  gate value applied before w2, the sum over experts done by index_add_).
With the native kernels (dsv3.infer.decode.kernels) the decoder runs the selected experts of a few
tokens in one `experts_` call instead. Expert weights come from dsv3.infer.decode.weights (w1 | w3
concatenated, the post-attention norm's weight folded in unless stored in BF16); the input xn is
x / rms(x) (times the norm weight when not folded).

Shapes: B tokens, D dim, E routed experts, K experts per token, G groups, I expert hidden size,
M = B * K routed copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.infer.decode.weights import FfnWeights

FEW_ROWS = 8  # up to this many tokens, run only the selected experts, one by one


def experts_one(x: torch.Tensor, xn: torch.Tensor, w: FfnWeights, ids: list[int], gates: list[float]) -> None:
    """x [1, D] += sum_k gate_k * expert_{ids_k}(xn), in place: two matmuls per selected expert."""
    for e, g in zip(ids, gates):
        _expert_row(x, xn, w, e, g)


def _expert_row(x: torch.Tensor, xn: torch.Tensor, w: FfnWeights, e: int, g: float) -> None:
    """x [1, D] += g * expert_e(xn [1, D]), in place: two matmuls on views of the expert's weights."""
    hid, dtype = w.w2[e].shape[0], xn.dtype  # .to: weights may be stored in BF16 (fused.py)
    t = xn @ w.w13[e].to(dtype)  # (1, 2I) w1 | w3
    x.addmm_(F.silu(t[:, :hid]) * t[:, hid:], w.w2[e].to(dtype), alpha=g)


def experts_few(
    x: torch.Tensor, xn: torch.Tensor, w: FfnWeights, routes: list[tuple[list[int], list[float]]]
) -> None:
    """x [B, D] += the routed experts of xn [B, D] for a few tokens routed in Python, in place: each
    selected expert's weights are read once, for all the tokens that chose it (two matmuls)."""
    hid = w.w2[0].shape[0]
    by_expert: dict[int, tuple[list[int], list[float]]] = {}
    for row, (ids, gates) in enumerate(routes):
        for e, g in zip(ids, gates):
            rows, gs = by_expert.setdefault(e, ([], []))
            rows.append(row)
            gs.append(g)
    for e, (rows, gs) in by_expert.items():
        if len(rows) == 1:
            r = rows[0]
            _expert_row(x[r : r + 1], xn[r : r + 1], w, e, gs[0])
        else:
            idx = torch.tensor(rows)
            t = xn[idx] @ w.w13[e].to(xn.dtype)  # (n, 2I)
            h = F.silu(t[:, :hid]) * t[:, hid:] * torch.tensor(gs, dtype=x.dtype)[:, None]
            x.index_add_(0, idx, h @ w.w2[e].to(xn.dtype))


def experts(
    x: torch.Tensor, xn: torch.Tensor, w: FfnWeights, weights: torch.Tensor, idx: torch.Tensor, gemm
) -> None:
    """x [B, D] += the routed experts of xn [B, D], in place: the routed copies sorted by expert, one
    grouped GEMM for w1 | w3 and one for w2 through `gemm` (dsv3.infer.decode.gemm: its dtype, its
    kept or packed weights), each copy's gate value applied before w2, the sum over experts by index_add_."""
    K, E, hid = idx.shape[1], len(w.w13), w.w2[0].shape[0]
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    starts = [0, *torch.bincount(flat, minlength=E).cumsum(0).tolist()]
    token = order // K  # (M,) the token of each routed copy, grouped by expert
    t = gemm.grouped(xn[token], w.w13_all, starts)  # (M, 2I)
    h = F.silu(t[:, :hid]) * t[:, hid:] * weights.flatten()[order, None].to(x.dtype)
    x.index_add_(0, token, gemm.grouped(h, w.w2_all, starts))


def counts(routed: list, n_experts: int) -> torch.Tensor:
    """Expert ids of each MoE layer (lists of ids, K per token, or [B, K] tensors) -> tokens per
    expert [L, E], what `MoE.last_counts` holds after a forward."""
    if isinstance(routed[0], list):  # a few ids per layer: counting in Python beats four operators
        rows = [[0] * n_experts for _ in routed]
        for row, ids in zip(rows, routed):
            for e in ids:
                row[e] += 1
        return torch.tensor(rows)
    ids = torch.stack(routed).flatten(1)  # (L, B*K)
    L = ids.shape[0]
    flat = (ids + torch.arange(L)[:, None] * n_experts).flatten()
    return torch.bincount(flat, minlength=L * n_experts).view(L, n_experts)
