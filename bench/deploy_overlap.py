"""Prefill time with and without the two-micro-batch overlap (dsv3.deploy.two_batch, paper §3.4) on
expert-parallel gloo processes, with no and with an injected all-to-all latency.

    .venv/bin/python bench/deploy_overlap.py --ranks 2 4        # on a quiet machine

Every rank holds its own prefill chunks (attention data-parallel: `--rows` x `--tokens` tokens
after `--context` cached ones, in its own paged latent cache) and 1/ranks of the routed experts
(`parallelize_experts`). Three ways to run the same prefill forward, alternating step by step so
that machine noise hits all alike:

    one       `ModelRunner.hidden`: one batch, each MoE layer's dispatch and combine waited for at once
    serial    `two_batch_hidden(overlap=False)`: the two halves, interleaved, every exchange waited at once
    overlap   `two_batch_hidden(overlap=True)`: each half's exchange in flight while the other computes

Step time: the slowest rank's wall time from a common barrier, the best of `--steps` (on a shared
machine other load only adds time). The injected latency (`Link.latency`, as in bench/pipeline.py):
a dispatch/combine all-to-all completes no earlier than that long after it started. "auto" is the measured compute time of one layer's
attention or MoE phase of the whole batch (one-batch step at 0 latency / (2 x MoE layers)): as
much all-to-all time as computation, the paper's 1:1 ratio.

Hidden share, three ways, per latency L:
    vs serial      1 - cost(overlap) / cost(serial), cost(m) = step(m, L) - step(m, 0)
    vs one batch   1 - cost(overlap) / cost(one): what the user gains over not splitting
    blocked        1 - (blocked - blocked at 0) / injected (bench/pipeline.py's definition;
                   injected = exchanges x L, blocked = time spent in all-to-all waits, mean over ranks)
Engine table (`--engine`, on by default): the same prefill through `EPEngine.step` itself -- a group
of `EPEngine`s (dsv3.deploy.ep_engine: its EP MoE layers, step agreement and padding), every rank
adding `--rows` prompts of `--tokens` tokens (max_tokens 1) and running one step that prefills
them as one [rows, tokens] forward -- with `two_batch_prefill` off ("one") and on ("two"), at the
same latencies. Step time: the slowest rank's `step`, best of `--steps`; hidden vs one batch as
above; blocked / injected over the group's dispatch/combine exchanges of the two-batch step.

Two exchanges in flight at once overlap each other's latency, so even with no computation at all
the overlapped halves hide about half of the serial halves' latency ("vs serial" and "blocked"); only
computation hides latency against one batch ("vs one batch": 0 when the latency dwarfs compute).
On a machine with fewer cores than ranks the ranks' computations take turns, which stretches
every compute phase and mixes waiting for a peer into the blocked time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from dsv3 import ModelConfig
from dsv3.deploy.two_batch import two_batch_hidden
from dsv3.infer.paged_cache import PagedLatentCache
from dsv3.infer.runner import ModelRunner
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.scheduler import Sequence
from dsv3.model.moe import MoE
from dsv3.model.transformer import Transformer
from dsv3.parallel.launch import run_ranks

MODES = ("one", "serial", "overlap")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_preset(args.preset, n_layers=args.layers, vocab_size=args.vocab)


def _prefill(model: Transformer, args: argparse.Namespace, rank: int):
    """This rank's runner, sequences, chunk rows and starts (the context already in the cache)."""
    cfg = model.config
    n = args.context + args.tokens
    cache = PagedLatentCache(cfg, args.rows * (-(-n // 16)) + 1, 16, n_layers=cfg.n_layers)
    runner = ModelRunner(model, cache, fast=False)
    gen = torch.Generator().manual_seed(100 + rank)
    seqs = []
    for i in range(args.rows):
        prompt = torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
        s = Sequence(str(i), prompt, SamplingParams(temperature=0.0), torch.Generator())
        s.block_table = cache.allocator.allocate(cache.blocks_for(n))
        seqs.append(s)
    if args.context:  # the same number of forwards on every rank: the exchanges line up
        runner.hidden(seqs, [s.tokens[: args.context] for s in seqs], [0] * args.rows, absorb=False)
    rows = [s.tokens[args.context :] for s in seqs]
    return runner, seqs, rows, [args.context] * args.rows


def _worker(rank: int, world: int, cfg: ModelConfig, args: argparse.Namespace, latencies: list) -> dict:
    from dsv3.parallel.expert.moe import ExpertParallel, parallelize_experts
    from dsv3.parallel.mesh import build_mesh

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ep = ExpertParallel.from_mesh(build_mesh(ep=world), cfg)
    parallelize_experts(model, ep)
    runner, seqs, rows, start = _prefill(model, args, rank)
    run = {
        "one": lambda: runner.hidden(seqs, rows, start, absorb=False),
        "serial": lambda: two_batch_hidden(runner, seqs, rows, start, overlap=False),
        "overlap": lambda: two_batch_hidden(runner, seqs, rows, start, overlap=True),
    }
    moe_layers = sum(isinstance(b.mlp, MoE) for b in model.layers)
    out: dict = {"steps": {}, "latencies": []}
    for latency in latencies:
        if latency == "auto":  # one layer's attention or MoE phase of the whole batch
            latency = min(s["wall"] for s in out["steps"][("one", 0.0)]) / (2 * moe_layers)
        out["latencies"].append(latency)
        for link in (ep.ep, ep.inter, ep.intra):
            link.latency = latency  # every rank changes it between the same two steps
        for i in range(args.warmup + args.steps):
            for mode in MODES:
                ep.stats.reset()
                dist.barrier()
                t = time.perf_counter()
                run[mode]()
                elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if i >= args.warmup:
                    out["steps"].setdefault((mode, latency), []).append(
                        {"wall": float(elapsed), "blocked": ep.stats.waited, "exchanges": ep.stats.exchanges}
                    )
    return out


ENGINE_MODES = ("one", "two")


def _engine_worker(
    rank: int, world: int, cfg: ModelConfig, args: argparse.Namespace, latencies: list
) -> dict:
    """Prefill steps of EPEngines with two_batch_prefill off and on (module docstring)."""
    from dsv3.deploy.ep_engine import EPConfig, EPEngine, build_engine_groups
    from dsv3.infer.engine import EngineConfig

    torch.set_num_threads(1)
    group = build_engine_groups()
    links = (group.ep, group.intra, group.inter)
    n = args.rows * args.tokens
    config = EngineConfig(block_size=16, num_blocks=4 * args.rows * (-(-args.tokens // 16)) + 8,
                          max_num_seqs=args.rows, max_num_batched_tokens=n, fast_decode=False)  # fmt: skip
    engines = {}
    for mode in ENGINE_MODES:
        torch.manual_seed(0)
        engines[mode] = EPEngine(
            Transformer(cfg).eval(), group, config, EPConfig(two_batch_prefill=mode == "two")
        )
    gen = torch.Generator().manual_seed(200 + rank)
    sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    out: dict = {"steps": {}, "latencies": []}
    for latency in latencies:
        if latency == "auto":  # as in the function table: one attention/MoE phase of the whole batch
            moe_layers = len(engines["one"].moe)
            latency = min(s["wall"] for s in out["steps"][("one", 0.0)]) / (2 * moe_layers)
        out["latencies"].append(latency)
        for link in links:
            link.latency = latency
        for i in range(args.warmup + args.steps):
            for mode in ENGINE_MODES:
                engine = engines[mode]
                for _ in range(args.rows):
                    engine.add_request(
                        torch.randint(0, cfg.vocab_size, (args.tokens,), generator=gen).tolist(), sp
                    )
                group.stats.reset()
                dist.barrier()
                t = time.perf_counter()
                done = engine.step()
                elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                assert len(done) == args.rows and all(o.finished for o in done), (
                    "one prefill step per request"
                )
                if i >= args.warmup:
                    out["steps"].setdefault((mode, latency), []).append(
                        {
                            "wall": float(elapsed),
                            "blocked": group.stats.waited,
                            "exchanges": group.stats.exchanges,
                        }
                    )
    return out


def engine_table(world: int, results: list[dict]) -> list[str]:
    """Markdown rows for one world size: EPEngine prefill step times, one batch vs two halves."""
    r0 = results[0]
    wall = {k: min(s["wall"] for s in v) for k, v in r0["steps"].items()}
    lines = []
    for latency in r0["latencies"]:
        w = {m: wall[(m, latency)] for m in ENGINE_MODES}
        cost = {m: w[m] - wall[(m, 0.0)] for m in ENGINE_MODES}
        blocked = _hidden_by_blocking(results, "two", latency)
        lines.append(
            f"| {world} | {latency * 1e3:.1f} | {w['one']:.3f} | {w['two']:.3f} | {w['one'] / w['two']:.2f} "
            f"| {_share(cost['two'], cost['one'])} | {f'{statistics.mean(blocked):.0%}' if blocked else '-'} |"
        )
    return lines


def _hidden_by_blocking(results: list[dict], mode: str, latency: float) -> list[float]:
    """Per rank: 1 - (time blocked in exchanges beyond that at latency 0) / injected latency."""
    hidden = []
    for r in results:
        steps, base = r["steps"][(mode, latency)], r["steps"][(mode, 0.0)]
        injected = statistics.mean(s["exchanges"] for s in steps) * latency
        extra = statistics.mean(s["blocked"] for s in steps) - statistics.mean(s["blocked"] for s in base)
        if injected > 0:
            hidden.append(1 - extra / injected)
    return hidden


def _share(cost: float, ref: float) -> str:
    return f"{1 - cost / ref:.0%}" if ref > 0 else "-"


def table(world: int, results: list[dict]) -> list[str]:
    """Markdown rows for one world size: step times per mode and the hidden shares."""
    r0 = results[0]
    lines = []
    wall = {k: min(s["wall"] for s in v) for k, v in r0["steps"].items()}
    for latency in r0["latencies"]:
        w = {m: wall[(m, latency)] for m in MODES}
        cost = {m: w[m] - wall[(m, 0.0)] for m in MODES}
        blocked = _hidden_by_blocking(results, "overlap", latency)
        lines.append(
            f"| {world} | {latency * 1e3:.1f} | {w['one']:.3f} | {w['serial']:.3f} | {w['overlap']:.3f} "
            f"| {w['one'] / w['overlap']:.2f} | {_share(cost['overlap'], cost['serial'])} "
            f"| {_share(cost['overlap'], cost['one'])} "
            f"| {f'{statistics.mean(blocked):.0%}' if blocked else '-'} |"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="EP group sizes to run")
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=4, help="blocks (the preset's first is dense)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rows", type=int, default=2, help="prefill chunks per rank")
    p.add_argument("--tokens", type=int, default=128, help="tokens per chunk")
    p.add_argument("--context", type=int, default=0, help="tokens already cached before each chunk")
    p.add_argument(
        "--a2a-latency", nargs="+", default=["0", "auto", "0.05"],
        help="seconds per all-to-all (the first must be 0); 'auto': one attention/MoE phase's compute",
    )  # fmt: skip
    p.add_argument("--no-engine", dest="engine", action="store_false", help="skip the EPEngine table")
    p.add_argument("--no-function", dest="function", action="store_false", help="skip the function table")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    if args.a2a_latency[0] != "0":
        p.error("--a2a-latency: the first value must be 0 (the baseline of every cost)")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    cfg = model_config(args)
    latencies = [v if v == "auto" else float(v) for v in args.a2a_latency]
    print(
        f"model: {args.preset} with {args.layers} layers ({cfg.n_dense_layers} dense), vocab {args.vocab}; "
        f"per rank {args.rows} chunks x {args.tokens} tokens after {args.context}; 1 thread per rank, "
        f"{os.cpu_count()} cores"
    )
    load0 = os.getloadavg()[0]
    lines = [
        "| ranks | a2a latency (ms) | one batch (s) | halves serial (s) | halves overlapped (s) "
        "| one / overlapped | hidden vs serial | hidden vs one batch | hidden (blocked / injected) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if not args.function:
        lines = []
    engine = [
        "| ranks | a2a latency (ms) | EPEngine prefill step, one batch (s) | two micro-batches (s) "
        "| one / two | hidden vs one batch | hidden (blocked / injected) |",
        "|---|---|---|---|---|---|---|",
    ]
    for world in args.ranks:
        if args.function:
            results = run_ranks(_worker, world, cfg, args, latencies, timeout=300, deadline=1800)
            lines += table(world, results)
        if args.engine:
            results = run_ranks(_engine_worker, world, cfg, args, latencies, timeout=300, deadline=1800)
            engine += engine_table(world, results)
    load1 = os.getloadavg()[0]
    report = "\n".join(lines + ([""] if lines else []) + (engine if args.engine else []))
    print(f"load average (1 min) before/after: {load0:.1f} / {load1:.1f}\n")
    print(report)
    return report


if __name__ == "__main__":
    main()
