"""The deployment bench (DESIGN §8, paper §3.4; issue 17), one entry point in three sections:

    .venv/bin/python bench/deploy.py [--sections decode,prefill,kv] [decode options]
        [--prefill "PREFILL OPTIONS"] [--kv "KV OPTIONS"]

  decode   (this file) expert-parallel decoding on 4 gloo processes with skewed expert loads:
           throughput and per-rank load balance with no redundancy, static EPLB, live EPLB and
           dynamic redundancy, the measured balance beside the planner's prediction;
  prefill  bench/deploy_overlap.py (its options in --prefill, e.g. --prefill "--ranks 2 4"):
           prefill time with and without the two-micro-batch overlap, at 0 and injected all-to-all
           latencies, through `two_batch_hidden` and through `EPEngine.step` itself;
  kv       bench/deploy_kv.py's main (the disaggregated deployment's KV transfer: bytes and seconds
           per request; its options in --kv, e.g. --kv "--lens 16,1024 --reps 3"), when that file
           exists; otherwise a "not available" line.

Decode section:

    .venv/bin/python bench/deploy.py --sections decode [--ranks 4] [--preset tiny] [--loads FILE]
        [--requests 8] [--prompt-len 8] [--max-tokens 24] [--vocab 8] [--slots-per-rank S]
        [--hosted H] [--active A] [--eplb-interval 8]

Loads. From `--loads` (an `ExpertLoadStats.save` file of this model's MoE layers), else recorded
here: a single-process `Engine` serves skewed requests (prompt tokens drawn from the first
`--vocab` ids only, so a few experts get most tokens) and pushes the counts of its decode steps;
`--record-seed 2 --record-requests N` records the run's own N requests (seed 2), so that the
plans see exactly the loads the run then routes. The model is
the preset's seeded random init (a trained checkpoint's router is skewed by itself; here the data
skews it). The benchmark's own requests come from the same distribution with another seed.

Modes (every rank serves `--requests` requests; all prompts are prefilled in the first step, the
rest of the run is pure decode and is what is measured):
  none     E/P consecutive experts per rank, no replicas;
  static   the planner's placement from the loads, S slots per rank (default E/P + 1);
  live     starts from the plan for uniform loads, re-plans from its own window every
           `--eplb-interval` steps (weights moved between ranks while decoding);
  dynamic  H hosted (default S + 1), A active (default S) slots per rank, active set and token split
           per layer-step from the group's counts (one all-gather per layer).
Measured balance: per layer, max over ranks / mean of the token copies each rank's expert slots
processed during decode, averaged over layers. Predicted: the planner's own balancedness of that
placement on the recorded loads (dynamic: `dynamic_step`'s split of the recorded loads; live: its
final placement). Throughput: decode tokens of the group / the slowest rank's decode seconds. On a
shared 2-core machine 4 ranks contend for the cores: the throughput column compares modes within one
run, nothing more; the load average is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dsv3 import ModelConfig, Transformer, load_pretrained
from dsv3.checkpoint import read_config
from dsv3.deploy.ep_moe import DYNAMIC_SWEEPS
from dsv3.deploy.eplb_live import initial_placement
from dsv3.infer.engine import Engine, EngineConfig
from dsv3.infer.eplb.dynamic import dynamic_layer, dynamic_step
from dsv3.infer.eplb.placement import Placement, balancedness, loads_from_counts, unreplicated_counts
from dsv3.infer.eplb.stats import ExpertLoadStats
from dsv3.infer.llm import load_tokenizer
from dsv3.infer.sampling import SamplingParams
from dsv3.model.moe import MoE
from dsv3.parallel.launch import run_ranks

MODES = ("none", "static", "live", "dynamic")


def make_model(a: argparse.Namespace) -> Transformer:
    """The trained `--checkpoint` (its router is skewed by itself), else the preset's seeded init."""
    if a.checkpoint:
        return load_pretrained(a.checkpoint, verify=False)
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(a.preset))


def model_config(a: argparse.Namespace) -> ModelConfig:
    return read_config(Path(a.checkpoint)) if a.checkpoint else ModelConfig.from_preset(a.preset)


def engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(block_size=16, num_blocks=max(64, 4 * a.requests * a.ranks),
                        max_num_seqs=a.requests * a.ranks, max_num_batched_tokens=max(64, a.requests * a.prompt_len),
                        fast_decode=False)  # fmt: skip


def prompts(a: argparse.Namespace, n: int, seed: int) -> list[list[int]]:
    """n prompts of `--prompt-len` tokens: windows of `--text` at seeded offsets (tokenized by the
    checkpoint's tokenizer), else random ids among the first `--vocab` (the skew)."""
    g = torch.Generator().manual_seed(seed)
    if a.text:
        ids = text_ids(a)
        starts = torch.randint(0, len(ids) - a.prompt_len, (n,), generator=g).tolist()
        return [ids[i : i + a.prompt_len] for i in starts]
    return [torch.randint(1, 1 + a.vocab, (a.prompt_len,), generator=g).tolist() for _ in range(n)]


def text_ids(a: argparse.Namespace) -> list[int]:
    tokenizer = load_tokenizer(a.checkpoint)
    if tokenizer is None:
        raise SystemExit(f"--text: {a.checkpoint} has no tokenizer.json to encode {a.text} with")
    ids = tokenizer.encode(Path(a.text).read_text(errors="replace"))
    if len(ids) <= a.prompt_len:
        raise SystemExit(f"--text: {a.text} has {len(ids)} tokens, fewer than --prompt-len {a.prompt_len}")
    return ids


def params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)


def record_loads(a: argparse.Namespace) -> torch.Tensor:
    """[L, E] counts of a single-process run on skewed requests (module docstring)."""
    model = make_model(a)
    layers = [b.mlp for b in model.layers if isinstance(b.mlp, MoE)]
    stats = ExpertLoadStats(len(layers), model.config.n_routed_experts, window=100000)
    cfg = engine_config(a)  # every prompt prefilled in the first step, as each EP rank does
    engine = Engine(model, replace(cfg, max_num_batched_tokens=max(64, a.record_requests * a.prompt_len)))
    for p in prompts(a, a.record_requests, seed=a.record_seed):
        engine.add_request(p, params(a))
    while engine.has_unfinished():
        before = engine.stats.prefill_tokens
        engine.step()
        if engine.stats.prefill_tokens == before:  # decode steps only: what the measured run is
            stats.push([m.last_counts for m in layers])
    return stats.loads()


def ep_configs(a: argparse.Namespace, loads: torch.Tensor) -> dict:
    from dsv3.deploy.ep_engine import EPConfig

    return {
        "none": EPConfig(),
        "static": EPConfig(eplb="static", slots_per_rank=a.slots_per_rank, loads=loads),
        "live": EPConfig(eplb="live", slots_per_rank=a.slots_per_rank, eplb_interval=a.eplb_interval,
                         eplb_window=4 * a.eplb_interval),
        "dynamic": EPConfig(eplb="dynamic", slots_per_rank=a.hosted, active_per_rank=a.active, loads=loads),
    }  # fmt: skip


def worker(rank: int, world: int, a: argparse.Namespace, loads: torch.Tensor) -> dict:
    import torch.distributed as dist

    from dsv3.deploy.ep_engine import EPEngine, build_engine_groups, run_group

    group = build_engine_groups()
    mine = prompts(a, a.requests * world, seed=2)[rank * a.requests : (rank + 1) * a.requests]
    out = {}
    for name, cfg in ep_configs(a, loads).items():
        engine = EPEngine(make_model(a), group, engine_config(a), cfg)
        if name == "live":  # a first wave of requests, so that the measured one meets re-planned tables
            for p in prompts(a, a.requests * world, seed=1)[rank * a.requests : (rank + 1) * a.requests]:
                engine.add_request(p, params(a))
            run_group(engine)
        for p in mine:
            engine.add_request(p, params(a))
        engine.step()  # every prompt prefilled (and its first token sampled)
        engine.reset_counters()
        dist.barrier()
        start, done, steps, step_counts, used = time.perf_counter(), {}, [], [], []
        while engine.group_has_unfinished():
            before = engine.rank_load()
            counts_before = torch.stack([m.counts for m in engine.moe])
            used.append(engine.placement.phy2log.clone())  # the tables this step runs with
            done.update({o.request_id: o for o in engine.step()})
            steps.append(engine.rank_load() - before)  # (L,) this step's copies on my slots
            step_counts.append(torch.stack([m.counts for m in engine.moe]) - counts_before)  # (L, E)
        seconds = time.perf_counter() - start
        live = engine.live
        out[name] = {
            "tokens": sum(len(o.token_ids) - 1 for o in done.values()),
            "seconds": seconds,
            "rank_load": engine.rank_load(),
            "step_load": torch.stack(steps),  # (T, L)
            "step_counts": torch.stack(step_counts),  # (T, L, E) this rank's logical counts per step
            "used": torch.stack(used),  # (T, L, R) routing tables per step
            "counts": torch.stack([m.counts for m in engine.moe]),  # (L, E) this rank's logical counts
            "replan_s": live.seconds if live else 0.0,
            "calls": sum(m.calls for m in engine.moe),
            "layer_s": sum(m.seconds for m in engine.moe),
            "plan_s": sum(m.plan_seconds for m in engine.moe),
            "replans": live.replans if live else 0,
            "bytes_moved": live.bytes_moved if live else 0,
            "phy2log": engine.placement.phy2log.clone(),
        }
    return out


def predicted(a, name: str, loads: torch.Tensor, cfg, ranks: int, final: torch.Tensor) -> float:
    """The planner's balancedness of the mode's placement on the recorded loads (mean over layers)."""
    L, E = loads.shape
    mcfg = model_config(a)
    if name == "none":
        gpu = loads_from_counts(loads, unreplicated_counts(L, E, ranks))
    elif name == "dynamic":
        hosting = initial_placement(mcfg, L, ranks, cfg)
        _, quota = dynamic_step(hosting, loads, a.active)
        gpu = quota.view(L, ranks, -1).sum(-1).double()
    elif name == "live":
        gpu = Placement.from_phy2log(final, E, ranks).gpu_loads(loads)
    else:
        gpu = initial_placement(mcfg, L, ranks, cfg).gpu_loads(loads)
    return float(balancedness(gpu).mean())


SECTIONS = ("decode", "prefill", "kv")


def _bench_module(name: str):
    """bench/NAME.py as a module (bench/ is not a package), or None when the file is absent."""
    path = Path(__file__).with_name(f"{name}.py")
    if not path.exists():
        return None
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # before exec: its rank workers are pickled by module name
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _call_main(module, argv: list[str]) -> None:
    """module.main(argv) when it takes an argument list, else module.main() with sys.argv = argv."""
    if inspect.signature(module.main).parameters:
        module.main(argv)
        return
    saved, sys.argv = sys.argv, [module.__file__, *argv]
    try:
        module.main()
    finally:
        sys.argv = saved


def prefill_section(a: argparse.Namespace) -> None:
    print("\n== prefill: two-micro-batch overlap (bench/deploy_overlap.py) ==")
    _call_main(_bench_module("deploy_overlap"), shlex.split(a.prefill))


def kv_section(a: argparse.Namespace) -> None:
    print("\n== kv: prefill -> decode KV transfer (bench/deploy_kv.py) ==")
    module = _bench_module("deploy_kv")
    if module is None:
        print("kv: not available (bench/deploy_kv.py is not in this checkout)")
        return
    _call_main(module, shlex.split(a.kv))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    ap.add_argument("--prefill", default="", help="options of bench/deploy_overlap.py (one quoted string)")
    ap.add_argument("--kv", default="", help="options of bench/deploy_kv.py (one quoted string)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument(
        "--checkpoint", help="a trained checkpoint (e.g. the demo's) instead of the preset's random init"
    )
    ap.add_argument(
        "--text", help="prompts from this text file (needs --checkpoint's tokenizer) instead of random ids"
    )
    ap.add_argument("--loads", help="an ExpertLoadStats file of this model (default: record them)")
    ap.add_argument("--requests", type=int, default=8, help="requests per rank")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=8, help="prompt tokens drawn from ids 1..vocab (the skew)")
    ap.add_argument("--slots-per-rank", type=int)
    ap.add_argument("--hosted", type=int)
    ap.add_argument("--active", type=int)
    ap.add_argument("--eplb-interval", type=int, default=8)
    ap.add_argument("--record-requests", type=int, help="requests of the recording (default: 4 x the run's)")
    ap.add_argument("--record-seed", type=int, default=1, help="2: the run's own requests (its exact loads)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="of the max/mean target (integer splits)")
    a = ap.parse_args(argv)
    if a.text and not a.checkpoint:
        ap.error("--text: needs --checkpoint (its tokenizer encodes the text)")
    a.sections = [x.strip() for x in a.sections.split(",") if x.strip()]
    bad = [x for x in a.sections if x not in SECTIONS]
    if bad or not a.sections:
        ap.error(f"--sections: expected a comma-separated subset of {SECTIONS}, got {bad or a.sections}")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    for name in a.sections:
        {"decode": decode_section, "prefill": prefill_section, "kv": kv_section}[name](a)


def decode_section(a: argparse.Namespace) -> None:
    print("== decode: EPLB modes on skewed loads ==")
    E = model_config(a).n_routed_experts
    a.slots_per_rank = a.slots_per_rank or -(-E // a.ranks) + 1
    a.active = a.active or a.slots_per_rank
    a.hosted = a.hosted or a.active + 1
    a.record_requests = a.record_requests or 4 * a.requests * a.ranks
    loads = ExpertLoadStats.load(a.loads).loads() if a.loads else record_loads(a)
    source = (
        a.loads or f"recorded: {a.record_requests} skewed requests (seed {a.record_seed}), single process"
    )
    print(f"loads [{loads.shape[0]} layers x {loads.shape[1]} experts] from {source}; "
          f"max/mean expert load per layer {[round(float(x), 2) for x in loads.float().max(1).values / loads.float().mean(1)]}")  # fmt: skip
    load_before = os.getloadavg()[0]
    res = run_ranks(worker, a.ranks, a, loads, timeout=120, deadline=1200)
    load_after = os.getloadavg()[0]
    cfgs = ep_configs(a, loads)
    print(f"\n{a.ranks} ranks (gloo), {a.checkpoint or a.preset}, {a.requests} requests per rank, {a.max_tokens} tokens each; "
          f"S={a.slots_per_rank} slots/rank (static, live), H={a.hosted} hosted / A={a.active} active (dynamic)")  # fmt: skip
    head = (f"{'mode':8} {'decode tok/s':>12} {'max/mean measured':>18} {'per step':>9} {'predicted':>10} {'pred. (run)':>11} "
            f"{'replans':>8} {'MB moved':>9} {'replan s':>9} {'layer ms':>9} {'plan ms':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    rows = {}
    for name in MODES:
        per = [r[name] for r in res]
        tokens, seconds = sum(p["tokens"] for p in per), max(p["seconds"] for p in per)
        load = torch.stack([p["rank_load"] for p in per]).double()  # (P, L)
        measured = float(balancedness(load.T).mean())
        step_load = torch.stack([p["step_load"] for p in per]).double()  # (P, T, L)
        per_step = float((step_load.max(0).values.sum(0) / step_load.mean(0).sum(0)).mean())
        pred = predicted(a, name, loads, cfgs[name], a.ranks, per[0]["phy2log"])
        run_loads = sum(p["counts"] for p in per)  # (L, E) the group's loads during the measured decode
        pred_run = predicted(a, name, run_loads, cfgs[name], a.ranks, per[0]["phy2log"])
        if name == "dynamic":  # the split is chosen per step: each step's loads, as the ranks split them
            counts = sum(p["step_counts"] for p in per)  # (T, L, E)
            hosting = initial_placement(model_config(a), loads.shape[0], a.ranks, cfgs[name])
            gpu = sum(
                torch.stack([dynamic_layer(hosting.phy2log[i], a.ranks, c[i], a.active, DYNAMIC_SWEEPS)[1]
                             .view(a.ranks, -1).sum(-1) for i in range(c.shape[0])]).double()
                for c in counts
            )  # fmt: skip
            pred_run = float(balancedness(gpu).mean())
        if name == "live":  # the tables change during the run: each step's loads on that step's tables
            counts = sum(p["step_counts"] for p in per)  # (T, L, E)
            gpu = sum(Placement.from_phy2log(t, loads.shape[1], a.ranks).gpu_loads(c)
                      for t, c in zip(per[0]["used"], counts))  # fmt: skip
            pred_run = float(balancedness(gpu).mean())
        calls = sum(p["calls"] for p in per)
        layer_ms = 1e3 * sum(p["layer_s"] for p in per) / max(calls, 1)
        plan_ms = 1e3 * sum(p["plan_s"] for p in per) / max(calls, 1)
        moved = sum(p["bytes_moved"] for p in per) / 2**20
        rows[name] = (measured, pred, pred_run)
        print(f"{name:8} {tokens / seconds:12.1f} {measured:18.3f} {per_step:9.3f} {pred:10.3f} {pred_run:11.3f} "
              f"{per[0]['replans']:8d} {moved:9.3f} {max(p['replan_s'] for p in per):9.3f} {layer_ms:9.3f} "
              f"{plan_ms:8.3f}")  # fmt: skip
    print("\nmeasured: max/mean of the rank loads summed over the decode; per step: sum over steps of the")
    print("slowest rank's load / sum of the mean (what a synchronised step waits for).")
    print("predicted: on the recorded loads (what the plans were made from); pred. (run): on the loads the")
    print("measured decode itself routed (same placement; live: every step on its own tables; dynamic: every")
    print("step's loads split as the ranks split them). Live plans from its own window (uniform start, a")
    print("first wave of requests before the measured one). layer ms / plan ms: mean per MoE layer call")
    print("(plan: the dynamic replica choice, part of the layer time); MB moved: the group's.")
    print(
        f"targets: measured lowering >= predicted lowering - {a.tolerance} (copies are whole tokens per step)"
    )
    for name in ("static", "live", "dynamic"):
        for col, label in ((1, "recorded loads"), (2, "run's loads")):
            got, want = rows["none"][0] - rows[name][0], rows["none"][col] - rows[name][col]
            verdict = "ok" if got >= want - a.tolerance else "BELOW"
            print(
                f"target {name:7}: measured max/mean lowered by {got:.3f}, predicted on the {label} "
                f"{want:.3f}: {verdict}"
            )
    print(f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
