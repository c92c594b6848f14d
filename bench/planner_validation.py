"""The planner against DeepSeek's published figures: the validation table of docs/planning.md.

    .venv/bin/python bench/planner_validation.py [--hardware H800] [--set gemm_eff=0.6 ...] [--fit]

Every row is the planner's output for the published setting with ONE hardware profile (the H800
preset and its default efficiencies, or the overrides given, applied to every row alike). No
machine is timed here: the numbers are the model's, so they are the same on any machine.

Settings taken from the publications, not chosen to fit:
  serving   the request mix of DeepSeek's day of production (inference-system blog, Feb 2025):
            608B input tokens (56.3% cache hits) and 168B output tokens a day, mean KV length
            4,989 tokens per output token -> input 4,384 and output 1,211 tokens per request
            (input/output = 608/168 and input + output/2 = 4,989); decode SLO 1000/21 ms
            (20-22 tokens/s per user); the prefill and decode units of §3.4, and those the blog
            names for the production system (prefill: attention/shared expert DP32 with EP32 over
            4 nodes; decode: DP144 with EP144 over 18 nodes, 2 routed experts and the shared
            expert on every GPU; 32 redundant experts in both).
  training  §3.1/§4.2: 2048 H800, PP16 DualPipe, EP64 over 8 nodes, ZeRO-1, FP8, batch 15360 x 4K,
            14.8T tokens. Context extension (§4.3): 1000 steps at 32K (batch 1920) and 1000 at
            128K (batch 480); the planner needs >= 2 PP micro-batches per step for DualPipe, so
            those phases are planned at batch 128 x 32 sequences and charged per token.
"""

from __future__ import annotations

import argparse

from dsv3 import ModelConfig
from dsv3.planner.hardware import PRESETS, resolve_hardware
from dsv3.planner.serve import ServeLayout, plan_serve
from dsv3.planner.train import TrainLayout, plan_train

V3 = ModelConfig.from_preset("671b")
MIX = dict(input_len=4384, output_len=1211, cache_hit=0.563, tpot_ms=1000 / 21)
# the units of the inference-system blog (the source of the published per-node figures)
BLOG = dict(prefill_tp=1, decode_gpus=144, decode_tp=1, decode_ep=144, shared_as_routed=False)
EXTENSION = [(32768, 1000 * 1920 * 32768), (131072, 1000 * 480 * 131072)]  # (seq, tokens) per phase


def rows(hw) -> list[tuple[str, float | None, float, str]]:
    """(what, planner, published, unit)."""
    s = plan_serve(V3, hw, ServeLayout(**MIX))
    out: list[tuple[str, float | None, float, str]] = [
        ("prefill input tokens/s per node (cache hits counted)", s.prefill.input_tps_per_node, 73.7e3, "tokens/s"),
        ("decode output tokens/s per node", s.decode.output_tps_per_node, 14.8e3, "tokens/s"),
        ("decode tokens/s per user (at the SLO's batch)", 1 / s.decode.tpot_s, 21.0, "tokens/s"),
    ]  # fmt: skip
    b = plan_serve(V3, hw, ServeLayout(**MIX, **BLOG))
    out += [
        ("prefill, the blog's unit (DP32 x EP32)", b.prefill.input_tps_per_node, 73.7e3, "tokens/s"),
        ("decode, the blog's unit (DP144 x EP144)", b.decode.output_tps_per_node, 14.8e3, "tokens/s"),
    ]  # fmt: skip
    pre = plan_train(V3, hw, TrainLayout())
    out.append(("pre-training GPU-hours per trillion tokens", pre.gpu_hours_per_t, 180e3, "GPU-h"))
    out.append(("pre-training GPU-hours, 14.8T tokens", pre.total_gpu_hours, 2.664e6, "GPU-h"))
    ext = 0.0
    for seq, tokens in EXTENSION:
        p = plan_train(V3, hw, TrainLayout(seq_len=seq, global_batch=128 * 32, tokens=tokens))
        ext += p.total_gpu_hours
    out.append(("context extension GPU-hours (32K + 128K)", ext, 119e3, "GPU-h"))
    out.append(("post-training GPU-hours", None, 5e3, "GPU-h"))
    out.append(
        ("total GPU-hours (post-training as published)", pre.total_gpu_hours + ext + 5e3, 2.788e6, "GPU-h")
    )
    out.append(
        ("DualPipe: all-to-all / computation per chunk (§3.2.1: ~1:1)", pre.comm_to_compute, 1.0, "ratio")
    )
    out.append(
        (
            "DualPipe: exposed all-to-all share of the step (§3.2.1: ~0)",
            (pre.exposed_comm - pre.dp_comm) / pre.step_time,  # ZeRO-1's exchanges are not all-to-all
            0.0,
            "share",
        )
    )
    f1 = plan_train(V3, hw, TrainLayout(schedule="1f1b"))
    out.append(
        (
            "1F1B: exposed all-to-all share of the step (no overlap)",
            (f1.exposed_comm - f1.dp_comm) / f1.step_time,
            float("nan"),
            "share",
        )
    )
    out.append(("ZeRO-1 exchanges' share of the DualPipe step (not overlapped)", pre.dp_comm / pre.step_time,
                float("nan"), "share"))  # fmt: skip
    out.append(("DualPipe step time vs 1F1B", pre.step_time / f1.step_time, float("nan"), "ratio"))
    return out


# Full-load measurements (no idle headroom, unlike the day's averages above): DeepSeek's own profile
# (deepseek-ai/profile-data's prefill.json / decode.json, as LMSYS read them in their large-scale EP
# blog of 2025-05-05) and SGLang's runs on 12 x 8 H100 in the same blog. Prefill: TP1/DP attention,
# EP32, 16,384 tokens per GPU in two micro-batches, no cache hits; the planner's loads are uniform,
# so SGLang's "simulated perfect EPLB" run is its like (its default-EPLB runs are shown too).
# Decode: TP1, the shared expert on every GPU; KV length = input + output / 2.
_PRE = dict(prefill_tp=1, prefill_tokens=16384, cache_hit=0.0)
_DEC = dict(decode_tp=1, shared_as_routed=False)
FULL_LOAD = [
    ("H800", "p", dict(**_PRE, input_len=4096), 62713, "DeepSeek profile prefill, 4K prompts (balanced routing)"),
    ("H100", "p", dict(**_PRE, input_len=4096), 59337, "SGLang prefill EP32, 4K, simulated perfect EPLB"),
    ("H100", "p", dict(**_PRE, input_len=4096), 50302, "SGLang prefill EP32, 4K, default EPLB"),
    ("H100", "p", dict(**_PRE, input_len=2048), 54543, "SGLang prefill EP32, 2K, default EPLB"),
    ("H100", "p", dict(**_PRE, input_len=1024), 57674, "SGLang prefill EP32, 1K, default EPLB"),
    ("H800", "d", dict(**_DEC, decode_gpus=128, decode_ep=128, decode_redundant=0, batch=128, input_len=4095,
                       output_len=2, mtp=True, mtp_acceptance=0.6),
     18598, "DeepSeek profile decode EP128, batch 128, KV 4K (MTP, 60% accepted: LMSYS's assumption)"),
    ("H100", "d", dict(**_DEC, decode_gpus=72, decode_ep=72, decode_redundant=32, batch=256, input_len=1950,
                       output_len=100, mtp=False),
     22282, "SGLang decode EP72, batch 256, 2K input, no MTP"),
]  # fmt: skip


def on(hw, preset: str):
    """The hardware `preset` with `hw`'s software terms (efficiencies and latencies)."""
    soft = (*EFFICIENCIES, "flash_attention", "kernel_us", "net_latency_us")
    return PRESETS[preset].replace(**{f: getattr(hw, f) for f in soft})


def full_load_table(hw) -> str:
    lines = [
        "| full-load figure (per node) | planner | published | planner / published |",
        "|---|---:|---:|---:|",
    ]
    for preset, kind, lay, want, what in FULL_LOAD:
        r = plan_serve(V3, on(hw, preset), ServeLayout(**lay))
        got = r.prefill.computed_tps_per_node if kind == "p" else r.decode.output_tps_per_node
        miss = "" if abs(got / want - 1) <= 0.2 else " (misses 20%)"
        lines.append(f"| {what} ({preset}) | {got / 1e3:.1f}K | {want / 1e3:.1f}K | {got / want:.2f}{miss} |")
    return "\n".join(lines)


def bubble_rows(hw) -> list[str]:
    """DESIGN §5 / Table 2 at the paper's PP = 16: the simulated bubble of each schedule with the
    cost model's chunk costs and free communication, beside the formula."""
    lines = ["| schedule | simulated bubble (s) | formula (s) | formula exact? |", "|---|---:|---:|---|"]
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        gpus = 1024 if name == "dualpipev" else 2048
        p = plan_train(V3, hw, TrainLayout(gpus=gpus, schedule=name, communication=False))
        lines.append(
            f"| {name} | {p.bubble:.3f} | {p.formula_bubble:.3f} | {'yes' if p.formula_caveat is None else p.formula_caveat.split('(')[0].strip()} |"
        )
    return lines


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "not modelled"
    if v != v:
        return "-"
    if unit in ("ratio", "share"):
        return f"{v:.2f}"
    return f"{v / 1e6:.3f}M" if v >= 1e6 else f"{v / 1e3:.1f}K" if v >= 1e4 else f"{v:,.1f}"


def table(hw) -> str:
    lines = ["| figure | planner | published | planner / published |", "|---|---:|---:|---:|"]
    for what, got, want, unit in rows(hw):
        ratio = "-" if got is None or want != want or want == 0 else f"{got / want:.2f}"
        miss = "" if ratio == "-" or abs(got / want - 1) <= 0.2 else " (misses 20%)"
        lines.append(f"| {what} | {_fmt(got, unit)} | {_fmt(want, unit)} | {ratio}{miss} |")
    return "\n".join(lines)


EFFICIENCIES = ("gemm_eff", "attn_eff", "hbm_eff", "elt_eff", "net_eff")


def scaled(hw, s: float):
    """`hw` with every efficiency multiplied by s (one end-to-end factor)."""
    return hw.replace(**{f: getattr(hw, f) * s for f in EFFICIENCIES})


def fit_scale(hw, target: float = 180e3) -> float:
    """The one factor that makes the pre-training row match its published GPU-hours per trillion
    tokens (bisection; GPU-hours fall as the efficiencies rise)."""
    lo, hi = 0.05, 1.0 / max(getattr(hw, f) for f in EFFICIENCIES)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (
            (mid, hi)
            if plan_train(V3, scaled(hw, mid), TrainLayout()).gpu_hours_per_t > target
            else (lo, mid)
        )
    return (lo + hi) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hardware", default="H800")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--fit", action="store_true",
                   help="scale every efficiency by the one factor fitted on the pre-training row")  # fmt: skip
    args = p.parse_args()
    hw = resolve_hardware(args.hardware, args.set)
    if args.fit:
        s = fit_scale(hw)
        hw = scaled(hw, s)
        print(f"one factor fitted on the pre-training GPU-hours: {s:.4f} x every efficiency")
    eff = {f: getattr(hw, f) for f in (*EFFICIENCIES, "flash_attention", "kernel_us")}
    print(f"profile {hw.name}: {eff}\n")
    print(table(hw))
    print()
    print(full_load_table(hw))
    print()
    print("\n".join(bubble_rows(hw)))


if __name__ == "__main__":
    main()
