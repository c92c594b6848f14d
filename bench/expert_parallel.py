"""Expert parallelism on 2 and 4 CPU processes (gloo): tokens/s and bytes exchanged, EP against the
naive alternative (all-gather every token to every rank), and cross-node bytes with and without
node-limited routing, one hop and two hops (DESIGN §5, paper §3.2.2).

    .venv/bin/python bench/expert_parallel.py [--tokens 1024] [--dim 256] [--inter 256] [--experts 16]
        [--topk 2] [--steps 6] [--worlds 2,4]

One MoE layer (routed experts only, no shared expert, FP32), forward + backward, `--tokens` tokens
per rank. Throughput is global tokens per second (every rank's tokens); bytes are what one rank
sends to other ranks per step (forward and backward, payload and routing metadata), averaged over
ranks. "1 process" runs the same global batch in one process (all cores) for scale. On this 2-core
machine 4 processes share 2 cores, so the 4-rank times measure overheads, not scaling.

Bytes per token and direction (R ranks, K experts per token, D dim, 4 bytes per value):
EP one hop sends K*D*(R-1)/R values (copies for other ranks); the all-gather sends D*(R-1), so EP
wins when K < R -- at V3's scale (K = 8, R = 64) by 8x -- and the compute is the same (each rank
runs its experts on the copies routed to them either way).
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv3 import ModelConfig
from dsv3.parallel.expert.dispatch import Placement
from dsv3.parallel.launch import run_ranks


def layer_config(a: argparse.Namespace, groups: int = 1, limited: int = 1) -> ModelConfig:
    return ModelConfig.from_preset(
        "tiny", dim=a.dim, moe_inter_dim=a.inter, n_routed_experts=a.experts, n_activated_experts=a.topk,
        n_shared_experts=0, n_expert_groups=groups, n_limited_groups=limited,
    )  # fmt: skip


def make_layer(cfg: ModelConfig):
    from dsv3.model.moe import MoE

    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return moe


def time_steps(moe, x: torch.Tensor, g: torch.Tensor, steps: int, barrier=None) -> float:
    """Seconds per forward + backward step (after 2 warm-up steps)."""
    for i in range(steps + 2):
        if i == 2:
            if barrier:
                barrier()
            t0 = time.perf_counter()
        x.grad = None
        moe(x[None])[0].backward(g)
    if barrier:
        barrier()
    return (time.perf_counter() - t0) / steps


def worker(rank, world, a, cases):
    import torch.distributed as dist

    from dsv3.parallel.expert.moe import AllGatherMoE, ExpertParallel, ExpertParallelMoE
    from dsv3.parallel.mesh import build_mesh

    meshes, out = {}, {}
    for name, kind, rpn, groups, limited, two_hop, wire in cases:
        if rpn not in meshes:
            meshes[rpn] = build_mesh(ep=world, ranks_per_node=rpn)
        cfg = layer_config(a, groups, limited)
        ep = ExpertParallel.from_mesh(meshes[rpn], cfg, two_hop, wire, "bf16" if wire != "same" else "same")
        moe = (AllGatherMoE if kind == "naive" else ExpertParallelMoE).from_moe(make_layer(cfg), ep)
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(a.tokens, a.dim, generator=gen).requires_grad_(True)
        grad = torch.randn(a.tokens, a.dim, generator=gen)
        ep.stats.reset()
        seconds = time_steps(moe, x, grad, a.steps, dist.barrier)
        sent = {k: v / (a.steps + 2) for k, v in ep.stats.sent.items()}  # per step
        out[name] = {"seconds": seconds, "sent": sent, "max_nodes": moe.last_max_nodes}
    return out


def mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--inter", type=int, default=256, help="expert hidden size")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--worlds", default="2,4")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (more than cores/processes contends)",
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    worlds = [int(w) for w in a.worlds.split(",")]

    print(f"MoE layer: dim {a.dim}, {a.experts} experts x {a.inter}, top-{a.topk}, {a.tokens} tokens per rank, "
          f"FP32, forward + backward\n")  # fmt: skip
    print("| ranks | method | global tokens/s | MB sent per rank per step | of which routing metadata |")
    print("|---|---|---|---|---|")
    for world in worlds:
        cfg = layer_config(a)
        moe = make_layer(cfg)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(world * a.tokens, a.dim, generator=gen).requires_grad_(True)
        single = time_steps(moe, x, torch.randn_like(x), a.steps)
        print(
            f"| {world} | 1 process (all {world * a.tokens} tokens, {a.threads} thread) | {world * a.tokens / single:,.0f} | 0 | 0 |"
        )
        cases = [
            ("ep", "ep", world, 1, 1, False, "same"),
            ("ep_fp8", "ep", world, 1, 1, False, "fp8"),
            ("naive", "naive", world, 1, 1, False, "same"),
        ]
        res = run_ranks(worker, world, a, cases, timeout=120, deadline=900, threads=a.threads)
        labels = {"ep": "EP all-to-all (FP32)", "ep_fp8": "EP all-to-all (FP8 dispatch, BF16 combine)",
                  "naive": "all-gather tokens + reduce-scatter outputs"}  # fmt: skip
        for name, label in labels.items():
            seconds = max(r[name]["seconds"] for r in res)
            sent = sum(sum(r[name]["sent"].values()) for r in res) / world
            meta = (
                sum(sum(v for k, v in r[name]["sent"].items() if k.startswith("meta")) for r in res) / world
            )
            print(f"| {world} | {label} | {world * a.tokens / seconds:,.0f} | {mb(sent)} | {mb(meta)} |")

    if 4 in worlds:
        b = argparse.Namespace(**{**vars(a), "topk": 2 * a.topk})
        print(f"\nCross-node traffic, 4 ranks, top-{b.topk} of {a.experts} experts, one expert group per node "
              "(forward dispatch + combine, MB per rank per step):\n")  # fmt: skip
        print(
            "| nodes x ranks | routing | dispatch | nodes/token bound | max seen | cross-node MB | intra-node MB |"
        )
        print("|---|---|---|---|---|---|---|")
        cases = []
        for rpn in (1, 2):
            nodes = 4 // rpn
            for limited in (nodes // 2, nodes):  # M = half the nodes, or no limit
                for two_hop in (False, True):
                    cases.append((f"{rpn}-{limited}-{two_hop}", "ep", rpn, nodes, limited, two_hop, "same"))
        res = run_ranks(worker, 4, b, cases, timeout=120, deadline=900, threads=a.threads)
        for name, _, rpn, groups, limited, two_hop, _ in cases:
            bound = Placement(a.experts, 4, rpn, groups, limited).max_nodes
            seen = max(r[name]["max_nodes"] for r in res)
            sent = [
                (k, v)
                for r in res
                for k, v in r[name]["sent"].items()
                if k.split(".")[0] in ("dispatch", "combine")
            ]
            inter = sum(v for k, v in sent if k.endswith(".inter")) / 4
            intra = sum(v for k, v in sent if k.endswith(".intra")) / 4
            routing = f"node-limited (M = {limited})" if limited < groups else "unlimited"
            print(f"| {4 // rpn} x {rpn} | {routing} | {'two hops' if two_hop else 'one hop'} | {bound} | {seen} | "
                  f"{mb(inter)} | {mb(intra)} |")  # fmt: skip

    K, R = 8, 64
    print(f"\nAt V3's scale (K = {K}, R = {R}): values sent per token and direction, EP {K * (R - 1) / R:.2f} D "
          f"vs all-gather {R - 1} D ({(R - 1) / (K * (R - 1) / R):.1f}x).")  # fmt: skip


if __name__ == "__main__":
    main()
