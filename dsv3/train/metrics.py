"""Training measurements: load-balance violation (MaxVio), FLOPs per token, matmul peak for MFU."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from dsv3.config import ModelConfig

T = TypeVar("T")


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load, for counts [E] (Wang et al. 2024, §3.5)."""
    c = counts.double()
    mean = c.mean()
    return 0.0 if mean == 0 else float((c.max() - mean) / mean)


def mean_max_violation(per_layer: list[torch.Tensor]) -> float:
    """MaxVio averaged over layers (MaxVio_batch for one batch, MaxVio_global for a whole set)."""
    return sum(max_violation(c) for c in per_layer) / max(len(per_layer), 1)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
    """Model FLOPs of forward + backward per token: 6 x activated matmul parameters (the embedding is
    a lookup, not a matmul) plus causal attention scores and values over an average context of T/2;
    each MTP module adds its projection, its block and one more pass through the shared head."""
    c = cfg.param_counts()
    matmul = c["activated"] - c["embedding"] - c["norms"]
    attn_layers = cfg.n_layers
    if with_mtp and cfg.n_mtp_layers:
        expert = 3 * cfg.dim * cfg.moe_inter_dim
        per_module = c["mtp"] // cfg.n_mtp_layers - (cfg.n_routed_experts - cfg.n_activated_experts) * expert
        matmul += cfg.n_mtp_layers * (per_module + c["head"])
        attn_layers += cfg.n_mtp_layers
    attn = 6 * attn_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6 * matmul + attn


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, budget_s: float = 0.5) -> float:
    """Dense n x n matmul FLOP/s measured now on this machine (the MFU denominator): the best of the
    repetitions that fit in about budget_s. Falls back to n = 512 when the dtype is so slow here
    (BF16 on CPUs without BF16 units) that one n x n product would exceed half the budget."""
    probe = min(n, 512)  # smaller products are dominated by threading overhead on CPUs
    a, b = torch.randn(probe, probe, dtype=dtype), torch.randn(probe, probe, dtype=dtype)
    a @ b  # the first call pays for library and thread-pool start-up
    t = time.perf_counter()
    a @ b
    rate = 2 * probe**3 / max(time.perf_counter() - t, 1e-9)
    if 2 * n**3 / rate > budget_s / 2:
        n = probe
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, spent = float("inf"), 0.0
    while spent < budget_s:
        t = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return 2 * n**3 / best


def decided_by_rank0(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 only and its result broadcast to every rank of the default group
    (a collective: every rank calls it at the same point); without torch.distributed, `decide()`.
    For every choice a rank would make from its own measurement or hardware (precision=auto, the
    BF16 kernels): ranks that chose differently would build different models."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    box = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
