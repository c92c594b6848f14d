"""The per-layer cost model: FLOPs and bytes from the model config, seconds from a `Hardware` profile.

FLOPs (one multiply-add = 2 FLOPs), per token unless said otherwise, from the shapes of
`dsv3.config.ModelConfig` (the same shapes `param_counts` counts, so a forward costs 2 x the
activated matrix parameters per token plus the attention core):
  attention projections  2 x (q_a, q_b, kv_a, kv_b, o weights). The absorbed decode path folds kv_b
                         into the query and the output (W_UK, W_UV applied per query token): the same
                         FLOPs per new token, but no per-context-token up-projection
  attention core         naive (prefill/training): 2 H (qk_head + v) per (query, key) pair;
                         absorbed (decode): 2 H (2 kv_lora + rope) per pair, on the latent cache
  dense MLP              2 x 3 d inter            routed experts  2 x K x 3 d moe_inter
  shared experts         2 x S x 3 d moe_inter    gate            2 d E
  head                   2 d V                    MTP             2 x 2d x d + one MoE block + head

Time of one piece of work on one GPU is a roofline, max(FLOPs / rate, bytes / HBM rate) plus a
kernel latency: a GEMM of m tokens reads its weights once, which is what makes small-batch MoE
decode memory-bound (every expert a GPU hosts is read for a handful of tokens) and large-batch
prefill compute-bound. The expert GEMMs run on the busiest GPU's tokens: the mean times the
balance (max/mean GPU load) that `dsv3.planner.loads` gets from the real EPLB planner.

All-to-all (§3.2.2, dsv3.parallel.expert.dispatch): a dispatched row is D bytes of E4M3 plus one FP32
scale per 128 values (`wire_bytes("fp8")`), a combined row 2D bytes of BF16; the backward sends
BF16 both ways. One hop sends one copy per (token, expert on another GPU); two hops send one copy
per (token, other node) over IB, carrying the token's K gate values, then one per (token, expert on
another GPU of that node) over NVLink; the combine mirrors it. `expected_copies` gives the counts
under uniform routing with node-limited routing (each token picks M of the expert groups, then K
experts among theirs); `measured_copies` counts them from recorded expert indices.

Shapes: N tokens, K experts per token, E experts, D dim, P EP ranks, L ranks per node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv3.config import ModelConfig
from dsv3.planner.hardware import Hardware

WIRE = ("same", "bf16", "fp8")


# ---- FLOPs ----------------------------------------------------------------------------------------
def attention_weights(cfg: ModelConfig) -> dict[str, int]:
    """Matrix parameters of one MLA layer, by projection (norm weights excluded)."""
    d, H = cfg.dim, cfg.n_heads
    w = {}
    if cfg.q_lora_rank is None:
        w["q"] = d * H * cfg.qk_head_dim
    else:
        w["q_a"] = d * cfg.q_lora_rank
        w["q_b"] = cfg.q_lora_rank * H * cfg.qk_head_dim
    w["kv_a"] = d * cfg.kv_cache_dim
    w["kv_b"] = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    w["o"] = H * cfg.v_head_dim * d
    return w


def expert_weights(cfg: ModelConfig) -> int:
    return 3 * cfg.dim * cfg.moe_inter_dim


def attention_core_flops(cfg: ModelConfig, pairs: float, absorbed: bool = False) -> float:
    """FLOPs of softmax(QK^T)V over `pairs` (query, key) pairs of one layer."""
    H = cfg.n_heads
    per_pair = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim if absorbed else cfg.qk_head_dim + cfg.v_head_dim
    return 2.0 * H * per_pair * pairs


def attention_backward_ratio(cfg: ModelConfig, flash: bool = True) -> float:
    """Backward FLOPs of the (unabsorbed) attention core over its forward's. A flash-attention
    backward (FlashAttention-3 on GPUs, which runs MLA's 192/128 head widths) recomputes Q K^T from
    the saved log-sum-exp, then forms dV = P^T dO, dP = dO V^T, dQ = dS K and dK = dS^T Q: three
    products over the query/key width and two over the value width, against the forward's one of
    each (2.6x for DeepSeek-V3's 192/128). The math path keeps P and skips the recomputation (2x);
    ATen's CPU SDPA takes it for MLA, whose query and value widths differ."""
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    return (3 * qk + 2 * v) / (qk + v) if flash else 2.0


def causal_pairs(new_tokens: int, cached: int = 0, skip_masked: bool = True) -> float:
    """(query, key) pairs of a prefill of `new_tokens` after `cached` ones: each new token sees the
    cache and the new tokens up to itself; `skip_masked=False` counts the full square, as a plain
    masked matmul computes it (the reference model does)."""
    if not skip_masked:
        return float(new_tokens) * (cached + new_tokens)
    return float(new_tokens) * cached + new_tokens * (new_tokens + 1) / 2


def layer_gemm_flops(cfg: ModelConfig, layer: int) -> dict[str, float]:
    """GEMM FLOPs per token of block `layer` (0-based), by part."""
    f = {"attention": 2.0 * sum(attention_weights(cfg).values())}
    if layer < cfg.n_dense_layers:
        f["dense_mlp"] = 2.0 * 3 * cfg.dim * cfg.inter_dim
    else:
        f["gate"] = 2.0 * cfg.dim * cfg.n_routed_experts
        f["routed"] = 2.0 * cfg.n_activated_experts * expert_weights(cfg)
        f["shared"] = 2.0 * cfg.n_shared_experts * expert_weights(cfg)
    return f


def mtp_gemm_flops(cfg: ModelConfig) -> float:
    """GEMM FLOPs per token of the MTP modules: eh_proj, one MoE block each, and the shared head."""
    block = sum(layer_gemm_flops(cfg, cfg.n_layers).values()) if cfg.n_layers > cfg.n_dense_layers else 0.0
    if block == 0.0:  # an all-dense model's MTP block still has a MoE (ModelConfig.param_counts)
        block = 2.0 * (sum(attention_weights(cfg).values()) + cfg.dim * cfg.n_routed_experts)
        block += 2.0 * (cfg.n_activated_experts + cfg.n_shared_experts) * expert_weights(cfg)
    return cfg.n_mtp_layers * (2.0 * 2 * cfg.dim * cfg.dim + block + 2.0 * cfg.dim * cfg.vocab_size)


def forward_flops(
    cfg: ModelConfig, tokens: int, pairs_per_layer: float, absorbed: bool = False, mtp: bool = False
) -> dict[str, float]:
    """Forward FLOPs of the whole model for `tokens` tokens whose attention covers `pairs_per_layer`
    (query, key) pairs in every layer, by part (gemm, attention_core, head, mtp) and total."""
    gemm = tokens * sum(sum(layer_gemm_flops(cfg, i).values()) for i in range(cfg.n_layers))
    out = {
        "gemm": gemm,
        "attention_core": cfg.n_layers * attention_core_flops(cfg, pairs_per_layer, absorbed),
        "head": tokens * 2.0 * cfg.dim * cfg.vocab_size,
        "mtp": 0.0,
    }
    if mtp and cfg.n_mtp_layers:
        out["mtp"] = tokens * mtp_gemm_flops(cfg) + cfg.n_mtp_layers * attention_core_flops(
            cfg, pairs_per_layer, absorbed
        )
    out["total"] = sum(out.values())
    return out


# ---- roofline -------------------------------------------------------------------------------------
def gemm_time(hw: Hardware, m: float, k: int, n: int, fp8: bool, weights: int = 1) -> float:
    """Seconds for `weights` GEMMs [m, k] x [k, n] (m tokens each; FP8 or BF16 weights and inputs),
    run as one (grouped) kernel."""
    if m <= 0:
        return 0.0
    elt = 1 if fp8 else 2
    flops = 2.0 * m * k * n * weights
    moved = weights * (k * n * elt + m * (k * elt + n * 2))  # weights + inputs + BF16 outputs
    return (
        max(flops / hw.gemm_flops(fp8), moved / hw.hbm_bytes) + (hw.kernel_us + weights * hw.group_us) * 1e-6
    )


def roofline(hw: Hardware, flops: float, bytes_: float, rate: float, kernels: int = 1) -> float:
    return max(flops / rate, bytes_ / hw.hbm_bytes) + kernels * hw.kernel_us * 1e-6


def elementwise_time(hw: Hardware, bytes_: float, kernels: int) -> float:
    """Seconds for element-wise passes moving `bytes_` through HBM, as `kernels` kernels."""
    return bytes_ / hw.elt_bytes + kernels * hw.kernel_us * 1e-6


# ---- all-to-all -----------------------------------------------------------------------------------
def wire_bytes(dim: int, wire: str, same_bytes: int = 4) -> int:
    """Bytes of one row of `dim` values on the wire (comm.py's formats; `same` in FP32 by default)."""
    if wire == "fp8":
        return dim + 4 * math.ceil(dim / 128)  # E4M3 values + one FP32 scale per 1x128 tile
    if wire == "bf16":
        return 2 * dim
    if wire == "same":
        return same_bytes * dim
    raise ValueError(f"wire: expected one of {WIRE}, got {wire!r}")


@dataclass(frozen=True)
class Copies:
    """Rows one GPU sends per forward all-to-all, per token: `inter` cross nodes (IB), `intra` stay
    inside the node (NVLink). One hop: copies of (token, expert); two hops: inter are (token, node)
    copies and intra the (token, expert) copies forwarded inside the node."""

    inter: float
    intra: float
    two_hop: bool


def _comb(n: int, k: int) -> float:
    return float(math.comb(n, k)) if 0 <= k <= n else 0.0


def p_node_reached(cfg: ModelConfig, nodes: int) -> float:
    """Probability that a token has at least one of its K experts on a given node of an EP group of
    `nodes` nodes (experts in contiguous blocks), routing uniform within the gate's constraints."""
    E, K, G, M = cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups
    if nodes <= 1:
        return 1.0
    limited = G > 1 and M < G and G % nodes == 0
    if not limited:  # K experts uniform among E: none of the node's E/nodes experts
        return 1.0 - _comb(E - E // nodes, K) / _comb(E, K)
    g_node, eg = G // nodes, E // G
    # j of the node's groups among the M kept ones (hypergeometric), then no expert among them
    miss = sum(
        _comb(g_node, j) * _comb(G - g_node, M - j) / _comb(G, M) * _comb((M - j) * eg, K) / _comb(M * eg, K)
        for j in range(0, min(g_node, M) + 1)
    )
    return 1.0 - miss


def expected_copies(
    cfg: ModelConfig, ep: int, ranks_per_node: int, two_hop: bool, k: int | None = None
) -> Copies:
    """Expected rows sent per token (uniform routing). `k` overrides the experts per token (decode
    counts the shared expert as a routed one: K + 1)."""
    K = cfg.n_activated_experts if k is None else k
    L = min(ranks_per_node, ep)
    nodes = ep // L
    p_remote_rank = 1.0 - 1.0 / ep  # a copy's expert is on another rank
    p_other_node = 1.0 - 1.0 / nodes if nodes > 1 else 0.0
    if not two_hop:
        inter = K * p_other_node
        return Copies(inter=inter, intra=K * p_remote_rank - inter, two_hop=False)
    # two hops: one copy per other node reached; then each node forwards its experts' copies to
    # the L-1 other ranks of the node
    inter = (nodes - 1) * p_node_reached(cfg, nodes) if nodes > 1 else 0.0
    return Copies(inter=inter, intra=K * (1.0 - 1.0 / L), two_hop=True)


def measured_copies(
    indices: list[torch.Tensor], n_experts: int, ranks_per_node: int, two_hop: bool
) -> tuple[list[Copies], list[Copies]]:
    """Rows each rank sends in the dispatch and in the combine (totals, not per token), counted
    from every rank's routed expert ids `indices[r]` [N_r, K] the way dispatch.py moves them: the
    combine of a rank returns the rows it received. -> (dispatch copies, combine copies) per rank."""
    ep = len(indices)
    per_rank, L = n_experts // ep, ranks_per_node
    hop1 = torch.zeros(ep, ep, dtype=torch.long)  # [src, dst] one hop, or hop 1 (across nodes)
    hop2 = torch.zeros(ep, ep, dtype=torch.long)  # [forwarder, dst] hop 2 (inside a node)
    for src, idx in enumerate(indices):
        dest = idx // per_rank  # (N, K) EP rank of each copy
        if not two_hop:
            hop1[src] += torch.bincount(dest.flatten(), minlength=ep)
            continue
        node = dest // L
        hit = torch.zeros(idx.shape[0], ep // L, dtype=torch.bool).scatter_(1, node, True)
        fwd = torch.arange(ep // L) * L + src % L  # the rank with src's local index on each node
        hop1[src, fwd] += hit.sum(0)
        for n in range(ep // L):  # forwarder fwd[n] sends the node-n copies to their experts' ranks
            hop2[fwd[n]] += torch.bincount(dest[node == n], minlength=ep)
    node_of = torch.arange(ep) // L
    same_node = node_of[:, None] == node_of[None, :]
    off_diag = ~torch.eye(ep, dtype=torch.bool)

    def per_rank_copies(m: torch.Tensor, m2: torch.Tensor) -> list[Copies]:
        inter = (m * ~same_node).sum(1)
        intra = (m * (same_node & off_diag)).sum(1) + (m2 * off_diag).sum(1)
        return [Copies(int(a), int(b), two_hop) for a, b in zip(inter, intra)]

    return per_rank_copies(hop1, hop2), per_rank_copies(hop1.T, hop2.T)


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU sends in one MoE layer's exchanges, by direction and link."""

    dispatch_inter: float
    dispatch_intra: float
    combine_inter: float
    combine_intra: float

    @property
    def total(self) -> float:
        return self.dispatch_inter + self.dispatch_intra + self.combine_inter + self.combine_intra

    def seconds(self, hw: Hardware, rounds: int = 2) -> float:
        """IB and NVLink run at once (two hops pipeline them); each exchange pays a latency. Nothing
        to send (one GPU): no exchange at all."""
        if self.total == 0:
            return 0.0
        inter = (self.dispatch_inter + self.combine_inter) / hw.ib_bytes
        intra = (self.dispatch_intra + self.combine_intra) / hw.nvlink_bytes
        return max(inter, intra) + rounds * hw.net_latency_us * 1e-6


def traffic(
    copies: Copies,
    tokens: float,
    dim: int,
    k: int,
    dispatch: str = "fp8",
    combine: str = "bf16",
    returned: Copies | None = None,
) -> Traffic:
    """Bytes sent for `tokens` tokens with `copies` rows per token (two hops: plus K FP32 gate values
    on each inter-node copy, which travel with it). The combine sends back the rows the GPU received,
    `returned` (default: as many as it sent, which is the expectation under balanced traffic)."""
    back = copies if returned is None else returned
    d_row, c_row = wire_bytes(dim, dispatch), wire_bytes(dim, combine)
    gate = 4 * k if copies.two_hop else 0
    return Traffic(
        dispatch_inter=tokens * copies.inter * (d_row + gate),
        dispatch_intra=tokens * copies.intra * d_row,
        combine_inter=tokens * back.inter * c_row,
        combine_intra=tokens * back.intra * c_row,
    )
