"""EPLB benchmark at the paper's scale: balancedness and planning time, ours vs the plain greedy.

    .venv/bin/python bench/eplb.py [--loads FILE] [--layers 58] [--skews 0,0.3,0.6,1.0] [--docs]

Shapes (DESIGN §8): 58 MoE layers, 256 routed experts in 8 groups;
  prefill unit: 32 GPUs in 4 nodes, 288 slots (8 experts + 1 redundant per GPU), hierarchical;
  decode unit:  320 GPUs in 40 nodes, one slot each, global (8 groups do not divide over 40 nodes);
  decode+shared: the same with the shared expert as a 257th routed expert whose load is one per
                token (every token selects 9), as the paper's decode unit does.
Loads: Zipf-like, expert i of a layer gets tokens ~ 1/rank^s (ranks shuffled per layer), sampled as
multinomial counts of 65,536 tokens x 8 experts; and counts recorded from a `small` model (16
experts), scaled up to 256 by interpolating each layer's sorted load profile: by default
docs/data/small_loads.safetensors, recorded by bench/record_loads.py from the model `make demo`
trains; without that file, counts from a RANDOM-INIT small model, labelled as a stand-in. Baseline: the plain greedy hierarchical algorithm of DESIGN §8 (`baseline_plan`,
plain Python, one layer at a time). Also measured: incremental re-planning with a move budget and
dynamic redundancy (16 hosted, 9 active per GPU) on the prefill unit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dsv3.infer.eplb.dynamic import dynamic_step, plan_hosting
from dsv3.infer.eplb.incremental import rebalance_incremental
from dsv3.infer.eplb.placement import (
    Placement,
    balancedness,
    loads_from_counts,
    moved_experts,
    unreplicated_counts,
)
from dsv3.infer.eplb.planner import plan
from dsv3.infer.eplb.report import heatmap

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 65536 * 8  # routed token copies per layer in the statistics window


# ---- the baseline: DESIGN §8's greedy, written plainly --------------------------------------------
def baseline_plan(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """The plain greedy of DESIGN §8, one layer at a time in plain Python -> phy2log [L][R]."""
    E = len(weight[0])
    if num_groups % num_nodes:  # global policy: one group, one node
        num_groups, num_nodes = 1, 1
    gsize, Rn, Pn = E // num_groups, num_replicas // num_nodes, num_gpus // num_nodes
    out = []
    for w in weight:
        groups = [sum(w[g * gsize : (g + 1) * gsize]) for g in range(num_groups)]
        row = []
        for members in _pack(groups, num_nodes):  # (1) groups -> nodes
            experts = [g * gsize + i for g in members for i in range(gsize)]
            wl = [w[e] for e in experts]
            cnt = [1] * len(experts)
            for _ in range(Rn - len(experts)):  # (2) extra replica -> largest load per replica
                per = [wl[i] / cnt[i] for i in range(len(experts))]
                cnt[per.index(max(per))] += 1
            items = [i for i in range(len(experts)) for _ in range(cnt[i])]
            loads = [wl[i] / cnt[i] for i in items]
            for gpu in _pack(loads, Pn):  # (3) replicas -> GPUs
                row += sorted(experts[items[j]] for j in gpu)
        out.append(row)
    return out


def _pack(loads, num_packs):
    """Heaviest first, each to the lightest pack with a free slot (equal counts per pack)."""
    cap = len(loads) // num_packs
    packs, total = [[] for _ in range(num_packs)], [0.0] * num_packs
    for i in sorted(range(len(loads)), key=lambda i: -loads[i]):
        p = min((p for p in range(num_packs) if len(packs[p]) < cap), key=lambda p: total[p])
        packs[p].append(i)
        total[p] += loads[i]
    return packs


# ---- loads ----------------------------------------------------------------------------------------
def zipf_loads(L: int, E: int, s: float, gen: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, E + 1, dtype=torch.float64) ** -s
    probs = torch.stack([ranks[torch.randperm(E, generator=gen)] for _ in range(L)])
    return sample(probs, gen)


def sample(probs: torch.Tensor, gen: torch.Generator, tokens: int = TOKENS) -> torch.Tensor:
    """Multinomial token counts [L, E] from per-layer probabilities."""
    idx = torch.multinomial(probs.float(), tokens, replacement=True, generator=gen)
    return torch.zeros_like(probs, dtype=torch.long).scatter_add_(1, idx, torch.ones_like(idx)).double()


def scale_up(counts: torch.Tensor, L: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """Recorded counts [l, e] -> [L, E]: each layer's sorted load profile interpolated to E experts
    (so max/mean and the shape of the skew carry over), shuffled, layers cycled."""
    counts = counts[counts.sum(1) > 0].double()  # layers that ran
    out = []
    for i in range(L):
        prof = counts[i % len(counts)].sort(descending=True).values
        prof = prof / prof.sum()
        x = torch.linspace(0, len(prof) - 1, E, dtype=torch.float64)
        lo = x.floor().long().clamp(max=len(prof) - 1)
        hi = (lo + 1).clamp(max=len(prof) - 1)
        p = prof[lo] + (prof[hi] - prof[lo]) * (x - lo)
        out.append(p[torch.randperm(E, generator=gen)])
    return sample(torch.stack(out), gen)


def small_model_counts(seed: int) -> torch.Tensor:
    """Counts recorded from a random-init `small` model on random tokens (a stand-in)."""
    from dsv3.config import ModelConfig
    from dsv3.infer.eplb.stats import ExpertLoadStats
    from dsv3.model.transformer import Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("small")
    model = Transformer(cfg).eval()
    stats = ExpertLoadStats(len(model.moe_layers()), cfg.n_routed_experts, window=8)
    stats.attach(model)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randint(0, cfg.vocab_size, (4, 256)))
    return stats.loads()


# ---- measurements ---------------------------------------------------------------------------------
SCENARIOS = {  # name: (logical experts, slots, groups, nodes, gpus, shared-as-routed)
    "prefill 32 GPUs, 288 slots, hierarchical": (256, 288, 8, 4, 32, False),
    "decode 320 GPUs, 320 slots, global": (256, 320, 8, 40, 320, False),
    "decode+shared 320 GPUs, 257 experts": (257, 320, 1, 40, 320, True),
}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_scenario(w: torch.Tensor, E, R, G, N, P, shared):
    if shared:  # the shared expert sees every token: load = routed copies / 8
        w = torch.cat([w, w.sum(1, keepdim=True) / 8], 1)
    L = w.shape[0]
    none = balancedness(loads_from_counts(w, unreplicated_counts(L, E, P)))
    base_rows, t_base = timed(lambda: baseline_plan(w.tolist(), R, G, N, P))
    base = Placement.from_phy2log(torch.tensor(base_rows), E, P)
    ours, t_ours = timed(lambda: plan(w, R, G, N, P))
    return {
        "none": none.mean().item(),
        "base": balancedness(base.gpu_loads(w)).mean().item(),
        "base_worst": balancedness(base.gpu_loads(w)).max().item(),
        "ours": balancedness(ours.gpu_loads(w)).mean().item(),
        "ours_worst": balancedness(ours.gpu_loads(w)).max().item(),
        "t_base": t_base,
        "t_ours": t_ours,
        "dup_base": int(base.duplicates().sum()),
        "dup_ours": int(ours.duplicates().sum()),
        "placements": (w, base, ours),
    }


def incremental_table(w: torch.Tensor, gen: torch.Generator, budgets=(0, 4, 16, 64)) -> list[str]:
    """Prefill unit: plan on one window, loads drift (x lognormal(0.5) per expert), re-plan."""
    E, R, G, N, P, _ = SCENARIOS["prefill 32 GPUs, 288 slots, hierarchical"]
    cur = plan(w, R, G, N, P)
    drift = sample(w / w.sum(1, keepdim=True) * torch.exp(0.5 * torch.randn(w.shape, generator=gen)), gen)
    full, t_full = timed(lambda: plan(drift, R, G, N, P))
    lines = [
        "| mode | max/mean (mean over layers) | moved experts per layer (max) | time (s) |",
        "|---|---|---|---|",
    ]
    lines.append(f"| stale plan (no move) | {balancedness(cur.gpu_loads(drift)).mean():.4f} | 0 | - |")
    for b in budgets:
        inc, t = timed(lambda b=b: rebalance_incremental(drift, cur, b, G, N))
        mv = moved_experts(cur.gpu_counts(), inc.gpu_counts())
        lines.append(
            f"| incremental, budget {b} | {balancedness(inc.gpu_loads(drift)).mean():.4f} "
            f"| {mv.max()} | {t:.2f} |"
        )
    mv = moved_experts(cur.gpu_counts(), full.gpu_counts())
    lines.append(
        f"| full re-plan | {balancedness(full.gpu_loads(drift)).mean():.4f} | {mv.max()} | {t_full:.2f} |"
    )
    return lines


def dynamic_table(w: torch.Tensor, gen: torch.Generator, steps: int, noise: float = 0.5) -> str:
    """Prefill unit: static 9 slots/GPU vs 16 hosted / 9 active, per-step loads fluctuating around
    the window's (x lognormal(noise) per expert, 16,384 tokens x 8 per step)."""
    E, R, G, N, P, _ = SCENARIOS["prefill 32 GPUs, 288 slots, hierarchical"]
    static = plan(w, R, G, N, P)
    hosting, t_host = timed(lambda: plan_hosting(w, P, 16, 9, G, N))
    probs = w / w.sum(1, keepdim=True)
    st, dy, t_step = [], [], 0.0
    for _ in range(steps):
        step = sample(probs * torch.exp(noise * torch.randn(w.shape, generator=gen)), gen, 16384 * 8).long()
        (_, quota), t = timed(lambda step=step: dynamic_step(hosting, step, 9))
        t_step += t
        st.append(balancedness(static.gpu_loads(step)).mean().item())
        dy.append(balancedness(quota.view(w.shape[0], P, -1).sum(-1).double()).mean().item())
    ms = 1e3 * t_step / (steps * w.shape[0])
    return f"{sum(st) / steps:.4f} | {sum(dy) / steps:.4f} | {t_host:.2f} | {ms:.1f}"


RECORDED = Path(__file__).resolve().parent.parent / "docs" / "data" / "small_loads.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loads", default=str(RECORDED) if RECORDED.exists() else None,
                    help=f"recorded expert counts (ExpertLoadStats file) to scale up (default: {RECORDED})")  # fmt: skip
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--skews", default="0,0.3,0.6,1.0", help="Zipf exponents")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dynamic-steps", type=int, default=3)
    ap.add_argument("--docs", action="store_true", help="write heatmaps to docs/img/eplb_*.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    L = args.layers
    loads = {f"zipf s={s}": zipf_loads(L, 256, float(s), gen) for s in args.skews.split(",")}
    if args.loads:
        from dsv3.infer.eplb.stats import read_loads

        loads[f"recorded {Path(args.loads).name}, scaled"] = scale_up(read_loads(args.loads), L, 256, gen)
    else:
        loads["small RANDOM-INIT stand-in, scaled"] = scale_up(small_model_counts(args.seed), L, 256, gen)

    print(
        "| unit | loads | no EPLB | baseline | ours | worst layer base / ours | dup slots base / ours |"
        " plan time base / ours (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    keep = {}
    for scen, (E, R, G, N, P, shared) in SCENARIOS.items():
        for name, w in loads.items():
            r = run_scenario(w, E, R, G, N, P, shared)
            keep[(scen, name)] = r["placements"]
            print(
                f"| {scen} | {name} | {r['none']:.3f} | {r['base']:.4f} | **{r['ours']:.4f}** | "
                f"{r['base_worst']:.3f} / {r['ours_worst']:.3f} | {r['dup_base']} / {r['dup_ours']} | "
                f"{r['t_base']:.2f} / {r['t_ours']:.2f} |",
                flush=True,
            )
    heavy = list(loads)[-2]
    print(f"\nIncremental re-planning (prefill unit, {heavy}, drifted loads):\n")
    print("\n".join(incremental_table(loads[heavy], gen)))
    print("\nDynamic redundancy (prefill unit, 16 hosted / 9 active per GPU):\n")
    print("| loads | static 9/GPU | dynamic 16/9 | hosting plan (s) | per layer-step (ms) |")
    print("|---|---|---|---|---|")
    for name in list(loads)[1:]:
        print(f"| {name} | {dynamic_table(loads[name], gen, args.dynamic_steps)} |", flush=True)
    if args.docs:
        img = ROOT / "docs" / "img"
        img.mkdir(parents=True, exist_ok=True)
        for (scen, name), fname in (
            (("prefill 32 GPUs, 288 slots, hierarchical", heavy), "eplb_prefill.png"),
            (("decode+shared 320 GPUs, 257 experts", heavy), "eplb_decode.png"),
        ):
            w, base, ours = keep[(scen, name)]
            heatmap(
                base.gpu_loads(w),
                ours.gpu_loads(w),
                img / fname,
                f"{scen}, {name}",
                ("baseline (DESIGN §8 greedy)", "ours"),
            )
            print(f"heatmap: {img / fname}")
        w, base, ours = keep[("prefill 32 GPUs, 288 slots, hierarchical", heavy)]
        none = loads_from_counts(w, unreplicated_counts(w.shape[0], 256, 32))
        heatmap(
            none,
            ours.gpu_loads(w),
            img / "eplb_prefill_before_after.png",
            f"prefill unit, {heavy}",
            ("no EPLB", "ours"),
        )
        print(f"heatmap: {img / 'eplb_prefill_before_after.png'}")


if __name__ == "__main__":
    main()
