"""The cost model against DeepSeek's own kernel timings: their published training trace.

    git clone https://github.com/deepseek-ai/profile-data    # train.json, 3 MB
    .venv/bin/python bench/planner_trace.py --trace profile-data/train.json [--validate]

The trace (PyTorch profiler, H800, EP64, TP1, 4K-token sequences, an even expert balance) is one
DualPipe pair: a forward chunk and a backward chunk of 4 MoE layers each, overlapped, with the
pipeline's own messages left out. This script sorts its GPU kernels by kind (`dsv3.planner.trace`)
and prints them beside the planner's prediction of the same pair: 4 of V3's MoE blocks forward
and backward (with recomputation) over one 4,096-token micro-batch at EP64 in FP8, computed on the
SMs DeepEP leaves (the `TrainLayout` default, 20 of 132), and the all-to-all of the 4 forward
and 4 backward layers.

Each kind's "efficiency the trace implies" is the efficiency at which the planner would predict
the trace's time for it (the default efficiency x planner / trace: the parts are rate-bound at
these sizes). `--validate` then prints the validation table of docs/planning.md
(bench/planner_validation.py) with those efficiencies in place of the defaults: one set for every
row, taken from DeepSeek's kernel timings rather than from any published total.
"""

from __future__ import annotations

import argparse
import sys

from dsv3 import ModelConfig
from dsv3.config import ConfigError
from dsv3.planner import cost
from dsv3.planner.hardware import resolve_hardware
from dsv3.planner.trace import load_kernels, summarise
from dsv3.planner.train import TrainLayout, costs_by_kind

V3 = ModelConfig.from_preset("671b")
# the planner's kind of work for each kind of kernel in the trace
KIND = {"gemm": "gemm", "attention": "attention_core", "other": "elementwise"}
EFF = {"gemm": "gemm_eff", "attention": "attn_eff", "other": "elt_eff"}


def predicted(hw, layers: int, tokens: int, ep: int, sm_fraction: float) -> dict[str, float]:
    """Seconds of the trace's chunk pair by the planner: compute by kind on the SMs left to it,
    and the all-to-all of the pair's MoE layers."""
    first = V3.n_dense_layers
    pairs = cost.causal_pairs(tokens)
    fwd, bwd, _ = costs_by_kind(
        V3, hw, tokens, pairs, True, ep, True, range(first, first + layers), last=False
    )
    out = {k: (fwd[v] + bwd[v]) / (1 - sm_fraction) for k, v in KIND.items()}
    copies = cost.expected_copies(V3, ep, hw.gpus_per_node, True)
    K = V3.n_activated_experts
    f = cost.traffic(copies, tokens, V3.dim, K, "fp8", "bf16").seconds(hw)
    b = cost.traffic(copies, tokens, V3.dim, K, "bf16", "bf16").seconds(hw)
    out["communication"] = layers * (f + b)
    out["compute"] = sum(out[k] for k in KIND)
    out["pair"] = max(out["compute"], out["communication"])  # the planner's F&B rule
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, help="a Chrome-format trace, e.g. profile-data/train.json")
    p.add_argument("--hardware", default="H800")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--layers", type=int, default=4, help="MoE layers per chunk in the trace")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch in the trace")
    p.add_argument("--ep", type=int, default=64)
    p.add_argument(
        "--validate", action="store_true", help="the validation table with the implied efficiencies"
    )
    args = p.parse_args()
    hw = resolve_hardware(args.hardware, args.set)
    sm = TrainLayout().comm_sm_fraction
    s = summarise(load_kernels(args.trace))
    pred = predicted(hw, args.layers, args.tokens, args.ep, sm)
    print(f"trace {args.trace}: {sum(s.count.values())} GPU kernels on streams "
          + ", ".join(f"{k} ({v / 1e3:.1f} ms)" for k, v in s.streams.items()))  # fmt: skip
    print(f"planner: {args.layers} MoE blocks of 671b, forward + backward (recomputation), {args.tokens} tokens, "
          f"EP{args.ep}, FP8, compute on {1 - sm:.3f} of the SMs; profile {hw.name}\n")  # fmt: skip
    print("| kind | trace (ms) | planner (ms) | trace / planner | efficiency the trace implies |")
    print("|---|---:|---:|---:|---:|")
    implied = {}
    for k, field in EFF.items():
        t, q = s.busy_kind_us[k] / 1e3, pred[k] * 1e3
        implied[field] = round(min(1.0, getattr(hw, field) * q / t), 3)
        print(f"| {k} ({KIND[k]}), {s.count[k]} kernels | {t:.1f} | {q:.1f} | {t / q:.2f} | "
              f"{field} {implied[field]:.3f} (default {getattr(hw, field):.2f}) |")  # fmt: skip
    rows = [
        ("computation (union of its kernels)", s.compute_busy_us, pred["compute"]),
        ("communication (DeepEP kernels busy; planner: wire time)", s.comm_busy_us, pred["communication"]),
        ("exposed communication (span - computation)", s.exposed_comm_us, pred["pair"] - pred["compute"]),
        ("the F&B pair (span of its kernels)", s.span_us, pred["pair"]),
    ]
    for what, t, q in rows:
        t, q = t / 1e3, q * 1e3
        ratio = f"{t / q:.2f}" if q > 0 else "-"
        print(f"| {what} | {t:.1f} | {q:.1f} | {ratio} | |")
    print("\nimplied: " + " ".join(f"--set {k}={v}" for k, v in implied.items()))
    if args.validate:
        import planner_validation as pv  # bench/ is on sys.path when this file runs as a script

        hw2 = hw.replace(**implied)
        print(f"\nvalidation with the implied efficiencies ({hw2.name}: "
              + ", ".join(f"{f} {getattr(hw2, f)}" for f in pv.EFFICIENCIES) + ")\n")  # fmt: skip
        print(pv.table(hw2))
        print()
        print(pv.full_load_table(hw2))
        print()
        print("\n".join(pv.bubble_rows(hw2)))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a bad trace or --set: one line, exit 2
        print(f"planner_trace: {e}", file=sys.stderr)
        raise SystemExit(2) from None
