"""`dsv3 plan calibrate`: measure this machine as a `Hardware` profile, then check the planner's
predictions against real dsv3 runs that were not used to build the profile.

Fit (what the profile is made of):
  GEMM      FP32 FLOP/s of one thread over the model's own GEMM shapes at the fit training
            step's tokens (`measure_model_gemms`; the CPU model computes in FP32) -> bf16/fp8_tflops
  copy      bytes/s of a large tensor copy -> hbm_gbps, halved: the cost model counts BF16 weights
            and activations (2 bytes), the CPU moves FP32 (4), so the profile is in BF16 units
  overhead  kernel_us (per kernel), seq_us (the engine's host work per sequence per decode step:
            scheduling, sampling, the cache's bookkeeping) and group_us (per expert a grouped GEMM
            runs: ATen's grouped_mm is a GEMM per expert on CPUs), solved so that the engine's
            decode steps at `fit_batches` (1, 8, 32) are predicted exactly: three runs, three
            unknowns; then block_us (host work per block per training pass: autograd's nodes, the losses,
            the routing's bookkeeping; independent of the tokens) so that one training step of
            half the held-out batch (`fit_train_shape`: 1x128) is predicted exactly
  gloo      two processes exchange all_to_all_single payloads of two sizes -> bandwidth (IB and
            "NVLink" alike: one machine) and latency per exchange
  The efficiencies are 1: the rates are what was reached, not peaks.

Held out (predicted by the planner with the fitted profile, then measured):
  decode-B  the single-process engine (the model's decode path), B sequences, step time
  train     one forward + backward of the model on one process
  ep2       one forward + backward with the routed experts over 2 gloo ranks (one hop, FP32 wire),
            predicted on the busiest rank: the balance (max/mean rows per rank) of the run's routing
            is counted from the same batches on one process, not fitted
  pp2       one 1F1B step over 2 gloo ranks (pipeline runtime), 4 micro-batches, predicted with
            per-stage costs: the runtime's split puts the head, the loss and MTP on the last stage
  Both 2-rank runs are predicted with the profile slowed by the factor the fit training step
  slows by when both ranks run it at once (`loaded`: a rank's compute with every core busy, shared
  caches and memory; 1.05-1.35 here), reported as the last, fit row.

Timings are the fastest of the repeats (wall clock): on a shared machine the other processes only
ever add time, so the least-disturbed repeat is the closest to an idle run; a median would follow
the load. The single-process runs (every decode batch, both training shapes) are measured in
interleaved rounds (`--rounds`, 3), each run's fastest round counting, so that a slow spell of the
machine spoils one round of every run rather than the whole of the one run it fell on (one slow fit
run skews every prediction the fit makes). On a loaded machine they still mean little
(docs/planning.md). Run it on an idle machine with one thread per process:
  dsv3 plan calibrate --out cpu.json
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from dsv3.config import ModelConfig
from dsv3.planner import cost
from dsv3.planner.hardware import PRESETS, Hardware
from dsv3.planner.microbench import (
    CLOCKS,
    best_time,
    measure_copy,
    measure_gloo,
    measure_model_gemms,
    measure_rounds,
)
from dsv3.planner.serve import ServeLayout, _decode_step
from dsv3.planner.train import model_costs, stage_costs


@dataclass(frozen=True)
class Row:
    name: str
    predicted: float
    measured: float
    held_out: bool

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1


# ---- the real runs -------------------------------------------------------------------------------------
def _model(cfg: ModelConfig):
    from dsv3.model.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(cfg)


def measure_decode(cfg: ModelConfig, batch: int, prompt: int, steps: int, clock=time.perf_counter) -> float:
    """Fastest step time of the engine's decode steps (model path) with `batch` sequences."""
    from dsv3.infer.engine import Engine, EngineConfig
    from dsv3.infer.sampling import SamplingParams

    engine = Engine(
        _model(cfg), EngineConfig(fast_decode=False, max_num_seqs=batch, max_num_batched_tokens=4096)
    )
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(2, cfg.vocab_size, (prompt,), generator=g).tolist(), params)
    engine.step()  # the prefills
    times = []
    while engine.has_unfinished():
        t = clock()
        engine.step()
        times.append(clock() - t)
    return min(times[1:] or times)


def measure_train(cfg: ModelConfig, batch: int, seq: int, repeats: int, clock=time.perf_counter) -> float:
    model = _model(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model.loss(x).total.backward()
        model.zero_grad(set_to_none=True)

    return best_time(step, repeats, clock=clock)


def measure_ep_balance(cfg: ModelConfig, batch: int, seq: int, ep: int = 2) -> float:
    """Max/mean expert rows over `ep` ranks holding E/ep consecutive experts each, of the batches
    the EP run gives its ranks (`_dist_worker`'s), mean over the MoE layers: the busiest rank sets
    the step and the other waits for it in the all-to-all."""
    model = _model(cfg)
    x = torch.randint(0, cfg.vocab_size, (ep, batch, seq + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        counts = sum(model.loss(x[r]).counts for r in range(ep))  # [L, E]
    per_rank = counts.view(counts.shape[0], ep, -1).sum(-1).double()  # [L, ep]
    return float((per_rank.amax(1) / per_rank.mean(1)).mean())


def _dist_worker(
    rank: int,
    world: int,
    cfg: ModelConfig,
    batch: int,
    seq: int,
    repeats: int,
    rounds: int,
    fit: tuple[int, int],
) -> dict:
    """The 2-rank runs' fastest steps over `rounds` rounds, interleaved: "ep2" (one forward +
    backward with the routed experts over both ranks), "pp2" (a 1F1B step, 4 micro-batches) and
    "loaded" (the single-process training step of the `fit` shape, run by both ranks at once: a
    rank's speed while every core runs a rank)."""
    import torch.distributed as dist

    from dsv3.parallel.pipeline import PipelineRunner
    from dsv3.parallel.strategy import build_strategy

    torch.set_num_threads(1)
    x = torch.randint(0, cfg.vocab_size, (world, batch, seq + 1), generator=torch.Generator().manual_seed(0))
    strategy = build_strategy(ep=2, zero=False, ranks_per_node=2)
    model = strategy.parallelize(_model(cfg))

    def ep_step() -> None:
        dist.barrier()
        model.loss(x[rank]).total.backward()
        model.zero_grad(set_to_none=True)

    chunks = 4
    runner = PipelineRunner(_model(cfg), "1f1b", chunks)
    mbs = torch.randint(0, cfg.vocab_size, (chunks, seq + 1), generator=torch.Generator().manual_seed(1))

    def pp_step() -> None:
        dist.barrier()
        runner.step(mbs)
        for p in runner.parameters():
            p.grad = None

    plain = _model(cfg)
    xf = torch.randint(
        0, cfg.vocab_size, (fit[0], fit[1] + 1), generator=torch.Generator().manual_seed(2 + rank)
    )

    def loaded_step() -> None:
        dist.barrier()  # both ranks compute at once; the barrier's wait is inside the timing, as
        plain.loss(xf).total.backward()  # in ep_step and pp_step
        plain.zero_grad(set_to_none=True)

    runs = {"ep2": ep_step, "pp2": pp_step, "loaded": loaded_step}
    return measure_rounds({k: (lambda f=f: best_time(f, repeats)) for k, f in runs.items()}, rounds)


def loaded(hw: Hardware, factor: float) -> Hardware:
    """`hw` computing `factor` x slower (rates / factor, host overheads x factor): a rank of a run
    that keeps every core of this CPU busy. The network terms are measured with both ranks busy
    already."""
    return replace(
        hw, bf16_tflops=hw.bf16_tflops / factor, fp8_tflops=hw.fp8_tflops / factor, hbm_gbps=hw.hbm_gbps / factor,
        **{n: getattr(hw, n) * factor for n in (*OVERHEADS, "block_us")},
    )  # fmt: skip


# ---- predictions ---------------------------------------------------------------------------------------
def predict_decode(cfg: ModelConfig, hw: Hardware, batch: int, prompt: int, steps: int) -> float:
    lay = ServeLayout(
        decode_gpus=1, decode_tp=1, decode_ep=1, decode_redundant=0, shared_as_routed=False, mtp=False,
        batch=batch, fp8=False, kv_bytes=2.0, decode_overlap=False, input_len=prompt, output_len=steps, prefill_gpus=1,
        prefill_tp=1, prefill_ep=1, prefill_redundant=0,
    )  # fmt: skip
    return _decode_step(cfg, hw, lay, batch, 1.0)[0]


def predict_train(
    cfg: ModelConfig, hw: Hardware, batch: int, seq: int, ep: int = 1, balance: float = 1.0
) -> tuple[float, float]:
    """(compute, communication) seconds of one forward + backward on the busiest rank."""
    pairs = batch * cost.causal_pairs(seq)
    f, b, _, _ = model_costs(cfg, hw, batch * seq, pairs, False, ep, recompute=False, balance=balance)
    comm = 0.0
    if ep > 1:
        copies = cost.expected_copies(cfg, ep, ep, two_hop=False)
        t = cost.traffic(copies, batch * seq, cfg.dim, cfg.n_activated_experts, "same", "same")
        comm = 2 * (cfg.n_moe_layers + cfg.n_mtp_layers) * t.seconds(hw, rounds=3)  # + the counts
    return f + b, comm


def predict_pipeline(cfg: ModelConfig, hw: Hardware, seq: int, chunks: int = 4) -> float:
    from dsv3.parallel.pipeline.plan import simulate
    from dsv3.parallel.pipeline.schedule import build_schedule

    costs = stage_costs(cfg, hw, 2, seq, cost.causal_pairs(seq), False, recompute=False)
    p2p = seq * cfg.dim * 4 / hw.ib_bytes + hw.net_latency_us * 1e-6  # FP32 activations
    return simulate(build_schedule("1f1b", 2, chunks), costs, p2p).makespan


# ---- the command ---------------------------------------------------------------------------------------
OVERHEADS = ("kernel_us", "seq_us", "group_us")  # solved from 1, 2 or 3+ decode runs, in this order


def solve_overheads(
    cfg: ModelConfig, hw: Hardware, fits: dict[int, float], prompt: int, steps: int
) -> Hardware:
    """`hw` with the decode overheads solved from the decode steps measured at the batches of
    `fits` ({batch: seconds}): kernel_us from one run, + seq_us from two, + group_us from three
    (least squares beyond). The prediction is linear in each (step = base + kernel_us x kernels +
    seq_us x batch + group_us x the experts' groups the step runs), so three runs are predicted
    exactly. An overhead that solves negative is set to 0 and the others solved again without it."""
    names = list(OVERHEADS[: min(len(fits), len(OVERHEADS))])
    hw = replace(hw, **dict.fromkeys(OVERHEADS, 0.0))
    batches = sorted(fits)
    base = torch.tensor([predict_decode(cfg, hw, b, prompt, steps) for b in batches], dtype=torch.float64)
    unit = [[predict_decode(cfg, replace(hw, **{n: 1.0}), b, prompt, steps) for n in names] for b in batches]
    per = torch.tensor(unit, dtype=torch.float64) - base[:, None]  # seconds per us of each overhead
    y = torch.tensor([fits[b] for b in batches], dtype=torch.float64) - base
    free = list(range(len(names)))
    solved = torch.zeros(len(names), dtype=torch.float64)
    while free:
        x = torch.linalg.lstsq(per[:, free], y[:, None]).solution[:, 0]
        if (x >= 0).all():
            solved[free] = x
            break
        free.pop(int(x.argmin()))  # the most negative one is 0
    return replace(hw, **{n: float(v) for n, v in zip(names, solved)})


def fit_train_shape(batch: int, seq: int) -> tuple[int, int]:
    """The training run block_us is fitted on: half the held-out batch (half its sequence length
    when the batch is one sequence), so that the held-out step is not the fit run."""
    return (batch // 2, seq) if batch > 1 else (1, max(2, seq // 2))


def solve_block_us(cfg: ModelConfig, hw: Hardware, batch: int, seq: int, measured: float) -> Hardware:
    """`hw` with block_us solved so that one forward + backward of `batch` x `seq` tokens is
    predicted as `measured` (the prediction is linear in block_us); clipped at 0."""
    hw = replace(hw, block_us=0.0)
    base = sum(predict_train(cfg, hw, batch, seq))
    per = sum(predict_train(cfg, replace(hw, block_us=1.0), batch, seq)) - base
    return replace(hw, block_us=max(0.0, (measured - base) / per))


def fit_profile(
    cfg: ModelConfig, prompt: int, steps: int, repeats: int, dist: bool, fits: dict[int, float],
    clock=time.perf_counter, gemm_tokens: int = 128,
) -> Hardware:  # fmt: skip
    """The fitted profile: the micro-benchmarks (the GEMM rate on the model's own shapes at
    `gemm_tokens` tokens), then the overheads solved from the measured decode steps `fits`
    ({batch: seconds})."""
    flops = measure_model_gemms(cfg, gemm_tokens, repeats, clock)
    copy = measure_copy(repeats=repeats, clock=clock)
    hw = replace(
        PRESETS["cpu"], bf16_tflops=flops / 1e12, fp8_tflops=flops / 1e12, hbm_gbps=copy / 2 / 1e9,
        kernel_us=0.0, gemm_eff=1.0, attn_eff=1.0, hbm_eff=1.0, elt_eff=1.0, net_eff=1.0,
    )  # fmt: skip
    if dist:
        bw, lat = measure_gloo(repeats)
        hw = replace(hw, nvlink_gbps=bw / 1e9, ib_gbps=bw / 1e9, net_latency_us=lat * 1e6)
    return solve_overheads(cfg, hw, fits, prompt, steps)


def calibrate(
    cfg: ModelConfig, batches: tuple[int, ...], prompt: int, steps: int, train: tuple[int, int], repeats: int,
    dist: bool = True, fit_batches: tuple[int, ...] = (1, 8, 32), clock: str = "wall", rounds: int = 3,
) -> tuple[Hardware, list[Row]]:  # fmt: skip
    """The fitted profile and the rows (fit and held-out). `clock` (CLOCKS) times the
    single-process runs and micro-benchmarks; the 2-rank runs are always timed by the wall clock.
    The single-process runs, fit and held-out alike, are measured in `rounds` interleaved rounds
    (`measure_rounds`); the 2-rank runs once, `repeats` steps each."""
    tick = CLOCKS[clock]
    if set(fit_batches) & set(batches) or not fit_batches:
        raise ValueError(f"fit_batches: {fit_batches} must be given and not held-out batches ({batches})")
    tb, ts = train
    fb, fs = fit_train_shape(tb, ts)
    fit_batches = sorted(set(fit_batches))
    runs: dict[str, Callable[[], float]] = {
        f"decode-{b}": (lambda b=b: measure_decode(cfg, b, prompt, steps, tick))
        for b in [*fit_batches, *batches]
    }
    runs["fit train"] = lambda: measure_train(cfg, fb, fs, repeats, tick)
    runs["train"] = lambda: measure_train(cfg, tb, ts, repeats, tick)
    measured = measure_rounds(runs, rounds)
    fits = {b: measured[f"decode-{b}"] for b in fit_batches}
    hw = fit_profile(cfg, prompt, steps, repeats, dist, fits, tick, gemm_tokens=fb * fs)
    hw = solve_block_us(cfg, hw, fb, fs, measured["fit train"])
    rows = [
        Row(f"decode-{b} (fit)", predict_decode(cfg, hw, b, prompt, steps), m, False) for b, m in fits.items()
    ]
    rows.append(
        Row(f"train {fb}x{fs} (fit)", sum(predict_train(cfg, hw, fb, fs)), measured["fit train"], False)
    )
    for b in batches:
        rows.append(
            Row(f"decode-{b}", predict_decode(cfg, hw, b, prompt, steps), measured[f"decode-{b}"], True)
        )
    rows.append(Row(f"train {tb}x{ts}", sum(predict_train(cfg, hw, tb, ts)), measured["train"], True))
    if dist:
        from dsv3.parallel.launch import run_ranks

        res = run_ranks(_dist_worker, 2, cfg, tb, ts, repeats, rounds, (fb, fs), timeout=120, deadline=600)
        # a rank's compute with both cores busy, against the same step alone (the fit run): >= 1
        factor = max(1.0, max(r["loaded"] for r in res) / measured["fit train"])
        hw2 = loaded(hw, factor)
        rows.append(
            Row(
                f"ep2 train {tb}x{ts}",
                sum(predict_train(cfg, hw2, tb, ts, ep=2, balance=measure_ep_balance(cfg, tb, ts))),
                max(r["ep2"] for r in res),
                True,
            )
        )
        rows.append(Row(f"pp2 1f1b 4x{ts}", predict_pipeline(cfg, hw2, ts), max(r["pp2"] for r in res), True))
        rows.append(Row(f"train {fb}x{fs} 2 busy (fit)", sum(predict_train(cfg, hw2, fb, fs)),
                        max(r["loaded"] for r in res), False))  # fmt: skip
    return hw, rows


def format_rows(hw: Hardware, rows: list[Row]) -> str:
    lines = [
        f"profile: GEMM {hw.bf16_tflops * 1e3:.1f} GFLOP/s, memory {hw.hbm_gbps:.1f} GB/s (BF16 units), "
        f"kernel {hw.kernel_us:.1f} us, {hw.group_us:.1f} us per expert group, "
        f"host {hw.seq_us:.1f} us per decode sequence, "
        f"{hw.block_us:.0f} us per block and pass, "
        f"gloo {hw.ib_gbps:.2f} GB/s + {hw.net_latency_us:.0f} us",
        f"{'run':<24} {'predicted ms':>13} {'measured ms':>12} {'error':>7}",
    ]
    for r in rows:
        lines.append(f"{r.name:<24} {r.predicted * 1e3:>13.2f} {r.measured * 1e3:>12.2f} {r.error:>+7.1%}")
    held = [r for r in rows if r.held_out]
    within = sum(abs(r.error) <= 0.2 for r in held)
    lines.append(f"held-out runs within 20%: {within} of {len(held)}; load average {os.getloadavg()[0]:.2f} "
                 f"on {os.cpu_count()} cores")  # fmt: skip
    return "\n".join(lines)


def plan_calibrate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 plan calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="model of the runs (small; tiny for a quick check)")
    p.add_argument("--batches", default="4,16,64", help="held-out decode batch sizes")
    p.add_argument(
        "--fit-batches", default="1,8,32", help="the decode batches the overheads are fitted on (1 to 3+)"
    )
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per decode sequence")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    p.add_argument("--train", default="2x128", help="training batch: SEQUENCESxTOKENS")
    p.add_argument(
        "--repeats", type=int, default=7, help="timed steps of each training run and micro-benchmark"
    )
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds of the single-process runs (each run's fastest round counts)")  # fmt: skip
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="time the single-process runs by elapsed (wall) or thread CPU time (cpu: a shared machine)")  # fmt: skip
    p.add_argument("--no-dist", action="store_true", help="skip the gloo measurements and runs")
    p.add_argument("--out", help="write the fitted profile here (JSON, or YAML for .yaml)")
    args = p.parse_args(argv)
    from dsv3.cli import UsageError

    try:
        batches = tuple(int(b) for b in args.batches.split(",") if b)
        fit_batches = tuple(int(b) for b in args.fit_batches.split(",") if b)
        tb, ts = (int(v) for v in args.train.lower().split("x"))
    except ValueError:
        raise UsageError(
            f"--batches {args.batches!r} / --fit-batches {args.fit_batches!r} / --train {args.train!r}: "
            "expected 4,16 / 1,8,32 and 2x128"
        ) from None
    torch.set_num_threads(1)
    cfg = ModelConfig.from_preset(args.preset)
    if not fit_batches or min(fit_batches) < 1 or set(fit_batches) & set(batches):
        raise UsageError(
            f"--fit-batches {args.fit_batches}: batches >= 1, none of them one of --batches {args.batches}"
        )
    hw, rows = calibrate(
        cfg,
        batches,
        args.prompt,
        args.steps,
        (tb, ts),
        args.repeats,
        not args.no_dist,
        fit_batches,
        args.clock,
        args.rounds,
    )
    print(format_rows(hw, rows))
    if args.out:
        print(f"profile: {hw.save(args.out)}")
    return 0


if __name__ == "__main__":
    from dsv3.errors import run_cli

    raise SystemExit(run_cli("dsv3 plan calibrate", plan_calibrate_main))
