"""`dsv3 plan serve`: throughput, latency, nodes and cost of a prefill/decode deployment (§3.4).

Prefill unit (default: the paper's 4 nodes / 32 GPUs, attention TP4 with SP x DP8, EP32 with 32
redundant experts). Each GPU runs micro-batches of `prefill_tokens` new tokens; a request's new
tokens attend to its cached prefix and causally to each other. Per layer: the GEMMs and the
attention core on the GPU's tokens (TP splits heads, not work), the experts on the busiest GPU's
copies (the EPLB balance of the load distribution with the redundant slots), the two-hop
all-to-all and TP's all-gather/reduce-scatter over NVLink. With two micro-batches overlapped the
layer costs max(compute, communication), else their sum. Throughput counts cache hits as input
(what DeepSeek's published 73.7k tokens/s per node does).

Decode unit (default 40 nodes / 320 GPUs, attention TP4 x DP80, EP320: one expert slot per GPU,
256 routed + 32 redundant + 32 shared-expert slots; the shared expert is routed, so K+1 = 9 copies
per token). A step decodes `batch` sequences per GPU (1 + MTP drafts tokens each); its time is,
per layer: the attention weights (1/TP of them) and the latent cache read from HBM (sequence
parallelism splits each sequence's cache over the TP group, so a rank reads B sequences' worth), the expert GEMM on the busiest slot's copies
(balance x Poisson noise of a finite batch), the dense MLP on the first layers, one-hop dispatch and
combine to the experts; overlapped (DeepSeek's two-micro-batch decode) or not. TPOT = step /
(1 + MTP acceptance); the batch is the largest whose TPOT meets the SLO and whose cache fits.

Cost per million tokens = GPUs x price per GPU-second / tokens per second x 1e6, for the prefill
(input tokens) and the decode (output tokens) units separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from dsv3.config import ConfigError, ModelConfig, check_known_fields, parse_typed
from dsv3.planner import cost
from dsv3.planner.hardware import Hardware, resolve_hardware
from dsv3.planner.loads import balance, make_loads, sampling_imbalance
from dsv3.planner.train import forward_parts, resolve_model


@dataclass(frozen=True)
class ServeLayout:
    # prefill unit
    prefill_gpus: int = 32
    prefill_tp: int = 4  # attention TP (with SP); the rest of the unit is attention DP
    prefill_ep: int = 32
    prefill_redundant: int = 32  # redundant expert slots of the unit
    prefill_tokens: int = 8192  # new tokens per GPU per micro-batch
    prefill_overlap: bool = True  # two micro-batches: one's compute hides the other's all-to-all
    # SMs DeepEP holds while prefill's micro-batches overlap (DeepSeek's prefill profile: 24 of
    # 132); the computation runs on the rest. Decode's all-to-all holds none (its profile: 0).
    prefill_comm_sm_fraction: float = 24 / 132
    # decode unit
    decode_gpus: int = 320
    decode_tp: int = 4
    decode_ep: int = 320
    decode_redundant: int = 32
    shared_as_routed: bool = True  # the shared expert gets its own slots: K+1 copies per token
    decode_overlap: bool = True  # DeepSeek's two-micro-batch decode pipelining
    mtp: bool = True  # one MTP draft per step, verified by the main model (§5.4.3)
    mtp_acceptance: float = 0.85  # §5.4.3: 85-90%
    batch: int = 0  # sequences per GPU in decode; 0: the largest the SLO and the memory allow
    # precision
    fp8: bool = True  # FP8 weights and GEMMs
    kv_bytes: float = 2.0  # bytes per cached latent value (BF16)
    # request mix and SLO
    input_len: int = 4000
    output_len: int = 1200
    cache_hit: float = 0.563  # fraction of input tokens found in the on-disk cache (DeepSeek: 56.3%)
    tpot_ms: float = 50.0  # SLO: time per output token (20 tokens/s per user)
    ttft_ms: float = 0.0  # SLO on a prefill batch's latency (smaller micro-batches); 0: none
    loads: str = "uniform"  # uniform, zipf:S or a loads.safetensors file
    balance_layers: int = 8  # layers drawn for uniform/zipf loads (the balance is a mean over layers)
    # target traffic (tokens per second); 0: skip the node count
    target_input_tps: float = 0.0
    target_output_tps: float = 0.0

    def __post_init__(self) -> None:
        hints = get_type_hints(ServeLayout)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hints[f.name] is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
        for unit in ("prefill", "decode"):
            gpus, tp, ep = (getattr(self, f"{unit}_{x}") for x in ("gpus", "tp", "ep"))
            if min(gpus, tp, ep) < 1 or gpus % tp or gpus % ep:
                raise ConfigError(
                    f"{unit}_tp, {unit}_ep: must divide {unit}_gpus={gpus} (got tp={tp}, ep={ep})"
                )
        if not 0 <= self.cache_hit < 1:
            raise ConfigError(f"cache_hit: must be in [0, 1), got {self.cache_hit}")
        if not 0 <= self.mtp_acceptance <= 1:
            raise ConfigError(f"mtp_acceptance: must be in [0, 1], got {self.mtp_acceptance}")
        for name in ("prefill_tokens", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.tpot_ms <= 0:
            raise ConfigError(f"tpot_ms: must be > 0, got {self.tpot_ms}")
        if not 0 <= self.prefill_comm_sm_fraction < 1:
            raise ConfigError(
                f"prefill_comm_sm_fraction: must be in [0, 1), got {self.prefill_comm_sm_fraction}"
            )


# ---- prefill ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefillResult:
    batch_s: float  # one micro-batch through the model
    compute_s: float
    comm_s: float
    balance: float  # EPLB balance with the redundant slots (max/mean GPU load of the loads)
    balance_no_eplb: float
    noise: float  # max/mean from the finite batch's Poisson counts, on top of `balance`
    input_tps_per_node: float  # cache hits counted
    computed_tps_per_node: float
    tokens: int  # new tokens per GPU per micro-batch (lowered to meet a TTFT SLO)


def serve_loads(cfg: ModelConfig, lay: ServeLayout):
    """[L, E] loads: a recorded file's layers, or `balance_layers` layers of a synthetic one."""
    synthetic = lay.loads == "uniform" or lay.loads.startswith("zipf")
    layers = min(cfg.n_moe_layers, lay.balance_layers) if synthetic else cfg.n_moe_layers
    return make_loads(lay.loads, max(1, layers), cfg.n_routed_experts)


def _slots_balance(cfg: ModelConfig, hw: Hardware, w, routed_slots: int, per_gpu: int) -> tuple[float, float]:
    """(balance with the real EPLB placement, balance of the plain layout) of the GPUs holding the
    routed experts' `routed_slots` slots, `per_gpu` each."""
    E = cfg.n_routed_experts
    if routed_slots % per_gpu:
        raise ConfigError(
            f"redundant: {routed_slots} routed expert slots do not fill GPUs of {per_gpu} slots"
        )
    gpus = routed_slots // per_gpu
    nodes = gpus // hw.gpus_per_node if gpus % hw.gpus_per_node == 0 else 1
    hierarchical = nodes > 1 and cfg.n_expert_groups % nodes == 0
    groups, nodes = (cfg.n_expert_groups, nodes) if hierarchical else (1, 1)
    # without EPLB: each expert once, E / gpus consecutive experts per GPU (idle GPUs if gpus > E)
    plain = balance(w, gpus) if E % gpus == 0 or gpus > E else float("nan")
    return balance(w, gpus, routed_slots, groups, nodes), plain


def plan_prefill(cfg: ModelConfig, hw: Hardware, lay: ServeLayout) -> PrefillResult:
    """The prefill unit at `prefill_tokens` per GPU; with a TTFT SLO, the micro-batch is halved
    (down to one request's new tokens) until one batch's latency meets it."""
    res = _prefill_at(cfg, hw, lay, lay.prefill_tokens)
    floor = max(1, round(lay.input_len * (1 - lay.cache_hit)))
    while lay.ttft_ms and res.batch_s * 1e3 > lay.ttft_ms and res.tokens > floor:
        res = _prefill_at(cfg, hw, lay, max(floor, res.tokens // 2))
    return res


def _prefill_at(cfg: ModelConfig, hw: Hardware, lay: ServeLayout, T: int) -> PrefillResult:
    new = max(1, round(lay.input_len * (1 - lay.cache_hit)))
    cached = lay.input_len - new
    pairs = T / new * cost.causal_pairs(new, cached)
    w = serve_loads(cfg, lay)
    routed = cfg.n_routed_experts + lay.prefill_redundant
    if routed % lay.prefill_ep:
        raise ConfigError(
            f"prefill_redundant: {routed} expert slots do not divide over prefill_ep={lay.prefill_ep}"
        )
    bal, plain = _slots_balance(cfg, hw, w, routed, routed // lay.prefill_ep)
    noise = sampling_imbalance(T * cfg.n_activated_experts, lay.prefill_ep)
    parts = forward_parts(cfg, hw, T, pairs, lay.fp8, bal * noise, lay.prefill_ep)
    compute = sum(parts.values())
    copies = cost.expected_copies(cfg, lay.prefill_ep, hw.gpus_per_node, two_hop=True)
    a2a = cost.traffic(copies, T, cfg.dim, cfg.n_activated_experts, "fp8" if lay.fp8 else "bf16", "bf16")
    tp = lay.prefill_tp
    tp_bytes = 2 * T * cfg.dim * 2 * (tp - 1)  # all-gather in, reduce-scatter out, BF16, per layer
    comm = cfg.n_moe_layers * a2a.seconds(hw) + cfg.n_layers * tp_bytes / hw.nvlink_bytes
    if lay.prefill_overlap:  # the computation runs on the SMs the all-to-all leaves
        compute /= 1 - lay.prefill_comm_sm_fraction
        batch = max(compute, comm)
    else:
        batch = compute + comm
    computed = hw.gpus_per_node * T / batch
    return PrefillResult(batch, compute, comm, bal, plain, noise, computed / (1 - lay.cache_hit), computed, T)


# ---- decode ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeResult:
    batch: int  # sequences per GPU
    step_s: float
    tpot_s: float
    compute_s: float
    comm_s: float
    balance: float  # EPLB balance of the loads with the redundant slots
    balance_no_eplb: float
    noise: float  # max/mean from the finite batch's Poisson counts, on top of `balance`
    output_tps_per_node: float
    memory_gb: float  # weights + cache per GPU
    fits: bool


def decode_slots(cfg: ModelConfig, lay: ServeLayout) -> int:
    """Expert slots of the decode unit: routed + redundant + the shared expert's replicas when it
    is routed (every token visits it, E/K times an average expert's load: 32 replicas for V3)."""
    shared = round(cfg.n_shared_experts * cfg.n_routed_experts / cfg.n_activated_experts)
    return cfg.n_routed_experts + lay.decode_redundant + (shared if lay.shared_as_routed else 0)


def decode_slots_per_gpu(cfg: ModelConfig, lay: ServeLayout) -> int:
    """Expert slots per decode GPU: the routed + redundant slots fill whole GPUs, the shared
    expert's replicas the GPUs after them; a ConfigError names decode_redundant when they do not."""
    total, ep = decode_slots(cfg, lay), lay.decode_ep
    per_gpu = math.ceil(total / ep)
    routed = cfg.n_routed_experts + lay.decode_redundant
    shared_gpus = math.ceil((total - routed) / per_gpu)
    if routed % per_gpu or routed // per_gpu + shared_gpus > ep:
        raise ConfigError(
            f"decode_redundant: {routed} routed + redundant slots and {total - routed} shared-expert slots do not "
            f"fill decode_ep={ep} GPUs of {per_gpu} slots (routed + redundant must be a multiple of {per_gpu})"
        )
    return per_gpu


def decode_k(cfg: ModelConfig, lay: ServeLayout) -> int:
    """Expert copies per token in decode: K routed, + the shared expert when it is routed."""
    return cfg.n_activated_experts + (cfg.n_shared_experts if lay.shared_as_routed else 0)


def decode_copies(cfg: ModelConfig, lay: ServeLayout, B: int) -> float:
    """Mean copies reaching one decode GPU per step: the unit's tokens x k over its ep GPUs."""
    return B * (2 if lay.mtp else 1) * decode_k(cfg, lay) * lay.decode_gpus / lay.decode_ep


def _decode_step(
    cfg: ModelConfig, hw: Hardware, lay: ServeLayout, B: int, bal: float
) -> tuple[float, float, float, float]:
    """(step seconds, compute, communication, memory GB) for B sequences per GPU."""
    q = 2 if lay.mtp else 1  # tokens per sequence per step: the next token and the draft to verify
    tokens, tp = B * q, lay.decode_tp
    ctx = lay.input_len + lay.output_len / 2  # mean context over the decode
    elt = 1 if lay.fp8 else 2
    k = decode_k(cfg, lay)
    slots = decode_slots_per_gpu(cfg, lay)
    mean_copies = decode_copies(cfg, lay, B)
    rows = mean_copies * bal * sampling_imbalance(mean_copies, lay.decode_ep) / slots  # per slot
    attn_w = sum(cost.attention_weights(cfg).values())
    # TP over heads with sequence parallelism: a rank computes 1/tp of the weights' work for the
    # tp x B sequences of its group and holds 1/tp of each one's latent cache (a split-KV decode
    # combines the partial softmaxes), so it reads B sequences' worth of cache per layer
    kv_layer = B * ctx * cfg.kv_cache_dim * lay.kv_bytes
    core = cost.attention_core_flops(cfg, tokens * ctx, absorbed=True)
    attn = (
        max(
            2.0 * tokens * attn_w / hw.gemm_flops(lay.fp8) + core / hw.attn_flops,
            (attn_w * elt / tp + kv_layer) / hw.hbm_bytes,
        )
        + 6 * hw.kernel_us * 1e-6
    )
    d, i = cfg.dim, cfg.moe_inter_dim
    # a slot that gets no copy is not read: slots x P(at least one of the GPU's copies lands there)
    touched = slots * (1.0 - (1.0 - 1.0 / slots) ** (rows * slots)) if slots > 1 else 1.0
    expert = 3 * cost.gemm_time(hw, rows * slots / touched, d, i, lay.fp8, max(1, round(touched)))
    if not lay.shared_as_routed:
        expert += 3 * cost.gemm_time(hw, tokens, d, i * cfg.n_shared_experts, lay.fp8)
    dense = 3 * cost.gemm_time(hw, tokens, d, cfg.inter_dim, lay.fp8)
    head = cost.gemm_time(hw, tokens, d, cfg.vocab_size // tp, False)  # vocabulary-parallel in the group
    blocks = cfg.n_layers * attn + cfg.n_moe_layers * expert + cfg.n_dense_layers * dense
    mtp = attn + expert + head if lay.mtp else 0.0  # the draft: one more block and the head
    compute = blocks + head + mtp + B * hw.seq_us * 1e-6  # + the host's per-sequence work
    copies = cost.expected_copies(cfg, lay.decode_ep, hw.gpus_per_node, two_hop=False, k=k)
    a2a = cost.traffic(copies, tokens, d, k, "fp8" if lay.fp8 else "bf16", "bf16")
    comm = (cfg.n_moe_layers + (1 if lay.mtp else 0)) * a2a.seconds(hw)
    step = max(compute, comm) if lay.decode_overlap else compute + comm
    weights = elt * (attn_w * cfg.n_layers / tp + slots * cost.expert_weights(cfg) * cfg.n_moe_layers
                     + 3 * d * cfg.inter_dim * cfg.n_dense_layers) + 2 * 2 * d * cfg.vocab_size / tp  # fmt: skip
    cache = B * (lay.input_len + lay.output_len) * cfg.kv_cache_dim * lay.kv_bytes * cfg.n_layers
    return step, compute, comm, (weights + cache) / 1e9


def decode_balance(cfg: ModelConfig, hw: Hardware, lay: ServeLayout) -> tuple[float, float]:
    """(with EPLB, without) balance of the decode unit's routed GPUs (the real planner: slow-ish)."""
    w = serve_loads(cfg, lay)
    per_gpu = decode_slots_per_gpu(cfg, lay)
    return _slots_balance(cfg, hw, w, cfg.n_routed_experts + lay.decode_redundant, per_gpu)


def plan_decode(
    cfg: ModelConfig, hw: Hardware, lay: ServeLayout, balances: tuple[float, float] | None = None
) -> DecodeResult:
    """The decode result at `lay.batch`, or at the largest batch meeting the SLO when it is 0;
    `balances` reuses `decode_balance`'s answer for the same loads and slots."""
    bal, plain = balances or decode_balance(cfg, hw, lay)
    per_token = 1 + (lay.mtp_acceptance if lay.mtp else 0.0)

    def result(B: int) -> DecodeResult:
        step, compute, comm, mem = _decode_step(cfg, hw, lay, B, bal)
        noise = sampling_imbalance(decode_copies(cfg, lay, B), lay.decode_ep)
        return DecodeResult(B, step, step / per_token, compute, comm, bal, plain, noise,
                            hw.gpus_per_node * B * per_token / step, mem, mem <= hw.hbm_gb)  # fmt: skip

    if lay.batch:
        return result(lay.batch)
    ok = lambda r: r.fits and r.tpot_s * 1e3 <= lay.tpot_ms  # noqa: E731
    if not ok(result(1)):
        return result(1)  # even one sequence misses the SLO or the memory: report it as it is
    lo, hi = 1, 2
    while ok(result(hi)) and hi < 1 << 16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(result(mid)) else (lo, mid)
    return result(lo)


# ---- the whole plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServePlan:
    layout: ServeLayout
    prefill: PrefillResult
    decode: DecodeResult
    prefill_nodes: int  # for the target traffic (whole units)
    decode_nodes: int
    cost_per_m_input: float  # $ per million input tokens (prefill GPUs)
    cost_per_m_output: float  # $ per million output tokens (decode GPUs)


def plan_serve(cfg: ModelConfig, hw: Hardware, lay: ServeLayout) -> ServePlan:
    pre, dec = plan_prefill(cfg, hw, lay), plan_decode(cfg, hw, lay)
    per_gpu_s = hw.price_per_gpu_hour / 3600
    node = hw.gpus_per_node

    def nodes(rate: float, per_node: float, unit_gpus: int) -> int:
        unit_nodes = max(1, unit_gpus // node)
        return 0 if rate <= 0 else math.ceil(rate / per_node / unit_nodes) * unit_nodes

    return ServePlan(
        lay, pre, dec,
        nodes(lay.target_input_tps, pre.input_tps_per_node, lay.prefill_gpus),
        nodes(lay.target_output_tps, dec.output_tps_per_node, lay.decode_gpus),
        node * per_gpu_s / pre.input_tps_per_node * 1e6,
        node * per_gpu_s / dec.output_tps_per_node * 1e6,
    )  # fmt: skip


def format_serve(p: ServePlan, hw: Hardware) -> str:
    lay, pre, dec = p.layout, p.prefill, p.decode
    slo = "meets" if dec.tpot_s * 1e3 <= lay.tpot_ms and dec.fits else "MISSES"
    lines = [
        f"prefill: {lay.prefill_gpus} x {hw.name} (TP{lay.prefill_tp}, EP{lay.prefill_ep}, "
        f"{lay.prefill_redundant} redundant), {pre.tokens} new tokens per GPU per micro-batch",
        f"  {pre.input_tps_per_node:,.0f} input tokens/s per node with cache hits ({pre.computed_tps_per_node:,.0f} "
        f"computed); TTFT (one batch) {pre.batch_s * 1e3:.0f} ms; compute {pre.compute_s * 1e3:.1f} ms, "
        f"all-to-all + TP {pre.comm_s * 1e3:.1f} ms per batch",
        f"  GPU balance (max/mean) of the loads: {pre.balance:.3f} with EPLB, {pre.balance_no_eplb:.3f} "
        f"without; x {pre.noise:.3f} for the batch's sampling noise",
        f"decode: {lay.decode_gpus} x {hw.name} (TP{lay.decode_tp}, EP{lay.decode_ep}, {lay.decode_redundant} redundant, "
        f"MTP {'on' if lay.mtp else 'off'}), batch {dec.batch} sequences per GPU",
        f"  {dec.output_tps_per_node:,.0f} output tokens/s per node; TPOT {dec.tpot_s * 1e3:.1f} ms "
        f"({1 / dec.tpot_s:.1f} tokens/s per user; SLO {lay.tpot_ms:g} ms: {slo}); step {dec.step_s * 1e3:.1f} ms "
        f"(compute {dec.compute_s * 1e3:.1f}, all-to-all {dec.comm_s * 1e3:.1f}); {dec.memory_gb:.0f} GB per GPU",
        f"  GPU balance (max/mean) of the loads: {dec.balance:.3f} with EPLB, {dec.balance_no_eplb:.3f} "
        f"without; x {dec.noise:.3f} for the batch's sampling noise",
        f"cost: ${p.cost_per_m_input:.4f} per million input tokens, ${p.cost_per_m_output:.4f} per million output tokens "
        f"at ${hw.price_per_gpu_hour:g}/GPU-hour",
    ]
    if p.prefill_nodes or p.decode_nodes:
        lines.append(f"nodes for the target traffic: {p.prefill_nodes} prefill + {p.decode_nodes} decode")
    if lay.ttft_ms and pre.batch_s * 1e3 > lay.ttft_ms:
        lines.append(f"TTFT SLO {lay.ttft_ms:g} ms missed even at one request per micro-batch")
    return "\n".join(lines)


def serve_json(p: ServePlan) -> dict[str, Any]:
    return {
        "layout": dataclasses.asdict(p.layout),
        "prefill": dataclasses.asdict(p.prefill),
        "decode": dataclasses.asdict(p.decode),
        "prefill_nodes": p.prefill_nodes,
        "decode_nodes": p.decode_nodes,
        "cost_per_m_input": p.cost_per_m_input,
        "cost_per_m_output": p.cost_per_m_output,
    }


def parse_serve_layout(items: list[str], base: ServeLayout | None = None) -> ServeLayout:
    hints, changes = get_type_hints(ServeLayout), {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r}: expected layout field=value")
        check_known_fields(ServeLayout, {key: None}, "serve layout field")
        changes[key] = parse_typed(key, raw, hints[key])
    return dataclasses.replace(base or ServeLayout(), **changes)


# ---- sweep -----------------------------------------------------------------------------------------------
SWEEP_DECODE = [(64, 1), (64, 4), (128, 4), (144, 4), (160, 4), (256, 4), (320, 1), (320, 4), (320, 8)]
"""(GPUs = EP, attention TP) of the decode layouts `--sweep` tries; redundant slots fill the GPUs."""


def sweep(cfg: ModelConfig, hw: Hardware, lay: ServeLayout) -> list[tuple[ServeLayout, DecodeResult]]:
    """Every decode layout of SWEEP_DECODE with MTP on and off at the SLO's batch, best first: the
    fewest redundant slots that fill every GPU equally (routed + shared replicas + redundant)."""
    rows = []
    E = cfg.n_routed_experts
    shared = decode_slots(cfg, dataclasses.replace(lay, decode_redundant=0)) - E
    for gpus, tp in SWEEP_DECODE:
        per_gpu = math.ceil((E + shared) / gpus)
        red = (gpus - math.ceil(shared / per_gpu)) * per_gpu - E  # the GPUs not hosting the shared expert
        bal = None
        for mtp in (True, False):
            v = dataclasses.replace(
                lay, decode_gpus=gpus, decode_tp=tp, decode_ep=gpus, decode_redundant=red, mtp=mtp, batch=0
            )
            bal = bal or decode_balance(cfg, hw, v)  # MTP does not move experts
            rows.append((v, plan_decode(cfg, hw, v, bal)))
    return sorted(rows, key=lambda r: -r[1].output_tps_per_node * meets_slo(r[1], lay))


def meets_slo(d: DecodeResult, lay: ServeLayout) -> bool:
    return d.fits and d.tpot_s * 1e3 <= lay.tpot_ms


def format_sweep(rows: list[tuple[ServeLayout, DecodeResult]], lay: ServeLayout) -> str:
    head = f"{'GPUs':>5} {'TP':>3} {'EP':>4} {'red.':>4} {'MTP':>4} {'batch':>6} {'TPOT ms':>8} {'tok/s/user':>10} {'tok/s/node':>11} {'GB/GPU':>7}  SLO"
    out = [head, "-" * len(head)]
    for v, d in rows:
        ok = d.fits and d.tpot_s * 1e3 <= lay.tpot_ms
        out.append(
            f"{v.decode_gpus:>5} {v.decode_tp:>3} {v.decode_ep:>4} {v.decode_redundant:>4} {'on' if v.mtp else 'off':>4} "
            f"{d.batch:>6} {d.tpot_s * 1e3:>8.1f} {1 / d.tpot_s:>10.1f} {d.output_tps_per_node:>11,.0f} {d.memory_gb:>7.0f}  {'ok' if ok else 'miss'}"
        )
    return "\n".join(out)


def plot_sweep(cfg: ModelConfig, hw: Hardware, lay: ServeLayout, rows, path: str | Path) -> Path:
    """Output tokens/s per node against tokens/s per user, one curve per layout (batch 1..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for v, d in rows[:8]:
        xs, ys = [], []
        for B in sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max(1, d.batch)}):
            r = plan_decode(cfg, hw, dataclasses.replace(v, batch=B), (d.balance, d.balance_no_eplb))
            if r.fits:
                xs.append(1 / r.tpot_s)
                ys.append(r.output_tps_per_node)
        ax.plot(
            xs,
            ys,
            marker="o",
            ms=3,
            label=f"{v.decode_gpus} GPUs TP{v.decode_tp} EP{v.decode_ep} MTP {'on' if v.mtp else 'off'}",
        )
    ax.axvline(1e3 / lay.tpot_ms, color="grey", ls="--", lw=1, label=f"SLO {lay.tpot_ms:g} ms TPOT")
    ax.set_xlabel("output tokens/s per user")
    ax.set_ylabel("output tokens/s per node")
    ax.set_title(f"decode on {hw.name}: throughput vs interactivity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plan_serve_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dsv3 plan serve",
        description="Prefill/decode throughput, latency, nodes and cost of a deployment (docs/planning.md).",
    )
    p.add_argument("--model", default="671b", help="preset or config.json (default 671b)")
    p.add_argument("--hardware", default="H800", help="preset (H800, H100, H200, B200, cpu) or profile file")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="hardware override")
    p.add_argument("layout", nargs="*", metavar="FIELD=VALUE",
                   help=f"layout fields: {', '.join(f.name for f in dataclasses.fields(ServeLayout))}")  # fmt: skip
    p.add_argument("--sweep", action="store_true", help="try the decode layouts, print a table")
    p.add_argument("--plot", help="with --sweep: throughput-vs-interactivity PNG")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    hw = resolve_hardware(args.hardware, args.set)
    cfg, lay = resolve_model(args.model), parse_serve_layout(args.layout)
    if args.sweep:
        rows = sweep(cfg, hw, lay)
        print(format_sweep(rows, lay))
        if args.plot:
            print(f"plot: {plot_sweep(cfg, hw, lay, rows, args.plot)}")
        return 0
    plan = plan_serve(cfg, hw, lay)
    print(json.dumps(serve_json(plan), indent=2) if args.json else format_serve(plan, hw))
    return 0
