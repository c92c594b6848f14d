"""Step time of the pipeline runtime: 1F1B against DualPipe (and ZB1P) on 4 CPU processes, with an
injected point-to-point latency, next to what the schedule simulator predicts for the same costs.

    .venv/bin/python bench/pipeline.py --img-dir docs/img

1. Costs: in this process (one thread), every stage's forward F, full backward B, input-gradient
   backward I and weight-gradient backward W are timed on one micro-batch (median of repeats).
2. Runtime: `--pp` gloo processes (one intra-op thread each) build the same model and one
   `PipelineRunner` per schedule; steps alternate between the schedules (so machine noise hits all
   alike). Step time = the slowest rank's wall time from a common barrier; median over `--steps`.
   `--latency` seconds are added to every message between ranks (`comm.P2P`: the receiver may not
   use a message before send time + latency; the sender is not delayed), the same for every schedule.
3. Prediction: `dsv3.parallel.pipeline.plan.simulate` on the same op lists with the measured per-stage costs
   and the same latency, assuming one core per rank; and the CPU bound, total compute / cores, for
   when there are fewer cores than ranks (this machine: 2 cores for 4 ranks).

Also writes the measured timelines of the last step (latency > 0) and simulated timelines at the
paper's PP = 16 with the measured cost ratios as PNGs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3 import ModelConfig
from dsv3.model.transformer import Transformer
from dsv3.parallel.launch import run_ranks
from dsv3.parallel.pipeline import PipelineRunner
from dsv3.parallel.pipeline.phases import StagePass
from dsv3.parallel.pipeline.plan import Costs, Interval, Simulation, simulate
from dsv3.parallel.pipeline.schedule import BACKWARD, FORWARD, INPUT_GRAD, Op, build_schedule
from dsv3.parallel.pipeline.stages import PipelineStage, split_batch, split_layers
from dsv3.parallel.pipeline.timeline import draw_timeline
from dsv3.parallel.pipeline.wgrad import WeightGradStore, defer_weight_grads


@dataclass(frozen=True)
class StageCosts(Costs):
    """Costs that differ per stage (the first stage embeds, the last runs the heads and MTP)."""

    per_stage: tuple[tuple[float, float, float], ...] = ()  # (F, B, W) of each stage

    def of(self, op: Op) -> float:
        total = 0.0
        for t in op.tasks:
            f, b, w = self.per_stage[t.stage]
            total += {FORWARD: f, BACKWARD: b, INPUT_GRAD: b - w}.get(t.kind, w)
        return total


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_preset(args.preset, n_layers=args.layers, vocab_size=args.vocab)


def measure_costs(cfg: ModelConfig, stages: int, seq: int, repeats: int) -> StageCosts:
    """Per stage: median F, full B, and W (from a split I + W) on one micro-batch, in CPU seconds of
    this one-thread process (so the other programs of a shared machine do not inflate them)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    layout = split_layers(cfg.n_layers, cfg.n_mtp_layers, stages)
    mods = [PipelineStage(model, s, layout, 0.3, 1e-4) for s in range(stages)]
    store = WeightGradStore()
    defer_weight_grads(torch.nn.ModuleList(mods), store)
    mb = split_batch(torch.randint(0, cfg.vocab_size, (1, seq + 1)), None, 1)[0]
    samples: dict[str, list[list[float]]] = {k: [[] for _ in range(stages)] for k in "FBW"}
    clock = time.process_time

    def timed(kind: str, s: int, rep: int, fn, arg) -> None:
        t = clock()
        fn(arg)
        if rep:  # the first round warms up
            samples[kind][s].append(clock() - t)

    for rep in range(repeats + 1):
        for split in (False, True):
            x, passes = None, []
            for s in range(stages):
                p = StagePass(mods[s], None if x is None else x.detach().requires_grad_(), mb)
                timed("F", s, rep and not split, list, p.forward_steps())
                passes.append(p)
                x = p.hidden
            grad = None
            for s in reversed(range(stages)):
                steps = passes[s].backward_steps(lambda g=grad: g, 1.0)
                if split:
                    with store.deferring(s):
                        list(steps)
                    timed("W", s, rep, store.run, s)
                else:
                    timed("B", s, rep, list, steps)
                grad = passes[s].input_grad
            model.zero_grad(set_to_none=True)
    per_stage = tuple(tuple(statistics.median(samples[k][s]) for k in "FBW") for s in range(stages))
    mean = [statistics.mean(c[i] for c in per_stage) for i in range(3)]
    return StageCosts(f=mean[0], b=mean[1], w=min(mean[2], 0.99 * mean[1]), per_stage=per_stage)


def _worker(rank: int, world: int, cfg: ModelConfig, args: argparse.Namespace) -> dict:
    """Steps of every schedule, alternating; per (schedule, latency) and step: the slowest rank's
    wall time, and this rank's CPU time, compute inside ops and waiting inside ops."""
    runners = {}
    for name in args.schedules:
        torch.manual_seed(0)
        runners[name] = PipelineRunner(Transformer(cfg), name, args.chunks)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.vocab_size, (args.chunks, args.seq + 1), generator=gen)
    out: dict = {"steps": {}, "traces": {}}
    for latency in args.latency:
        for r in runners.values():
            r.p2p.latency = latency  # every rank changes it between the same two steps
        for step in range(args.warmup + args.steps):
            for name, runner in runners.items():  # alternate: noise of a shared machine hits all alike
                dist.barrier()
                t, c = time.time(), time.process_time()
                runner.step(batch)
                elapsed = torch.tensor([time.time() - t], dtype=torch.float64)
                cpu = time.process_time() - c  # this process's CPU seconds, gloo threads included
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                for p in runner.parameters():
                    p.grad = None
                if step >= args.warmup:
                    wait = sum(o.wait for o in runner.trace)
                    busy = sum(o.end - o.start for o in runner.trace) - wait
                    out["steps"].setdefault((name, latency), []).append((float(elapsed), cpu, busy, wait))
        for name, runner in runners.items():
            out["traces"][(name, latency)] = [(o.start, o.end, o.wait, o.op) for o in runner.trace]
    return out


def measured_timeline(schedule, traces: list[list[tuple]], costs: Costs) -> Simulation:
    """The runtime's last step as a `Simulation` (compute intervals: waits removed) for drawing."""
    t0 = min(row[0][0] for row in traces)
    rows = tuple(tuple(Interval(s - t0 + w, e - t0, op) for s, e, w, op in row) for row in traces)
    return Simulation(schedule, costs, rows)


def table(args: argparse.Namespace, costs: StageCosts, results: list[dict]) -> str:
    """Markdown: measured step time next to the simulator's, and where each rank's time went."""
    cores = os.cpu_count() or 1
    rows = [
        "| schedule | latency (ms) | step (s, median) | min | simulated, 1 core per rank (s) | CPU bound (s) "
        "| measured vs 1F1B | simulated vs 1F1B | CPU per rank (s) | in ops (s) | waiting (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for latency in args.latency:
        base_meas = base_sim = None
        for name in args.schedules:
            key = (name, latency)
            sim = simulate(build_schedule(name, args.pp, args.chunks), costs, latency)
            wall = [w for w, *_ in results[0]["steps"][key]]
            # per rank: medians over steps; then the mean over ranks
            cpu, busy, wait = (
                statistics.mean(statistics.median(step[i] for step in r["steps"][key]) for r in results)
                for i in (1, 2, 3)
            )
            bound = sum(statistics.median(st[1] for st in r["steps"][key]) for r in results) / cores
            med = statistics.median(wall)
            base_meas, base_sim = base_meas or med, base_sim or sim.makespan
            rows.append(
                f"| {name} | {latency * 1e3:g} | {med:.3f} | {min(wall):.3f} | {sim.makespan:.3f} "
                f"| {max(bound, sim.makespan):.3f} | {med / base_meas:.2f}x | {sim.makespan / base_sim:.2f}x "
                f"| {cpu:.3f} | {busy:.3f} | {wait:.3f} |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, default=4, help="processes (model stages)")
    p.add_argument("--chunks", type=int, default=8, help="micro-batches per step (one sequence each)")
    p.add_argument("--schedules", nargs="+", default=["1f1b", "zb1p", "dualpipe"])
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=7, help="7 blocks + 1 MTP = 2 units per stage at PP=4")
    p.add_argument("--vocab", type=int, default=1024, help="small, so the heads do not dwarf a block")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--latency", type=float, nargs="+", default=[0.0, 0.05], help="seconds per message")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="cost measurement repeats")
    p.add_argument("--img-dir", default=None)
    args = p.parse_args()

    torch.set_num_threads(1)
    cfg = model_config(args)
    load0 = os.getloadavg()[0]
    costs = measure_costs(cfg, args.pp, args.seq, args.repeats)
    print(f"model: {args.preset} with {args.layers} layers, vocab {args.vocab}, {cfg.n_mtp_layers} MTP; "
          f"{args.chunks} micro-batches of 1 x {args.seq} tokens; {args.pp} processes, 1 thread each, "
          f"{os.cpu_count()} cores")  # fmt: skip
    per_stage = [f"stage {s}: F {f * 1e3:.1f} B {b * 1e3:.1f} W {w * 1e3:.1f}" for s, (f, b, w) in
                 enumerate(costs.per_stage)]  # fmt: skip
    print("measured per-stage costs (ms, one thread): " + "; ".join(per_stage))
    results = run_ranks(_worker, args.pp, cfg, args, timeout=300, deadline=1800)
    load1 = os.getloadavg()[0]
    traces = [r["traces"] for r in results]

    print(f"\nload average (1 min) before/after: {load0:.1f} / {load1:.1f}\n")
    print(table(args, costs, results))
    if args.img_dir:
        img = Path(args.img_dir)
        latency = max(args.latency)
        for name in args.schedules:
            sched = build_schedule(name, args.pp, args.chunks)
            sim = measured_timeline(sched, [t[(name, latency)] for t in traces], costs)
            title = (f"{name} measured on {args.pp} CPU processes ({os.cpu_count()} cores), {args.chunks} "
                     f"micro-batches, latency {latency * 1e3:g} ms (boxes: compute, gaps: waiting)")  # fmt: skip
            print("wrote", draw_timeline(sim, img / f"pipeline-measured-{name}.png", title=title))
        ratio = Costs(f=1.0, b=costs.b / costs.f, w=costs.w / costs.f)
        for name in ("1f1b", "dualpipe"):
            sim = simulate(build_schedule(name, 16, 32), ratio, latency / costs.f)
            title = (f"{name} simulated at PP=16, 32 micro-batches, measured cost ratios F=1 B={ratio.b:.2f} "
                     f"W={ratio.w:.2f}, latency {latency / costs.f:.2f}: makespan {sim.makespan:.1f}, "
                     f"bubble {sim.bubble():.1f}")  # fmt: skip
            print("wrote", draw_timeline(sim, img / f"pipeline-pp16-{name}.png", title=title))


if __name__ == "__main__":
    main()
