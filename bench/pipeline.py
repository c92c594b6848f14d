"""Step time of `dsv3 train`'s own step with pipeline stages and expert parallelism: 1F1B, ZB1P,
DualPipe and DualPipeV on pp x ep gloo processes (default 2 x 2 = 4), without and with an injected
all-to-all latency, next to the schedule simulator's prediction for the same settings, and how much
all-to-all time is hidden.

    .venv/bin/python bench/pipeline.py --img-dir docs/img          # on a quiet machine, >= 1 core per rank

1. Costs, in this process (one thread): every stage's forward F, full backward B and weight-gradient
   backward W on one micro-batch (median of repeats, CPU seconds), for 2 and 4 stages (DualPipeV
   cuts pp ranks into 2 pp stages), and the mean compute time of one attention or MLP phase. The
   injected latency "auto" is that phase time: a block's forward then has as much all-to-all time
   (dispatch + combine) as computation (attention + MLP), the paper's 1:1 ratio (§3.2.1).
2. Runtime: pp x ep processes, each with one `Trainer` per schedule (`parallel={"pp", "ep",
   "schedule"}`, FP32, a constant global batch of `--chunks` micro-batches per pipeline, data from a
   synthetic corpus prepared once in this process), steps alternating between the schedules so that
   machine noise hits all alike. What is timed is `Trainer.train_step()`, the whole step of `dsv3
   train`: its data, the schedule's forward/backward (`PipelineRunner.step`), gradient reduction,
   ZeRO-1, clipping, the optimizer and the bias update. Trainer step = from a common barrier to the
   last rank's return from `train_step()`; runner part = the first op's start to the last op's end
   over all ranks (the runner's `trace`), what the simulator predicts; medians over `--steps`. `--a2a-latency` seconds
   are added to every dispatch/combine all-to-all (`Link.latency` of the trainer's EP links: an
   exchange completes no earlier than that long after it started; a wait blocks only for what is
   left), `--latency` to every pipeline message (`comm.P2P`).
3. Prediction: `plan.simulate` on the same op lists with the measured costs, plus the all-to-all
   time: exposed in full in a lone F, B or I (each MoE block's two exchanges), hidden behind the
   pair's computation in an F&B (cost max(compute, communication), Figure 4's ideal), assuming one
   core per rank; and the CPU bound (total compute / cores) for machines with fewer cores than ranks.
   The simulator models the schedule only: the trainer step's rest (reduction, optimizer) is the
   difference between the two measured columns.
4. Hidden all-to-all time: 1 - blocked / injected, injected = exchanges x latency, blocked = the
   time spent in all-to-all waits, over the whole step and over its F&B pairs only (the issue's
   target for DualPipe: >= 50%). Conservative: waiting for a slower EP peer counts as blocked (the
   column "blocked without latency" shows how much of that there is); on a machine with fewer
   cores than ranks it can make the share negative. The injected latency runs from each rank's own
   start of an exchange, so time spent waiting for a late peer also absorbs latency.

Also writes the measured timelines of the last step (with the largest latency) as PNGs, and
simulated timelines at the paper's PP = 16 with the measured cost ratios.
Record numbers with the machine's load: the 2-core machine these scripts are tested on runs 4 ranks
on 2 cores, so the ranks' compute cannot overlap there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3 import ModelConfig
from dsv3.data.dataset import DataConfig, prepare_data
from dsv3.model.moe import MoE
from dsv3.model.transformer import Transformer
from dsv3.parallel.launch import run_ranks
from dsv3.parallel.pipeline.phases import COMPUTE, PhasedPass, StagePass
from dsv3.parallel.pipeline.plan import Costs, Interval, Simulation, simulate
from dsv3.parallel.pipeline.schedule import BACKWARD, FORWARD, INPUT_GRAD, Op, build_schedule
from dsv3.parallel.pipeline.stages import PipelineStage, split_batch, split_layers
from dsv3.parallel.pipeline.timeline import draw_timeline
from dsv3.parallel.pipeline.wgrad import WeightGradStore, defer_weight_grads
from dsv3.train import TrainConfig, Trainer

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class StageCosts(Costs):
    """Costs that differ per stage (the first stage embeds, the last runs the heads and MTP), with
    the all-to-all time of each stage's forward (and as much again of its backward)."""

    per_stage: tuple[tuple[float, float, float], ...] = ()  # (F, B, W) of each stage
    a2a: tuple[float, ...] = ()  # all-to-all seconds of one forward (or backward) of each stage

    def of(self, op: Op) -> float:
        compute = comm = 0.0
        for t in op.tasks:
            f, b, w = self.per_stage[t.stage]
            compute += {FORWARD: f, BACKWARD: b, INPUT_GRAD: b - w}.get(t.kind, w)
            comm += self.a2a[t.stage] if t.kind in (FORWARD, BACKWARD, INPUT_GRAD) else 0.0
        if len(op.tasks) == 2:  # F&B: the all-to-alls in flight while the other half computes
            return max(compute, comm)
        return compute + comm

    def with_latency(self, latency: float, exchanges: tuple[int, ...]) -> StageCosts:
        a2a = tuple(n * latency for n in exchanges)
        return StageCosts(self.f, self.b, self.w, per_stage=self.per_stage, a2a=a2a)


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_preset(args.preset, n_layers=args.layers, vocab_size=args.vocab)


def stage_exchanges(model: Transformer, stages: int) -> tuple[int, ...]:
    """All-to-alls of one forward of each stage: dispatch + combine per MoE block (MTP's included)."""
    cfg = model.config
    layout = split_layers(cfg.n_layers, cfg.n_mtp_layers, stages)
    mods = [PipelineStage(model, s, layout, 0.3, 1e-4) for s in range(stages)]
    return tuple(2 * sum(isinstance(m, MoE) for m in mod.modules()) for mod in mods)


def measure_costs(cfg: ModelConfig, stages: int, seq: int, b: int, repeats: int) -> StageCosts:
    """Per stage: median F, full B, and W (from a split I + W) on one micro-batch, in CPU seconds of
    this one-thread process (so the other programs of a shared machine do not inflate them)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    layout = split_layers(cfg.n_layers, cfg.n_mtp_layers, stages)
    mods = [PipelineStage(model, s, layout, 0.3, 1e-4) for s in range(stages)]
    store = WeightGradStore()
    defer_weight_grads(torch.nn.ModuleList(mods), store)
    mb = split_batch(torch.randint(0, cfg.vocab_size, (b, seq + 1)), None, 1)[0]
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
    zero = (0.0,) * stages
    return StageCosts(f=mean[0], b=mean[1], w=min(mean[2], 0.99 * mean[1]), per_stage=per_stage, a2a=zero)


def phase_time(cfg: ModelConfig, seq: int, b: int, repeats: int) -> float:
    """Median CPU seconds of one attention or MLP phase of an MoE block (forward, one micro-batch)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    stage = PipelineStage(model, 0, split_layers(cfg.n_layers, cfg.n_mtp_layers, 1), 0.3, 1e-4)
    mb = split_batch(torch.randint(0, cfg.vocab_size, (b, seq + 1)), None, 1)[0]
    times = []
    for rep in range(repeats + 1):
        p = PhasedPass(stage, None, mb)
        kinds = [ph.kind for ph in p.phases if ph.step]
        moe = [isinstance(blk.mlp, MoE) for blk in stage.layers]
        t, steps = time.process_time(), []
        for _ in p.forward_steps():
            steps.append(time.process_time() - t)
            t = time.process_time()
        if rep:
            # the phases of MoE blocks: embed (1), then per block 4 (MoE) or 2 (dense)
            i = 1
            for is_moe in moe:
                if is_moe:
                    times += [steps[i], steps[i + 2]]  # attention, mlp
                    assert kinds[i] == kinds[i + 2] == COMPUTE
                i += 4 if is_moe else 2
    return statistics.median(times)


# ---- the trainer's step -----------------------------------------------------------------------------
WORDS_SEED = 0


def write_corpus(directory: Path, n_docs: int = 200, words: int = 400, doc_words: int = 120) -> Path:
    """A synthetic text corpus in `directory`: documents of random pseudo-words (seeded), enough for a
    tokenizer of a few hundred to a thousand tokens and for every step's batches (the loader wraps)."""
    g = torch.Generator().manual_seed(WORDS_SEED)
    letters = "abcdefghijklmnopqrstuvwxyz"
    pool = ["".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=g).tolist())
            for n in torch.randint(2, 9, (words,), generator=g).tolist()]  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        idx = torch.randint(0, words, (doc_words,), generator=g).tolist()
        (directory / f"doc{d:03d}.txt").write_text(" ".join(pool[i] for i in idx) + ".\n")
    return directory


def data_config(args: argparse.Namespace, root: Path) -> DataConfig:
    return DataConfig(data=str(root / "corpus"), vocab_size=args.vocab, val_fraction=0.1,
                      cache=str(root / "cache"), progress=False)  # fmt: skip


def train_config(args: argparse.Namespace, root: Path, schedule: str, total_steps: int) -> TrainConfig:
    """`dsv3 train`'s settings for one schedule: pp x ep ranks, a constant global batch of `chunks`
    micro-batches of `batch` sequences per pipeline, FP32, no evaluation or checkpoint."""
    parallel = {"pp": args.pp, "ep": args.ep, "schedule": schedule, "timeout": args.timeout}
    if args.ep == 1:
        del parallel["ep"]
    global_batch = args.chunks * args.batch * args.ep  # every pipeline reads its own data shard
    return TrainConfig(
        preset=args.preset, model={"n_layers": args.layers, "vocab_size": args.vocab}, parallel=parallel,
        steps=total_steps, out=str(root / f"run-{schedule}"), data=str(root / "corpus"), seq_len=args.seq,
        micro_batch=args.batch, batch_start=global_batch, batch_end=global_batch, eval_every=10**9,
        ckpt_every=10**9, precision="fp32", tensorboard=False, val_fraction=0.1, max_bad_steps=10**9,
    )  # fmt: skip


def set_latencies(trainer: Trainer, a2a: float, p2p: float) -> None:
    """Inject `a2a` seconds into every expert-parallel exchange and `p2p` into every pipeline message
    of the trainer's step (every rank changes them between the same two steps)."""
    ep = trainer.strategy.ep
    for link in [] if ep is None else [ep.ep, ep.inter, ep.intra]:
        link.latency = a2a
    trainer.runner.p2p.latency = p2p


def _worker(rank: int, world: int, args: argparse.Namespace, root: Path, latencies: list[float]) -> dict:
    """One `Trainer` per schedule, steps alternating between them; per (schedule, a2a latency) and
    step: the `train_step()` span over all ranks (first start to last end), the runner's span inside
    it (first op start to last op end), this rank's compute, pipeline waits, all-to-all waits and
    exchanges; the losses of every step."""
    torch.set_num_threads(1)
    data = prepare_data(data_config(args, root))  # prepared (cached) by the parent
    total = len(latencies) * (args.warmup + args.steps)
    trainers = {}
    for name in args.schedules:  # every rank builds them in the same order (their process groups)
        trainers[name] = Trainer(train_config(args, root, name, total), dataset=data, show_progress=False)
    first = trainers[args.schedules[0]].strategy
    out: dict = {"steps": {}, "traces": {}, "losses": {}, "pp_rank": first.runner.rank,
                 "pp": first.mesh.members["pp"]}  # fmt: skip
    for latency in latencies:
        for trainer in trainers.values():
            set_latencies(trainer, latency, args.latency)
        for i in range(args.warmup + args.steps):
            for name, trainer in trainers.items():  # alternate: noise hits all schedules alike
                dist.barrier()
                t0 = time.time()
                result = trainer.train_step()
                t1 = time.time()
                tr = trainer.runner.trace
                spans = torch.tensor([t1, -t0, tr[-1].end, -tr[0].start], dtype=torch.float64)
                dist.all_reduce(spans, op=dist.ReduceOp.MAX)
                out["losses"].setdefault(name, []).append(result.loss)
                if i < args.warmup:
                    continue
                pairs = [o for o in tr if len(o.op.tasks) == 2]
                out["steps"].setdefault((name, latency), []).append(
                    {
                        "wall": float(spans[0] + spans[1]),  # last rank's end - first rank's start
                        "runner": float(spans[2] + spans[3]),  # last op's end - first op's start
                        "compute": sum(o.compute for o in tr),
                        "wait": sum(o.wait for o in tr),
                        "comm_wait": sum(o.comm_wait for o in tr),
                        "exchanges": sum(o.exchanges for o in tr),
                        "pair_comm_wait": sum(o.comm_wait for o in pairs),
                        "pair_exchanges": sum(o.exchanges for o in pairs),
                    }
                )
        for name, trainer in trainers.items():
            out["traces"][(name, latency)] = [
                (o.start, o.end, o.wait + o.comm_wait, o.op) for o in trainer.runner.trace
            ]
    out["trainer_steps"] = {name: t.step for name, t in trainers.items()}
    return out


def measured_timeline(schedule, traces: list[list[tuple]], costs: Costs) -> Simulation:
    """The runtime's last step as a `Simulation` (compute intervals: waits removed) for drawing."""
    t0 = min(row[0][0] for row in traces)
    rows = tuple(tuple(Interval(s - t0 + w, e - t0, op) for s, e, w, op in row) for row in traces)
    return Simulation(schedule, costs, rows)


def hidden_share(
    steps: list[dict], base: list[dict] | None, latency: float, comm: str, count: str
) -> float | None:
    """1 - exposed / injected all-to-all time over `steps` (dicts of the worker's figures): exposed =
    the time blocked in all-to-all waits, less what the same steps block without latency (`base`:
    waiting for a slower peer, which is not the latency's), per step on average."""
    injected = statistics.mean(s[count] for s in steps) * latency
    if injected <= 0:
        return None
    blocked = statistics.mean(s[comm] for s in steps)
    if base:
        blocked -= statistics.mean(s[comm] for s in base)
    return 1.0 - blocked / injected


def table(
    args, costs: dict[int, StageCosts], exchanges: dict[int, tuple[int, ...]], latencies, results
) -> str:
    """Markdown: the measured trainer step and the runner's part of it next to the simulator's
    prediction, and the hidden all-to-all time."""
    cores = os.cpu_count() or 1
    rows = [
        "| schedule | a2a latency (ms) | trainer step (s, median) | runner part (s) | simulated (s) "
        "| trainer / simulated | runner / simulated | CPU bound (s) | a2a injected per rank (s) "
        "| a2a blocked (s) | blocked without latency (s) | hidden a2a | hidden in F&B |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    for latency in latencies:
        for name in args.schedules:
            stages = 2 * args.pp if name == "dualpipev" else args.pp
            sched = build_schedule(name, stages, args.chunks)
            sim = simulate(sched, costs[stages].with_latency(latency, exchanges[stages]), args.latency)
            key = (name, latency)
            wall = statistics.median(s["wall"] for s in results[0]["steps"][key])
            runner = statistics.median(s["runner"] for s in results[0]["steps"][key])
            per_rank = [r["steps"][key] for r in results]
            compute = sum(statistics.median(s["compute"] for s in st) for st in per_rank)
            injected = statistics.mean(
                statistics.median(s["exchanges"] for s in st) * latency for st in per_rank
            )
            every = [s for st in per_rank for s in st]
            base = [s for r in results for s in r["steps"].get((name, 0.0), [])]
            blocked = statistics.mean(s["comm_wait"] for s in every)
            blocked0 = statistics.mean(s["comm_wait"] for s in base) if base else float("nan")
            rows.append(
                f"| {name} | {latency * 1e3:.2f} | {wall:.3f} | {runner:.3f} | {sim.makespan:.3f} "
                f"| {wall / sim.makespan:.2f} | {runner / sim.makespan:.2f} "
                f"| {max(compute / cores, sim.makespan):.3f} | {injected:.3f} | {blocked:.3f} | {blocked0:.3f} "
                f"| {fmt(hidden_share(every, None, latency, 'comm_wait', 'exchanges'))} "
                f"| {fmt(hidden_share(every, None, latency, 'pair_comm_wait', 'pair_exchanges'))} |"
            )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel ranks per stage (processes: pp x ep)")
    p.add_argument("--chunks", type=int, default=8, help="micro-batches per step and pipeline")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=7, help="7 blocks + 1 MTP = 2 units per stage at 4 stages")
    p.add_argument("--vocab", type=int, default=1024, help="small, so the heads do not dwarf a block")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--a2a-latency", nargs="+", default=["0", "auto"],
        help="seconds per all-to-all; 'auto': the measured compute time of one attention or MLP phase",
    )  # fmt: skip
    p.add_argument("--latency", type=float, default=0.0, help="seconds per pipeline message")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="cost measurement repeats")
    p.add_argument("--img-dir", default=None)
    p.add_argument(
        "--timeout", type=float, default=300, help="seconds a rank or a collective may stay silent"
    )
    args = p.parse_args(argv)
    if args.pp < 2:
        p.error(f"--pp: {args.pp}; the trainer runs a pipeline schedule only with at least 2 pipeline ranks")
    return args


def main(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    """Run the benchmark; returns the table and every rank's figures (`_worker`)."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    cfg = model_config(args)
    stage_counts = sorted({2 * args.pp if s == "dualpipev" else args.pp for s in args.schedules})
    costs = {n: measure_costs(cfg, n, args.seq, args.batch, args.repeats) for n in stage_counts}
    torch.manual_seed(0)
    exchanges = {n: stage_exchanges(Transformer(cfg), n) for n in stage_counts}
    phase = phase_time(cfg, args.seq, args.batch, args.repeats)
    latencies = [phase if v == "auto" else float(v) for v in args.a2a_latency]
    world = args.pp * args.ep
    print(f"model: {args.preset} with {args.layers} layers, vocab {args.vocab}, {cfg.n_mtp_layers} MTP; "
          f"{args.chunks} micro-batches of {args.batch} x {args.seq} tokens per pipeline; pp={args.pp} x "
          f"ep={args.ep} = {world} processes, 1 thread each, {os.cpu_count()} cores")  # fmt: skip
    for n, c in costs.items():
        per_stage = [
            f"{s}: F {f * 1e3:.1f} B {b * 1e3:.1f} W {w * 1e3:.1f}" for s, (f, b, w) in enumerate(c.per_stage)
        ]
        print(f"measured costs at {n} stages (ms, one thread): " + "; ".join(per_stage))
    print(f"one attention/MLP phase: {phase * 1e3:.2f} ms ('auto' all-to-all latency)")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        write_corpus(root / "corpus")
        prepare_data(data_config(args, root))  # once, here: the ranks read the cache
        load0 = os.getloadavg()
        results = run_ranks(_worker, world, args, root, latencies, timeout=args.timeout, deadline=3600)
        load1 = os.getloadavg()
    report = table(args, costs, exchanges, latencies, results)
    # the same seed and data in every schedule's trainer: their steps must give the same losses
    losses = results[0]["losses"]
    spread = max(
        abs(a - b) for name in args.schedules for a, b in zip(losses[name], losses[args.schedules[0]])
    )
    taken = " ".join(f"{name}={results[0]['trainer_steps'][name]}" for name in args.schedules)
    print(f"\ntrainer steps taken: {taken}; losses of {args.schedules[0]}: "
          f"{' '.join(f'{v:.4f}' for v in losses[args.schedules[0]])}; "
          f"largest loss difference between the schedules: {spread:.1e}")  # fmt: skip
    loads = lambda la: " ".join(f"{v:.1f}" for v in la)  # noqa: E731
    print(f"load average (1/5/15 min) before: {loads(load0)}, after: {loads(load1)}; "
          f"{os.cpu_count()} cores for {world} ranks\n")  # fmt: skip
    print(report)
    if args.img_dir:
        img = Path(args.img_dir)
        latency = max(latencies)
        pipeline0 = sorted((r for r in results if r["pp"] == results[0]["pp"]), key=lambda r: r["pp_rank"])
        for name in args.schedules:
            stages = 2 * args.pp if name == "dualpipev" else args.pp
            sched = build_schedule(name, stages, args.chunks)
            sim = measured_timeline(sched, [r["traces"][(name, latency)] for r in pipeline0], costs[stages])
            title = (f"{name} measured in Trainer.train_step, pp={args.pp} x ep={args.ep} CPU processes "
                     f"({os.cpu_count()} cores), {args.chunks} micro-batches, all-to-all latency "
                     f"{latency * 1e3:.2f} ms (boxes: compute, gaps: waiting)")  # fmt: skip
            print("wrote", draw_timeline(sim, img / f"pipeline-measured-{name}.png", title=title))
        c = costs[args.pp]
        ratio = Costs(f=1.0, b=c.b / c.f, w=c.w / c.f)
        for name in ("1f1b", "dualpipe"):
            sim = simulate(build_schedule(name, 16, 32), ratio, args.latency / c.f)
            title = (f"{name} simulated at PP=16, 32 micro-batches, measured cost ratios F=1 B={ratio.b:.2f} "
                     f"W={ratio.w:.2f}, latency {args.latency / c.f:.2f}: makespan {sim.makespan:.1f}, "
                     f"bubble {sim.bubble():.1f}")  # fmt: skip
            print("wrote", draw_timeline(sim, img / f"pipeline-pp16-{name}.png", title=title))
    return report, results


if __name__ == "__main__":
    main()
