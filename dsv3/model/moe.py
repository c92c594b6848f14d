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
Both come out of `MoE.route` as data in the call's state (`MoECall.counts`, `.balance`); the
model's loss collects every layer's into `LossOutput` (counts [L, E]), which the trainer sums.

The layer runs as four halves, route -> dispatch -> experts -> combine (`MoE`), so that expert
parallelism (dsv3.parallel.expert.moe), the EPLB replica router and the decode paths replace
only the half they change, and a pipeline schedule can run another micro-batch's computation
between a dispatch and its experts (dsv3.parallel.pipeline.phases).

Shapes: B batch, T tokens per sequence, N = B*T tokens, D dim, E routed experts, K activated,
G groups, I expert hidden size, M = N*K routed token copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
        return self.route_logits(F.linear(x.float(), self.weight.float()))

    def route_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate from its logits [N, E] (FP32): see `route`."""
        return route(
            logits,
            self.e_score_correction_bias,
            score_func=self.score_func,
            top_k=self.top_k,
            n_groups=self.n_groups,
            topk_groups=self.topk_groups,
            route_scale=self.route_scale,
        )


def _best(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row, best first; on a tie the lower index wins
    (torch.topk leaves ties in any order, and the native decode kernel must agree exactly)."""
    return x.sort(dim=-1, descending=True, stable=True).indices[..., :k].contiguous()


def route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    *,
    score_func: str,
    top_k: int,
    n_groups: int = 1,
    topk_groups: int = 1,
    route_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router on gate logits [N, E] (FP32): gate values [N, K], expert ids [N, K] (best
    first), affinities s [N, E]. The one implementation: the model's gate, the decode fast path and
    (mirrored in C++, tested against this) the native decode kernel.

    s = sigmoid (V3) or softmax of the logits; s' = s + bias chooses the experts but never weighs
    them (§2.1.2); with groups, a group's score is the sum of its two best s' and only the
    `topk_groups` best groups are eligible (node-limited routing's single-device form); the gate
    values are s of the chosen experts, normalised over them for sigmoid, times `route_scale`."""
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores.detach() + bias  # s': selection only
    if n_groups > 1:
        grouped = choice.view(logits.shape[0], n_groups, logits.shape[1] // n_groups)  # (N, G, E/G)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G): values only, ties harmless
        keep = _best(group_scores, topk_groups)
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
    indices = _best(choice, top_k)  # (N, K)
    weights = scores.gather(1, indices)  # gate values come from s, not s + b
    if score_func == "sigmoid":
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * route_scale, indices, scores


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


def pad_rows(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, D] grouped by expert, counts [E] -> (x padded with zero rows, its counts, the real rows'
    places in it, or None where nothing is padded).

    Only for BF16 / FP16 on CPUs: oneDNN, which runs those GEMMs, compiles a kernel for each new
    shape (~2.7 ms on a 2-core Xeon with AMX, 1,024 cached), and in training every step routes a
    new number of tokens to each expert, so its three GEMMs and their two gradients were compiled
    anew every step (the `small` preset's BF16 forward + backward took 2.3 s instead of 1.0). Each
    expert's rows are rounded up to one of 16 sizes per power of two (exact below 32), at most 6%
    more rows: a few hundred shapes in all. Zero rows change no real row nor any weight gradient."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return x, counts, None
    m = counts.to(torch.int64)
    padded = bucketed(m)
    shift = (padded.cumsum(0) - padded) - (m.cumsum(0) - m)  # each expert's start moves by this
    rows = torch.arange(x.shape[0]) + shift.repeat_interleave(m, output_size=x.shape[0])
    return x.new_zeros(int(padded.sum()), x.shape[1]).index_copy(0, rows, x), padded, rows


def bucket(m: int) -> int:
    """A row count rounded up to one of 16 sizes per power of two (exact below 32)."""
    step = 1 << max(m.bit_length() - 5, 0)
    return -(-m // step) * step


def bucketed(m: torch.Tensor) -> torch.Tensor:
    """`bucket` of every count of m (int64)."""
    return torch.tensor([bucket(c) for c in m.tolist()], dtype=torch.int64)


def unpad_rows(y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The real rows of a `pad_rows` output."""
    return y if rows is None else y.index_select(0, rows)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored fused, [E, in, out] per projection, computed by grouped GEMMs."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # gate_proj
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # up_proj
        self.w2 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # down_proj

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] with rows grouped by expert, counts [E] rows per expert -> [M, D]."""
        x, counts, rows = pad_rows(x, counts)
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.silu(grouped_linear(x, self.w1, offsets)) * grouped_linear(x, self.w3, offsets)
        return unpad_rows(grouped_linear(h, self.w2, offsets), rows)


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


@dataclass
class MoECall:
    """The state of one MoE call, passed through its halves: route -> dispatch -> experts -> combine.

    `route` fills the routing fields (and the two results the trainer needs, as data: `counts` for
    the bias update and `balance` for the loss); `dispatch` the rows grouped by expert that the
    grouped GEMM reads; `run_experts` their outputs and the shared experts'; `combine` turns them
    into the layer's output. A pipeline phase boundary may cut the autograd graph between halves:
    `tensors()` / `map_tensors()` walk every tensor of the state (not `balance`, a loss term) in a
    fixed order, the dispatch plan's included.

    The asynchronous seam (`MoE.start_dispatch` / `start_combine`, used by the pipeline's phases):
    an expert-parallel MoE may start its dispatch all-to-all and leave in `pending` the function
    that finishes it; `run_experts` then calls `wait_dispatch()` first, which calls it on the call
    it is given (a phase boundary may have copied the call, cutting its tensors: the wait must use
    the copy's), so that the other chunk's computation runs between the two halves. Likewise
    `start_combine` may leave the combine all-to-all in flight and `finish_combine` wait for it.
    """

    shape: torch.Size  # the input's [B, T, D]
    x: torch.Tensor  # [N, D] tokens
    weights: torch.Tensor  # [N, K] gate values (FP32)
    indices: torch.Tensor  # [N, K] expert ids
    scores: torch.Tensor  # [N, E] affinities s (FP32)
    counts: torch.Tensor  # [E] tokens routed to each expert (long, detached): the bias update's input
    balance: torch.Tensor | None  # the sequence-wise balance loss (training with gradients), else None
    rows: torch.Tensor | None = None  # [S, D] dispatched rows, grouped by (local) expert
    row_counts: torch.Tensor | None = None  # [E or El] rows per expert of `rows`
    order: torch.Tensor | None = None  # [M] token-copy ids sorted by expert (the source's sort)
    plan: dict[str, Any] = field(default_factory=dict)  # a subclass's dispatch plan (split sizes, ...)
    pending: Callable[[MoECall], None] | None = None  # completes an asynchronous dispatch (see above)
    out: torch.Tensor | None = None  # [S, D] expert outputs, in the order of `rows`
    shared: torch.Tensor | None = None  # [N, D] the shared experts' output

    _STATE = ("x", "weights", "indices", "scores", "counts", "rows", "row_counts", "order", "out", "shared")

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state, in a fixed order (fields, then the plan's tensors)."""
        out = [getattr(self, f) for f in self._STATE if getattr(self, f) is not None]
        return out + [v for v in self.plan.values() if isinstance(v, torch.Tensor)]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> MoECall:
        """A copy with `fn` applied to every tensor of `tensors()` (in the same order)."""
        fields = {f: fn(getattr(self, f)) for f in self._STATE if getattr(self, f) is not None}
        plan = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.plan.items()}
        return dataclasses.replace(self, plan=plan, **fields)

    def wait_dispatch(self) -> None:
        if self.pending is not None:
            done, self.pending = self.pending, None
            done(self)


class MoE(nn.Module):
    """Shared experts + routed experts, as four halves over a `MoECall` (`forward` runs them in turn):

        route        gate, per-expert counts, balance loss (training)
        dispatch     the token copies sorted by expert (expert parallelism: the all-to-all out)
        run_experts  grouped GEMM over the dispatched rows, and the shared experts
        combine      rows back to token order, weighted by the gate values, summed, + shared
                     (expert parallelism: the all-to-all back)

    Expert parallelism overrides dispatch and combine, the EPLB replica router dispatch and its
    experts, the compiled decode path run_experts. (`run_experts`, not `experts`: that name is the
    fused experts' submodule, whose parameter names the checkpoints use.)

    What a call leaves on the module, for readers outside the forward (the loss's balance term,
    EPLB load statistics, the pipeline runtime): `last_counts` [E] and `balance_loss`, written
    only by `record` (called by `route`, and by the fast decode path, which routes on its own)."""

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
        call = self.route(x)
        self.dispatch(call)
        self.run_experts(call)
        return self.combine(call)

    def record(self, counts: torch.Tensor, balance: torch.Tensor | None = None) -> None:
        """The one writer of `last_counts` and `balance_loss`. Bypasses nn.Module.__setattr__: the
        fast decode path calls this per layer per token."""
        self._buffers["last_counts"] = counts
        object.__setattr__(self, "balance_loss", balance)

    def route(self, x: torch.Tensor) -> MoECall:
        """x [B, T, D] -> the call's routing: gate values, expert ids, affinities, counts, balance loss."""
        B, T, D = x.shape
        x_flat = x.reshape(B * T, D)
        weights, indices, scores = self.gate(x_flat)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts).detach()
        balance = None
        if self.training and torch.is_grad_enabled():
            balance = balance_loss(scores, indices, B, self.top_k)
        self.record(counts, balance)
        return MoECall(x.shape, x_flat, weights, indices, scores, counts, balance)

    def dispatch(self, call: MoECall) -> None:
        """Single device: the token copies sorted by expert (stable), one row per (token, expert)."""
        order = call.indices.flatten().argsort(stable=True)
        call.order, call.rows, call.row_counts = order, call.x[order // self.top_k], call.counts

    def run_experts(self, call: MoECall) -> None:
        """The grouped experts on the dispatched rows (`out`), and the shared experts on every token."""
        call.wait_dispatch()
        call.out = self.experts(call.rows, call.row_counts)  # (M, D), rows grouped by expert
        self.run_shared(call)

    def run_shared(self, call: MoECall) -> None:
        call.shared = self.shared_experts(call.x) if self.shared_experts is not None else None

    def combine(self, call: MoECall) -> torch.Tensor:
        """Expert outputs back to token order, gate-weighted and summed, + shared -> [B, T, D]."""
        N, K = call.indices.shape
        y = torch.empty_like(call.out).index_copy_(0, call.order, call.out).view(N, K, call.out.shape[-1])
        return self.add_shared(call, combine(call.weights, y))

    # ---- the asynchronous halves (pipeline phases; `forward` uses the synchronous ones above) ----------
    def start_dispatch(self, call: MoECall) -> None:
        """`dispatch`, possibly left in flight (`call.pending`; `run_experts` waits). Here: no
        communication, so it is `dispatch`."""
        self.dispatch(call)

    def start_combine(self, call: MoECall) -> None:
        """Start what `combine` sends (expert parallelism: the all-to-all back); `finish_combine`
        returns the layer's output. Here nothing is sent: all the work is in `finish_combine`."""

    def finish_combine(self, call: MoECall) -> torch.Tensor:
        """The layer's output [B, T, D] once `start_combine`'s exchange has arrived."""
        return self.combine(call)

    def add_shared(self, call: MoECall, routed: torch.Tensor) -> torch.Tensor:
        """routed [N, D] + the shared experts' output -> the layer's output [B, T, D]."""
        out = routed if call.shared is None else routed + call.shared
        return out.view(call.shape)


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
