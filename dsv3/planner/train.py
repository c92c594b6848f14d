"""`dsv3 plan train`: step time, bubble, MFU, memory and GPU-hours of a training layout.

The pipeline part is the project's own: `dsv3.parallel.pipeline.schedule.build_schedule` makes the per-rank
op lists of 1F1B, ZB1P, DualPipe or DualPipeV and `dsv3.parallel.pipeline.plan.simulate` runs them, fed
with per-chunk costs from the cost model (`dsv3.planner.cost`):

  F   forward of one stage for one micro-batch: its GEMMs (FP8 or BF16), attention core (BF16),
      element-wise passes, plus its expert all-to-alls when nothing hides them
  W   weight-gradient GEMMs (one per forward GEMM, the same shapes)
  B   W + the input-gradient GEMMs + 2x the attention core + recomputation (RMSNorm and the MLA
      up-projections, §3.3.4) + the backward all-to-alls (BF16 both ways)
  F&B (DualPipe) the two chunks' compute on the SMs left to compute, overlapped with both chunks'
      all-to-alls on the SMs reserved for communication (20 of 132 on H800, §3.2.2); whichever
      is longer
and the point-to-point latency between stages is one micro-batch's activations over IB. A stage
holds n_layers / PP blocks plus its share of the embedding, head and MTP (costs are uniform over
stages: the simulator takes one F/B/W per schedule, and V3 balances its stages that way).

Step time = the simulated makespan + the ZeRO-1 exchanges of the dense DP group (gradient
reduce-scatter + parameter all-gather of this GPU's parameters, not overlapped: an upper bound).
"Exposed communication" = step time minus the step time of the same schedule with free
communication; the SMs DualPipe sets aside for it are reported apart ("SM overhead": the step with
free communication on those SMs minus the step with every SM computing). MFU = model FLOPs (3 x forward, causal attention, MTP included) / (GPUs x BF16 peak).

Memory per GPU: parameters (BF16), gradients (FP32), AdamW moments (BF16) and FP32 master weights
(the latter two sharded by ZeRO-1 over the data-parallel replicas holding the same weights), x2 for
DualPipe's two chunks; activations = the schedule's simulated peak of in-flight micro-batches x one
stage's saved tensors per micro-batch (inputs of FP8 GEMMs cached in FP8, §3.3.4).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from dsv3.config import ConfigError, ModelConfig, check_known_fields, parse_typed
from dsv3.parallel.pipeline.plan import Costs, Simulation, peak_activations, simulate, summarize
from dsv3.parallel.pipeline.schedule import (
    BACKWARD,
    FORWARD,
    INPUT_GRAD,
    SCHEDULES,
    WEIGHT_GRAD,
    Op,
    ScheduleError,
    build_schedule,
)
from dsv3.planner import cost
from dsv3.planner.hardware import Hardware, resolve_hardware


@dataclass(frozen=True)
class TrainLayout:
    gpus: int = 2048
    pp: int = 16  # pipeline stages (dualpipev runs them on pp/2 devices per pipeline)
    ep: int = 64  # expert-parallel size inside a stage (no TP)
    schedule: str = "dualpipe"
    seq_len: int = 4096
    micro_batch: int = 1  # sequences per micro-batch per data-parallel rank
    global_batch: int = 15360  # sequences per optimizer step (V3's batch after the ramp, §4.2)
    fp8: bool = True  # FP8 GEMMs (§3.3); False: BF16
    dispatch: str = "fp8"  # wire format of the forward dispatch (§3.3.3)
    two_hop: bool = True  # IB to the node, then NVLink (§3.2.2)
    recompute: bool = True  # RMSNorm and MLA up-projections recomputed in the backward (§3.3.4)
    comm_sm_fraction: float = 20 / 132  # SMs reserved for communication while it overlaps (§3.2.2)
    communication: bool = True  # False: free communication (the bubble formulas' setting)
    tokens: float = 14.8e12  # token budget for the total cost

    def __post_init__(self) -> None:
        hints = get_type_hints(TrainLayout)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hints[f.name] is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
        for name in ("gpus", "pp", "ep", "seq_len", "micro_batch", "global_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.gpus % self.devices_per_pipeline:
            raise ConfigError(
                f"gpus: {self.gpus} is not a multiple of the {self.devices_per_pipeline} pipeline devices"
            )
        if self.dp % self.ep:
            raise ConfigError(f"ep: {self.ep} does not divide the {self.dp} GPUs of a stage")
        if self.global_batch % (self.micro_batch * self.dp):
            raise ConfigError(
                f"global_batch: {self.global_batch} sequences are not a multiple of micro_batch "
                f"({self.micro_batch}) x {self.dp} data-parallel ranks"
            )
        if self.dispatch not in cost.WIRE:
            raise ConfigError(f"dispatch: expected one of {cost.WIRE}, got {self.dispatch!r}")
        if not 0 <= self.comm_sm_fraction < 1:
            raise ConfigError(f"comm_sm_fraction: must be in [0, 1), got {self.comm_sm_fraction}")

    @property
    def devices_per_pipeline(self) -> int:
        return self.pp // 2 if self.schedule == "dualpipev" else self.pp

    @property
    def dp(self) -> int:
        """GPUs per stage (= pipelines): the attention/dense data-parallel size."""
        return self.gpus // self.devices_per_pipeline

    @property
    def chunks(self) -> int:
        """Micro-batches per step per pipeline."""
        return self.global_batch // (self.micro_batch * self.dp)


# ---- per-chunk costs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkCosts:
    """Seconds of one stage for one micro-batch on one GPU."""

    f: float  # forward compute
    b: float  # full backward compute (input + weight gradients, recomputation)
    w: float  # weight-gradient compute
    comm_f: float  # forward all-to-alls (dispatch + combine)
    comm_b: float  # backward all-to-alls
    p2p: float  # activations to the next stage
    parts: dict[str, float] = field(default_factory=dict)  # forward compute by part, whole model


def _gemms(cfg: ModelConfig, layer: int) -> list[tuple[str, int, int, float]]:
    """(part, k, n, rows per token) of the dense GEMMs of block `layer` (experts separately)."""
    out = [("attention", *_kn(cfg, name), 1.0) for name in cost.attention_weights(cfg)]
    if layer < cfg.n_dense_layers:
        out += [("dense_mlp", cfg.dim, cfg.inter_dim, 1.0)] * 2 + [("dense_mlp", cfg.inter_dim, cfg.dim, 1.0)]
    else:
        out += [("gate", cfg.dim, cfg.n_routed_experts, 1.0)]
        s = cfg.n_shared_experts
        out += [("shared", cfg.dim, cfg.moe_inter_dim * s, 1.0)] * 2 + [
            ("shared", cfg.moe_inter_dim * s, cfg.dim, 1.0)
        ]
    return out


def _kn(cfg: ModelConfig, name: str) -> tuple[int, int]:
    d, H = cfg.dim, cfg.n_heads
    return {
        "q": (d, H * cfg.qk_head_dim),
        "q_a": (d, cfg.q_lora_rank or 0),
        "q_b": (cfg.q_lora_rank or 0, H * cfg.qk_head_dim),
        "kv_a": (d, cfg.kv_cache_dim),
        "kv_b": (cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
        "o": (H * cfg.v_head_dim, d),
    }[name]


def elementwise_bytes(cfg: ModelConfig, layer: int) -> float:
    """HBM bytes per token of the element-wise passes of one block (norms, RoPE, SwiGLU, residuals,
    quantisation, the MoE permutation): ~12 BF16 passes over the width D, and for MoE 3 passes over
    each copy's intermediate plus the permute/unpermute of the copies. An estimate, not a count."""
    b = 12 * 2 * cfg.dim
    if layer >= cfg.n_dense_layers:
        k = cfg.n_activated_experts + cfg.n_shared_experts
        b += k * (3 * 2 * cfg.moe_inter_dim + 2 * 2 * cfg.dim)
    else:
        b += 3 * 2 * cfg.inter_dim
    return float(b)


def forward_parts(
    cfg: ModelConfig, hw: Hardware, tokens: int, pairs: float, fp8: bool, balance: float = 1.0,
    ep: int = 1, absorbed: bool = False, layers: range | None = None, head: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Seconds of one forward of the whole model over `tokens` tokens on one GPU, by part; the
    routed experts see tokens x K copies spread over `ep` GPUs x `balance` on the busiest one.
    `layers` (default all) and `head` restrict it to the blocks and head of one pipeline stage."""
    t: dict[str, float] = {"head": 0.0}
    local = max(1, cfg.n_routed_experts // ep)
    for layer in range(cfg.n_layers) if layers is None else layers:
        for part, k, n, _ in _gemms(cfg, layer):
            # the gate and the head stay in BF16 (§3.3), the other GEMMs follow the precision
            t[part] = t.get(part, 0.0) + cost.gemm_time(hw, tokens, k, n, fp8 and part != "gate")
        if layer >= cfg.n_dense_layers:
            rows = tokens * cfg.n_activated_experts * balance / local  # per local expert
            d, i = cfg.dim, cfg.moe_inter_dim
            t["routed"] = t.get("routed", 0.0) + 2 * cost.gemm_time(hw, rows, d, i, fp8, local)
            t["routed"] += cost.gemm_time(hw, rows, i, d, fp8, local)
        t["attention_core"] = t.get("attention_core", 0.0) + cost.roofline(
            hw, cost.attention_core_flops(cfg, pairs, absorbed), 0.0, hw.attn_flops
        )
        t["elementwise"] = t.get("elementwise", 0.0) + cost.elementwise_time(
            hw, tokens * elementwise_bytes(cfg, layer), kernels=8
        ) + hw.block_us * 1e-6  # fmt: skip
    if head:
        t["head"] = cost.gemm_time(hw, tokens, cfg.dim, cfg.vocab_size, False)
    return t


def model_costs(
    cfg: ModelConfig, hw: Hardware, tokens: int, pairs: float, fp8: bool, ep: int = 1, recompute: bool = True,
    layers: range | None = None, last: bool = True, balance: float = 1.0,
) -> tuple[float, float, float, dict[str, float]]:  # fmt: skip
    """(F, B, W, forward parts) in seconds of the whole model (MTP included) for `tokens` tokens
    whose attention covers `pairs` (query, key) pairs per layer, on one GPU, no communication.
    One pipeline stage: `layers` its blocks, `last` whether it holds the head and the MTP modules;
    `balance` the busiest EP rank's expert rows over the mean."""
    fwd, bwd, parts = costs_by_kind(cfg, hw, tokens, pairs, fp8, ep, recompute, layers, last, balance)
    return sum(fwd.values()), sum(bwd.values()), fwd["gemm"], parts


def costs_by_kind(
    cfg: ModelConfig, hw: Hardware, tokens: int, pairs: float, fp8: bool, ep: int = 1, recompute: bool = True,
    layers: range | None = None, last: bool = True, balance: float = 1.0,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:  # fmt: skip
    """`model_costs`' forward and backward seconds by kind of kernel ("gemm", "attention_core",
    "elementwise"), and the forward parts. The weight gradients are the backward's share of "gemm"
    equal to the forward's GEMMs; the input gradients are the rest: a GEMM's costs as much as its
    forward, the attention core's `cost.attention_backward_ratio` x, the element-wise passes' 2x
    (they read and write twice the data). Recomputation (`recompute`) runs RMSNorm and the MLA
    up-projections of every block again in the backward."""
    layers = range(cfg.n_layers) if layers is None else layers
    parts = forward_parts(cfg, hw, tokens, pairs, fp8, balance, ep, layers=layers, head=last)
    core, elt = parts["attention_core"], parts["elementwise"]
    gemm = sum(parts.values()) - core - elt
    mtp = 0.0
    if last:  # MTP: one more MoE block and the head again, for every token (§2.2)
        moe = forward_parts(
            cfg, hw, tokens, pairs, fp8, balance, ep, layers=range(cfg.n_layers - 1, cfg.n_layers)
        )
        block = sum(moe.values()) - moe["head"]
        n = cfg.n_mtp_layers
        mtp = n * (block + parts["head"])
        gemm += n * (block - moe["attention_core"] - moe["elementwise"] + parts["head"])
        core += n * moe["attention_core"]
        elt += n * moe["elementwise"]
    fwd = {"gemm": gemm, "attention_core": core, "elementwise": elt}
    bwd = {"gemm": 2 * gemm, "attention_core": cost.attention_backward_ratio(cfg, hw.flash_attention) * core,
           "elementwise": 2 * elt}  # fmt: skip
    if recompute:
        ups = [n for n in ("q_b", "kv_b") if n in cost.attention_weights(cfg)]
        bwd["gemm"] += len(layers) * sum(cost.gemm_time(hw, tokens, *_kn(cfg, n), fp8) for n in ups)
        bwd["elementwise"] += parts["elementwise"] / 4
    return fwd, bwd, {**parts, "mtp": mtp}


def chunk_costs(cfg: ModelConfig, hw: Hardware, lay: TrainLayout) -> ChunkCosts:
    tokens = lay.micro_batch * lay.seq_len
    pairs = lay.micro_batch * cost.causal_pairs(lay.seq_len)
    f_all, b_all, w_all, parts = model_costs(cfg, hw, tokens, pairs, lay.fp8, lay.ep, lay.recompute)
    pp = lay.pp
    comm_f = comm_b = p2p = 0.0
    if lay.communication:
        copies = cost.expected_copies(cfg, lay.ep, hw.gpus_per_node, lay.two_hop)
        K, moe = cfg.n_activated_experts, cfg.n_moe_layers + cfg.n_mtp_layers
        fwd = cost.traffic(copies, tokens, cfg.dim, K, lay.dispatch, "bf16")
        bwd = cost.traffic(copies, tokens, cfg.dim, K, "bf16", "bf16")
        comm_f, comm_b = moe * fwd.seconds(hw) / pp, moe * bwd.seconds(hw) / pp
        p2p = tokens * cfg.dim * 2 / hw.ib_bytes + hw.net_latency_us * 1e-6
    return ChunkCosts(f_all / pp, b_all / pp, w_all / pp, comm_f, comm_b, p2p, parts)


@dataclass(frozen=True)
class StageCosts(Costs):
    """Costs that differ per stage: `per_stage[s]` is stage s's (F, B, W) for one micro-batch (the
    first stage embeds, the last runs the head, the loss and MTP). f/b/w hold the mean stage, for
    the bubble formulas; the simulator reads `of`."""

    per_stage: tuple[tuple[float, float, float], ...] = ()

    def of(self, op: Op) -> float:
        total = 0.0
        for t in op.tasks:
            f, b, w = self.per_stage[t.stage]
            total += {FORWARD: f, BACKWARD: b, INPUT_GRAD: b - w, WEIGHT_GRAD: w}[t.kind]
        return total


def stage_costs(
    cfg: ModelConfig, hw: Hardware, stages: int, tokens: int, pairs: float, fp8: bool, ep: int = 1,
    recompute: bool = True,
) -> StageCosts:  # fmt: skip
    """Per-stage (F, B, W) of the pipeline runtime's split (`split_layers`: blocks and MTP modules
    cut evenly, the head, loss and MTP on the last stage) for one micro-batch, no communication."""
    from dsv3.parallel.pipeline.stages import split_layers

    layout = split_layers(cfg.n_layers, cfg.n_mtp_layers, stages).layers
    per = tuple(
        model_costs(cfg, hw, tokens, pairs, fp8, ep, recompute, layers=r, last=s == stages - 1)[:3]
        for s, r in enumerate(layout)
    )
    mean = [sum(c[i] for c in per) / stages for i in range(3)]
    return StageCosts(mean[0], mean[1], min(mean[2], mean[1] * (1 - 1e-12)), per_stage=per)


def schedule_costs(cc: ChunkCosts, schedule: str, sm_fraction: float) -> Costs:
    """The simulator's F/B/W/F&B for a schedule: communication exposed in single ops; in DualPipe's
    F&B it overlaps the two chunks' compute, which runs on the `1 - sm_fraction` of the SMs left."""
    f, b = cc.f + cc.comm_f, cc.b + cc.comm_b
    fb = None
    if schedule in ("dualpipe", "dualpipev"):
        fb = max((cc.f + cc.b) / (1 - sm_fraction), cc.comm_f + cc.comm_b)
    return Costs(f=f, b=b, w=min(cc.w, b * (1 - 1e-12)), fb=fb)


# ---- the plan ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainPlan:
    layout: TrainLayout
    chunk: ChunkCosts
    costs: Costs
    sim: Simulation
    step_time: float
    bubble: float
    formula_bubble: float
    formula_caveat: str | None
    exposed_comm: float  # step time minus the step with free communication (same SMs computing)
    sm_overhead: float  # the cost of the SMs set aside for communication in overlapped F&B
    dp_comm: float
    tokens_per_s: float
    mfu: float  # of the BF16 peak
    memory_gb: dict[str, float]
    gpu_hours_per_t: float
    total_gpu_hours: float
    total_cost: float
    comm_to_compute: float  # forward all-to-all time / forward compute time of a chunk


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x the forward (GEMMs, causal attention, head, MTP)."""
    f = cost.forward_flops(cfg, seq_len, cost.causal_pairs(seq_len), mtp=True)
    return 3.0 * f["total"] / seq_len


def memory_gb(cfg: ModelConfig, lay: TrainLayout, sim: Simulation) -> dict[str, float]:
    c = cfg.param_counts()
    routed = c["routed_experts"] + cfg.n_mtp_layers * cfg.n_routed_experts * cost.expert_weights(cfg)
    dense = c["total_with_mtp"] - routed
    chunks = sim.schedule.chunks_per_rank
    per_gpu_dense, per_gpu_expert = chunks * dense / lay.pp, chunks * routed / (lay.pp * lay.ep)
    expert_dp = lay.dp // lay.ep
    params = per_gpu_dense + per_gpu_expert
    sharded = per_gpu_dense / lay.dp + per_gpu_expert / expert_dp  # ZeRO-1
    tokens = lay.micro_batch * lay.seq_len
    d, H = cfg.dim, cfg.n_heads
    k = cfg.n_activated_experts + cfg.n_shared_experts
    saved = (  # bytes per token and block: FP8-cached GEMM inputs, BF16 latents and attention out
        3 * d + (cfg.q_lora_rank or 0) * 2 + cfg.kv_cache_dim * 2 + H * cfg.v_head_dim * 3 + H * 4
        + k * (d + 3 * cfg.moe_inter_dim) + 4 * d
    )  # fmt: skip
    act = max(peak_activations(sim.schedule)) * tokens * saved * (cfg.n_layers + cfg.n_mtp_layers) / lay.pp
    gb = {
        "parameters": 2 * params / 1e9,
        "gradients": 4 * params / 1e9,
        "optimizer": (4 + 2 * 2) * sharded / 1e9,
        "activations": act / 1e9,
    }
    gb["total"] = sum(gb.values())
    return gb


def plan_train(
    cfg: ModelConfig, hw: Hardware, lay: TrainLayout, chunk: ChunkCosts | None = None
) -> TrainPlan:
    """The plan of `lay`; `chunk` replaces the cost model's per-chunk costs (what-if studies, tests)."""
    try:
        schedule = build_schedule(lay.schedule, lay.pp, lay.chunks)
    except ScheduleError as e:
        raise ConfigError(f"{e} (chunks = global_batch / (micro_batch x dp) = {lay.chunks})") from None
    cc = chunk or chunk_costs(cfg, hw, lay)
    sm = lay.comm_sm_fraction if lay.communication else 0.0  # no communication, no SMs set aside
    costs = schedule_costs(cc, lay.schedule, sm)
    sim = simulate(schedule, costs, cc.p2p)
    free = dataclasses.replace(cc, comm_f=0.0, comm_b=0.0, p2p=0.0)
    free_same_sms = simulate(schedule, schedule_costs(free, lay.schedule, sm), 0.0).makespan
    all_sms = simulate(schedule, schedule_costs(free, lay.schedule, 0.0), 0.0).makespan
    summary = summarize(sim, cc.p2p)
    c = cfg.param_counts()
    dense_per_gpu = sim.schedule.chunks_per_rank * (c["total_with_mtp"] - c["routed_experts"]) / lay.pp
    # ZeRO-1 over the stage's DP group: reduce-scatter BF16 gradients, all-gather BF16 parameters
    dp_comm = 2 * 2 * dense_per_gpu * (lay.dp - 1) / lay.dp / hw.ib_bytes if lay.communication else 0.0
    step = sim.makespan + dp_comm
    tokens_step = lay.global_batch * lay.seq_len
    tps = tokens_step / step
    gpu_h_t = lay.gpus * 1e12 / tps / 3600
    total_h = gpu_h_t * lay.tokens / 1e12
    mfu = model_flops_per_token(cfg, lay.seq_len) * tps / (lay.gpus * hw.bf16_tflops * 1e12)
    return TrainPlan(
        layout=lay, chunk=cc, costs=costs, sim=sim, step_time=step, bubble=sim.bubble(),
        formula_bubble=summary.formula, formula_caveat=summary.caveat,
        exposed_comm=step - free_same_sms, sm_overhead=free_same_sms - all_sms, dp_comm=dp_comm, tokens_per_s=tps, mfu=mfu,
        memory_gb=memory_gb(cfg, lay, sim), gpu_hours_per_t=gpu_h_t, total_gpu_hours=total_h,
        total_cost=total_h * hw.price_per_gpu_hour,
        comm_to_compute=cc.comm_f / cc.f if cc.f else 0.0,
    )  # fmt: skip


def format_plan(p: TrainPlan, hw: Hardware) -> str:
    lay, cc = p.layout, p.chunk
    m = p.memory_gb
    lines = [
        f"layout: {lay.gpus} x {hw.name}, PP {lay.pp} ({lay.schedule}), EP {lay.ep}, DP {lay.dp}, "
        f"{lay.chunks} micro-batches of {lay.micro_batch} x {lay.seq_len} tokens, {'FP8' if lay.fp8 else 'BF16'} GEMMs",
        f"per chunk: F {cc.f * 1e3:.2f} ms, B {cc.b * 1e3:.2f} ms, W {cc.w * 1e3:.2f} ms, "
        f"all-to-all fwd {cc.comm_f * 1e3:.2f} ms / bwd {cc.comm_b * 1e3:.2f} ms, p2p {cc.p2p * 1e3:.3f} ms "
        f"(communication / computation {p.comm_to_compute:.2f})",
        f"step time {p.step_time:.3f} s: bubble {p.bubble:.3f} s ({p.bubble / p.step_time:.1%}; "
        f"DESIGN §5 formula {p.formula_bubble:.3f} s), exposed communication {p.exposed_comm:.3f} s "
        f"(of which ZeRO-1 {p.dp_comm:.3f} s), SMs reserved for communication {p.sm_overhead:.3f} s",
        f"throughput {p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s / lay.gpus:,.0f} per GPU), MFU {p.mfu:.1%} of BF16 peak",
        f"memory per GPU: parameters {m['parameters']:.1f} GB, gradients {m['gradients']:.1f} GB, "
        f"optimizer {m['optimizer']:.1f} GB, activations {m['activations']:.1f} GB = {m['total']:.1f} GB "
        f"of {hw.hbm_gb:g} GB",
        f"GPU-hours per trillion tokens {p.gpu_hours_per_t / 1e3:,.1f}K; {lay.tokens / 1e12:g}T tokens: "
        f"{p.total_gpu_hours / 1e6:.3f}M GPU-hours, ${p.total_cost / 1e6:.3f}M at ${hw.price_per_gpu_hour:g}/GPU-hour",
    ]
    if p.formula_caveat:
        lines.append(f"note: {p.formula_caveat}")
    return "\n".join(lines)


def plan_json(p: TrainPlan) -> dict[str, Any]:
    return {
        "layout": dataclasses.asdict(p.layout), "step_time_s": p.step_time, "bubble_s": p.bubble,
        "formula_bubble_s": p.formula_bubble, "exposed_comm_s": p.exposed_comm, "sm_overhead_s": p.sm_overhead, "tokens_per_s": p.tokens_per_s,
        "mfu_bf16": p.mfu, "memory_gb": p.memory_gb, "gpu_hours_per_trillion": p.gpu_hours_per_t,
        "total_gpu_hours": p.total_gpu_hours, "total_cost": p.total_cost, "comm_to_compute": p.comm_to_compute,
        "chunk_s": {k: getattr(p.chunk, k) for k in ("f", "b", "w", "comm_f", "comm_b", "p2p")},
    }  # fmt: skip


def parse_layout(items: list[str], base: TrainLayout | None = None) -> TrainLayout:
    """`field=value` items over `base` (default: V3's pre-training layout)."""
    hints, changes = get_type_hints(TrainLayout), {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r}: expected layout field=value")
        check_known_fields(TrainLayout, {key: None}, "train layout field")
        changes[key] = parse_typed(key, raw, hints[key])
    return dataclasses.replace(base or TrainLayout(), **changes)


def resolve_model(spec: str) -> ModelConfig:
    from dsv3.config import PRESETS

    return ModelConfig.from_preset(spec) if spec in PRESETS else ModelConfig.from_hf(spec)


def plan_train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dsv3 plan train",
        description="Step time, bubble, MFU, memory and GPU-hours of a training layout (docs/planning.md).",
    )
    p.add_argument("--model", default="671b", help="preset or config.json (default 671b)")
    p.add_argument("--hardware", default="H800", help="preset (H800, H100, H200, B200, cpu) or profile file")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="hardware override")
    p.add_argument("layout", nargs="*", metavar="FIELD=VALUE",
                   help=f"layout fields: {', '.join(f.name for f in dataclasses.fields(TrainLayout))}")  # fmt: skip
    p.add_argument("--timeline", help="write the step's timeline as a PNG here")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    hw = resolve_hardware(args.hardware, args.set)
    plan = plan_train(resolve_model(args.model), hw, parse_layout(args.layout))
    print(json.dumps(plan_json(plan), indent=2) if args.json else format_plan(plan, hw))
    if args.timeline:
        from dsv3.parallel.pipeline.timeline import draw_timeline

        title = f"{plan.layout.schedule}, {hw.name}: step {plan.step_time:.2f} s, bubble {plan.bubble:.2f} s"
        print(f"timeline: {draw_timeline(plan.sim, Path(args.timeline), title)}")
    return 0
