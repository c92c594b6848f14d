"""DeepSeekMoE with auxiliary-loss-free load balancing (§2.1.2; Wang et al. 2024).

Gate (the exact V3 semantics):
  1. s = sigmoid(x W_g^T) in FP32 (softmax for the V2 option);
  2. selection scores s' = s + b, with b a per-expert FP32 bias (a buffer: no gradient). The bias
     decides WHICH experts a token visits, never how much their outputs weigh;
  3. group-limited routing: a group's score is the sum of its top-2 s'; keep the best
     `n_limited_groups` groups and mask the others with -inf;
  4. top-k of the masked s'; gate values are s (without bias) at those experts, normalised to sum
     to 1 (sigmoid case), times route_scale.
Routed experts run as one grouped GEMM per projection over the tokens sorted by expert; the shared
experts see every token. No token is ever dropped.

Balancing: after each step `update_bias` moves b_i by gamma * sign(mean(c) - c_i) from the expert
counts c of that step (all data-parallel ranks); the complementary sequence-wise balance loss
L = sum_i f_i P_i is computed here during training and weighted by alpha in the model's loss.

Shapes: B batch, T tokens per sequence, N = B*T tokens, D dim, E routed experts, K activated,
G groups, I expert hidden size, M = N*K routed token copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import MLP


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.n_activated_experts
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.route_scale = cfg.score_func, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
        )

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # The bias moves in steps of gamma = 1e-3: casting it to BF16 with the model would erase them.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved.dtype != torch.float32:
            keep = torch.empty_like(moved, dtype=torch.float32) if bias.is_meta else bias
            self.e_score_correction_bias = keep.to(device=moved.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> gate values [N, K] (FP32), expert ids [N, K], affinities s [N, E] (FP32)."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias  # s': selection only
        if self.n_groups > 1:
            grouped = choice.view(x.shape[0], self.n_groups, -1)  # (N, G, E/G)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, indices)  # gate values come from s, not s + b
        if self.score_func == "sigmoid":
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    # grouped_mm needs 16-byte aligned rows (forward and backward); GPUs need BF16 on recent archs.
    aligned = all((s * x.element_size()) % 16 == 0 for s in w.shape[1:])
    return aligned and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, in] sorted by expert, w [E, in, out], offsets [E] int32 cumulative ends -> [M, out]."""
    if _grouped_mm_ok(x, w):
        return F.grouped_mm(x, w, offs=offsets)
    # Fallback for shapes/devices grouped_mm does not take: one matmul per expert.
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]]).tolist()
    return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, offsets.tolist()))])


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored fused, [E, in, out] per projection, computed by grouped GEMMs."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # gate_proj
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # up_proj
        self.w2 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # down_proj

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] with rows grouped by expert, counts [E] rows per expert -> [M, D]."""
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.silu(grouped_linear(x, self.w1, offsets)) * grouped_linear(x, self.w3, offsets)
        return grouped_linear(h, self.w2, offsets)


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [N, K] -> order [M] (flat token-slot ids sorted by expert, stable), counts [E]."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, counts


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """Sequence-wise balance loss sum_i f_i P_i, averaged over sequences (§2.1.2, Eq. 17-20).

    scores [N, E] affinities s (no bias), indices [N, K]; N = batch * T.
    f_i = E / (K T) * #{t : i in topK(t)}, P_i = mean_t s_it / sum_j s_jt.
    """
    E = scores.shape[1]
    T = scores.shape[0] // batch
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, T, E).mean(dim=1)  # (B, E)
    hits = torch.zeros(batch, E, device=scores.device, dtype=scores.dtype)
    hits.scatter_add_(
        1, indices.view(batch, T * top_k), torch.ones_like(indices, dtype=scores.dtype).view(batch, -1)
    )
    f = hits * (E / (top_k * T))
    return (f * probs).sum(dim=-1).mean()


class MoE(nn.Module):
    """Shared experts + routed experts. After each forward, `last_counts` [E] holds the tokens
    routed to each expert and, in training, `balance_loss` the sequence-wise balance loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.n_activated_experts
        self.gate = Gate(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = (
            MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts > 0 else None
        )
        self.register_buffer(
            "last_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False
        )
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        x_flat = x.reshape(B * T, D)
        weights, indices, scores = self.gate(x_flat)
        self.balance_loss = None
        if self.training and torch.is_grad_enabled():
            self.balance_loss = balance_loss(scores, indices, B, self.top_k)
        out = self.routed(x_flat, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)
        return out.view(B, T, D)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Single-device routed experts: x [N, D], weights/indices [N, K] -> [N, D]."""
        N, K = indices.shape
        order, counts = sort_by_expert(indices, self.n_experts)
        self.last_counts = counts.detach()
        y_sorted = self.experts(x[order // K], counts)  # (M, D), rows grouped by expert
        y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(N, K, -1)  # back to token order
        return combine(weights, y)


def combine(weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of each token's K expert outputs: weights [N, K], y [N, K, D] -> [N, D].
    Elementwise, not a batched matmul: [N,1,K] x [N,K,D] bmm is slow in BF16 on CPUs."""
    return (weights.to(y.dtype)[..., None] * y).sum(dim=1)


@torch.no_grad()
def update_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> None:
    """Auxiliary-loss-free update, in place: b_i += gamma * sign(mean(c) - c_i) (§2.1.2).

    `counts` [E] must cover the whole global batch of the step (sum over micro-batches and
    data-parallel ranks) so that every rank applies the same update."""
    c = counts.to(torch.float32)
    bias += gamma * torch.sign(c.mean() - c)
