"""`dsv3 plan eplb`: plan redundant experts from recorded loads, print the balance, draw a heatmap.

    dsv3 plan eplb --loads FILE --replicas R --groups G --nodes N --gpus P
                   [--policy auto|hierarchical|global] [--current PLAN --max-moves M]
                   [--heatmap out.png] [--out plan.safetensors]

FILE is a statistics file of `stats.ExpertLoadStats` (safetensors) or JSON {"loads": [[...]]}.
"Before" is the layout without EPLB (expert e on GPU floor(e*P/E), or the --current plan); "moved"
counts the expert copies the new plan needs (`placement.moved_experts`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dsv3.infer.eplb.placement import (
    Placement,
    balancedness,
    loads_from_counts,
    moved_experts,
    unreplicated_counts,
)
from dsv3.infer.eplb.planner import POLICIES, check_args, plan
from dsv3.infer.eplb.stats import read_loads


def save_plan(placement: Placement, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {"phy2log": placement.phy2log, "log2phy": placement.log2phy, "logcnt": placement.logcnt}
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"num_gpus": str(placement.num_gpus)},
    )


def load_plan(path: str | Path) -> Placement:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        num_gpus = int((f.metadata() or {})["num_gpus"])
        phy2log, logcnt = f.get_tensor("phy2log"), f.get_tensor("logcnt")
    return Placement.from_phy2log(phy2log, logcnt.shape[1], num_gpus)


def heatmap(
    before: torch.Tensor,
    after: torch.Tensor,
    path: str | Path,
    title: str = "",
    labels: tuple[str, str] = ("before", "after"),
) -> None:
    """Draw GPU loads [L, P] before and after, each normalised by its layer's mean, on one scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = [x / x.mean(1, keepdim=True).clamp(min=1e-30) for x in (before.double(), after.double())]
    vmax = max(2.0, float(max(r.max() for r in rel)))
    L, P = before.shape
    fig, axes = plt.subplots(
        1, 2, figsize=(12, max(3.0, 0.12 * L + 1.5)), sharey=True, constrained_layout=True
    )
    for ax, r, name in zip(axes, rel, labels):
        im = ax.imshow(r.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{name}: mean max/mean {balancedness(r).mean():.3f}")
        ax.set_xlabel("GPU")
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes, label="GPU load / layer mean")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(weight: torch.Tensor, before: torch.Tensor, after: torch.Tensor, moved: torch.Tensor) -> str:
    """Text lines: balancedness before/after (mean and worst layer), moved experts."""
    b, a = balancedness(before), balancedness(after)
    return "\n".join(
        [
            f"layers {weight.shape[0]}, experts {weight.shape[1]}, tokens {int(weight.sum()):,}",
            f"max/mean GPU load  before: mean {b.mean():.4f}  worst layer {b.max():.4f}",
            f"max/mean GPU load  after:  mean {a.mean():.4f}  worst layer {a.max():.4f}",
            f"experts moved: {int(moved.sum())} ({moved.float().mean():.1f} per layer)",
        ]
    )


def _read(option: str, path: str, reader):
    """reader(path), or a UsageError naming the option and the file when it is missing or garbled."""
    from safetensors import SafetensorError

    from dsv3.cli import UsageError

    try:
        return reader(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise UsageError(f"{option} {path}: cannot read it ({type(e).__name__}: {e})") from None


def plan_eplb_main(argv: list[str] | None = None) -> int:
    """Entry point of `dsv3 plan eplb`; returns the process exit code."""
    ap = argparse.ArgumentParser(prog="dsv3 plan eplb", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--loads", required=True, help="expert-load statistics (safetensors from ExpertLoadStats, or JSON)"
    )
    ap.add_argument("--replicas", type=int, required=True, help="physical expert slots per layer (R)")
    ap.add_argument("--groups", type=int, required=True, help="expert groups (n_expert_groups)")
    ap.add_argument("--nodes", type=int, required=True, help="nodes (N)")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs (P), R/P slots each")
    ap.add_argument("--policy", choices=POLICIES, default="auto", help="auto: hierarchical when N divides G")
    ap.add_argument("--current", help="current plan (safetensors from --out): report moves from it")
    ap.add_argument(
        "--max-moves", type=int, help="with --current: incremental mode, at most M moved experts per layer"
    )
    ap.add_argument("--heatmap", help="write a GPU-load heatmap PNG here")
    ap.add_argument("--out", help="write the plan (phy2log, log2phy, logcnt) as safetensors here")
    args = ap.parse_args(argv)
    weight = _read("--loads", args.loads, read_loads).double()
    current = _read("--current", args.current, load_plan) if args.current else None
    try:
        resolved = check_args(weight, args.replicas, args.groups, args.nodes, args.gpus, args.policy)
        if args.max_moves is not None and args.current is None:
            raise ValueError("max-moves: needs --current (the placement to move from)")
        t0 = time.perf_counter()
        if current is not None and args.max_moves is not None:
            from dsv3.infer.eplb.incremental import rebalance_incremental

            new = rebalance_incremental(
                weight, current, args.max_moves, args.groups, args.nodes, policy=args.policy
            )
        else:
            new = plan(weight, args.replicas, args.groups, args.nodes, args.gpus, policy=args.policy)
        seconds = time.perf_counter() - t0
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"dsv3 plan eplb: error: {e}", file=sys.stderr)
        return 2
    L, E = weight.shape
    if current is not None:
        old_counts = current.gpu_counts()
        before = current.gpu_loads(weight)
    else:
        old_counts = unreplicated_counts(L, E, args.gpus)
        before = loads_from_counts(weight, old_counts)
    after = new.gpu_loads(weight)
    moved = moved_experts(old_counts, new.gpu_counts())
    print(
        f"policy {resolved}: {args.replicas} slots on {args.gpus} GPUs in {args.nodes} nodes, "
        f"{args.groups} groups"
    )
    print(summary(weight, before, after, moved))
    print(f"same-GPU duplicate replicas: {int(new.duplicates().sum())}; planning time {seconds:.3f} s")
    if args.heatmap:
        heatmap(
            before,
            after,
            args.heatmap,
            f"EPLB {resolved}: {E} experts, {args.replicas} slots, {args.gpus} GPUs",
        )
        print(f"heatmap: {args.heatmap}")
    if args.out:
        save_plan(new, args.out)
        print(f"plan: {args.out}")
    return 0


if __name__ == "__main__":
    from dsv3.errors import run_cli

    raise SystemExit(run_cli("dsv3 plan eplb", plan_eplb_main))
