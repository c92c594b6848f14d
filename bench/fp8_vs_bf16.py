"""FP8 vs BF16 training of the same model on the same data (§3.3, App. B.1; DESIGN §4).

Trains a preset (default `small`) from the same seed on the same batches with the emulated BF16
GEMMs (`convert(model, "bf16")`) and with fine-grained FP8 (`convert(model, "fp8")`); every other
operation (embedding, head, gate, norms, attention core, optimizer) is identical. Reports the
relative difference of the training loss (mean over the last 100 steps; the paper's bound is 0.25%),
the validation loss, step times, peak memory and the activation bytes saved for backward. A third
run with FP32 GEMMs (the unconverted model) measures the noise floor: how far two runs that differ
only by a tiny rounding perturbation drift apart in this set-up.

Both runs are emulations on CPU: the FP8 GEMMs are the FP32 reference of the promoted block-scaled
kernel, the BF16 GEMMs round operands to BF16 and accumulate in FP32. Step times are emulation times
of this machine, not hardware numbers. The runs go in separate processes at the same time, one thread
each, so that they share whatever load the machine carries; CPU seconds per step are the steadier figure.

    .venv/bin/python bench/fp8_vs_bf16.py                       # 500 steps of `small`, 8 x 128 tokens
    .venv/bin/python bench/fp8_vs_bf16.py --steps 20 --preset tiny --batch 4 --seq 64   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from dsv3 import paper
from dsv3.config import ModelConfig
from dsv3.fp8 import convert
from dsv3.model.transformer import Transformer
from dsv3.optim import MixedPrecisionAdamW, param_groups

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("bf16", "fp8", "fp32")  # fp32: the unconverted model, the noise-floor reference


# ---- data ------------------------------------------------------------------------------------------
class SyntheticData:
    """A fixed synthetic corpus (used when the bundled one cannot be prepared): a seeded random
    bigram process with Zipf-like next-token distributions, so there is something to learn."""

    def __init__(self, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.g = vocab, g
        self.next_tokens = torch.randint(0, vocab, (vocab, 16), generator=g)  # 16 successors per token
        self.probs = 1.0 / torch.arange(1, 17).float()

    def next_batch(self, batch: int, seq: int) -> torch.Tensor:
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab, (batch,), generator=self.g)
        for t in range(seq):
            choice = torch.multinomial(self.probs.expand(batch, -1), 1, generator=self.g)[:, 0]
            tokens[:, t + 1] = self.next_tokens[tokens[:, t], choice]
        return tokens


def make_data(args):
    """-> (next_batch() -> [B, T+1], val batches, description)."""
    if args.data == "corpus":
        try:
            from dsv3.data import DataConfig, PackedLoader, prepare_data, val_batches

            data = prepare_data(DataConfig(vocab_size=args.vocab, seed=args.seed, progress=False))
            loader = PackedLoader(data.train, args.seq, seed=args.seed)
            val = list(val_batches(data.val, args.seq, args.batch, max_batches=args.val_batches))
            desc = f"bundled corpus ({len(data.train):,} training tokens, {args.vocab}-entry BPE)"
            return (lambda: loader.next_batch(args.batch)), val, desc
        except Exception as e:  # noqa: BLE001 - any failure: fall back and say so
            print(f"bundled corpus unavailable ({type(e).__name__}: {e}); using the synthetic corpus")
    synth = SyntheticData(args.vocab, args.seed)
    val_data = SyntheticData(args.vocab, args.seed)  # same process: the same distribution
    val_data.g.manual_seed(args.seed + 1)
    val = [val_data.next_batch(args.batch, args.seq) for _ in range(args.val_batches)]
    return (lambda: synth.next_batch(args.batch, args.seq)), val, "synthetic bigram corpus"


# ---- measurements -------------------------------------------------------------------------------------
def saved_activation_bytes(model: Transformer, batch: torch.Tensor) -> dict[str, int]:
    """Bytes of the tensors autograd keeps for backward in one training forward, by dtype.
    Parameters (and views of them) are not activations and are left out; shared storages count once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    by_dtype: dict[str, int] = defaultdict(int)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen and storage.nbytes():
            seen.add(ptr)
            by_dtype[str(t.dtype).removeprefix("torch.")] += storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.loss(batch)
    del out
    return dict(by_dtype)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(recipe: str, args) -> dict:
    torch.set_num_threads(args.threads)
    next_batch, val, data_desc = make_data(args)
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_preset(args.preset, vocab_size=args.vocab)
    model = Transformer(cfg)
    if recipe != "fp32":
        convert(model, recipe)
    opt = MixedPrecisionAdamW(param_groups(model, paper.WEIGHT_DECAY), lr=args.lr, betas=paper.ADAMW_BETAS)
    log = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = next_batch()
        cpu, wall = time.process_time(), time.perf_counter()
        out = model.loss(batch)
        out.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), paper.GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias(paper.BIAS_UPDATE_SPEED)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        log.append(
            dict(loss=out.main.item(), mtp=out.mtp.item(), grad_norm=grad_norm.item(), cpu=cpu, wall=wall)
        )
        if step % args.print_every == 0 or step == args.steps - 1:
            print(
                f"[{recipe}] step {step:4d} loss {out.main.item():.4f} cpu {cpu:.2f}s wall {wall:.2f}s",
                flush=True,
            )
    model.eval()
    with torch.no_grad():
        val_loss = sum(model.loss(b).main.item() for b in val) / len(val)
    saved = saved_activation_bytes(model, val[0][: args.batch])
    tokens = val[0][: args.batch].shape[0] * args.seq
    return dict(
        recipe=recipe,
        data=data_desc,
        log=log,
        val_loss=val_loss,
        saved_bytes_per_token={k: v / tokens for k, v in saved.items()},
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        optimizer_state_mb=opt.state_bytes() / 2**20,
        params=model.num_params(),
    )


# ---- report ---------------------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def summarize(runs: dict[str, dict], args) -> dict:
    recipes = list(runs)
    tail = min(100, args.steps)
    mean_tail = {r: sum(s["loss"] for s in runs[r]["log"][-tail:]) / tail for r in recipes}
    skip = min(10, args.steps - 1)  # the first steps include allocator warm-up
    rel = lambda a, b: (a - b) / b  # noqa: E731
    res = dict(
        preset=args.preset,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        lr=args.lr,
        data=runs["bf16"]["data"],
        tail_steps=tail,
        recipes=recipes,
        rel_loss_diff=rel(mean_tail["fp8"], mean_tail["bf16"]),
        rel_val_loss_diff=rel(runs["fp8"]["val_loss"], runs["bf16"]["val_loss"]),
        bound=paper.FP8_REL_LOSS_ERROR_BOUND,
    )
    if "fp32" in runs:  # the noise floor: the same perturbation test between FP32 and BF16 GEMMs
        res["fp32_rel_loss_diff"] = rel(mean_tail["fp32"], mean_tail["bf16"])
        res["fp32_rel_val_loss_diff"] = rel(runs["fp32"]["val_loss"], runs["bf16"]["val_loss"])
    # The GEMM caches: everything the swapped modules keep. The rest of the saved tensors (norms,
    # attention, softmax, losses) are the same FP32 tensors in both runs, so the FP8 scales are the
    # extra FP32 bytes of the FP8 run; nothing but the BF16 run's GEMM caches is BF16.
    by = {r: runs[r]["saved_bytes_per_token"] for r in recipes}
    fp8_extra_fp32 = by["fp8"].get("float32", 0.0) - by["bf16"].get("float32", 0.0)
    gemm_cache = {
        "bf16": by["bf16"].get("bfloat16", 0.0),
        "fp8": by["fp8"].get("float8_e4m3fn", 0.0) + by["fp8"].get("float16", 0.0) + fp8_extra_fp32,
    }
    for r in recipes:
        log = runs[r]["log"][skip:]
        res[r] = dict(
            tail_loss=mean_tail[r],
            val_loss=runs[r]["val_loss"],
            cpu_s_per_step=_median([s["cpu"] for s in log]),
            wall_s_per_step=_median([s["wall"] for s in log]),
            peak_rss_mb=runs[r]["peak_rss_mb"],
            optimizer_state_mb=runs[r]["optimizer_state_mb"],
            saved_bytes_per_token=sum(by[r].values()),
            gemm_cache_bytes_per_token=gemm_cache.get(r, float("nan")),
            saved_bytes_per_token_by_dtype=by[r],
            losses=[s["loss"] for s in runs[r]["log"]],
        )
    return res


LABELS = {"bf16": "BF16 (emulated)", "fp8": "FP8 (emulated)", "fp32": "FP32 GEMMs (reference)"}


def table(res: dict) -> str:
    recipes = res["recipes"]

    def row(name, key, fmt):
        cells = " | ".join(fmt.format(res[r][key]) for r in recipes)
        return f"| {name} | {cells} | {res['fp8'][key] / res['bf16'][key]:.2f}x |"

    dtypes = sorted({k for r in recipes for k in res[r]["saved_bytes_per_token_by_dtype"]})
    split = lambda d: ", ".join(f"{k} {d[k]:,.0f}" for k in dtypes if d.get(k))  # noqa: E731
    lines = [
        f"{res['preset']} preset, {res['steps']} steps of {res['batch']} x {res['seq']} tokens, "
        f"peak lr {res['lr']}, {res['data']}",
        "",
        "| | " + " | ".join(LABELS[r] for r in recipes) + " | FP8 / BF16 |",
        "|---|" + "---|" * (len(recipes) + 1),
        row(f"train loss, mean of last {res['tail_steps']} steps", "tail_loss", "{:.4f}"),
        row("validation loss", "val_loss", "{:.4f}"),
        row("CPU s/step (1 thread, emulation)", "cpu_s_per_step", "{:.2f}"),
        row("wall s/step (shared machine)", "wall_s_per_step", "{:.2f}"),
        row("peak RSS, MB", "peak_rss_mb", "{:.0f}"),
        row("optimizer state, MB", "optimizer_state_mb", "{:.1f}"),
        row("saved activation bytes/token, all", "saved_bytes_per_token", "{:,.0f}"),
        row("... of which GEMM caches (inputs + scales)", "gemm_cache_bytes_per_token", "{:,.0f}"),
        "| ... all, by dtype | "
        + " | ".join(split(res[r]["saved_bytes_per_token_by_dtype"]) for r in recipes)
        + " | |",
        "",
        f"Relative loss difference (FP8 - BF16) / BF16: training (mean of the last {res['tail_steps']} "
        f"steps) **{100 * res['rel_loss_diff']:+.3f}%**, validation {100 * res['rel_val_loss_diff']:+.3f}% "
        f"(paper bound: {100 * res['bound']:.2f}%).",
    ]
    if "fp32_rel_loss_diff" in res:
        lines.append(
            f"Noise floor, (FP32 - BF16) / BF16 in the same set-up: training "
            f"{100 * res['fp32_rel_loss_diff']:+.3f}%, validation {100 * res['fp32_rel_val_loss_diff']:+.3f}%."
        )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ema(xs, a=0.05):
        out, m = [], xs[0]
        for x in xs:
            m = (1 - a) * m + a * x
            out.append(m)
        return out

    colors = {"bf16": "tab:blue", "fp8": "tab:red", "fp32": "tab:gray"}
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[2, 1])
    for r in res["recipes"]:
        losses = res[r]["losses"]
        ax.plot(losses, color=colors[r], alpha=0.15, lw=0.7)
        ax.plot(ema(losses), color=colors[r], label=f"{LABELS[r]}, EMA 0.05")
    ax.set_ylabel("training loss (main next-token CE)")
    ax.set_title(
        f"FP8 vs BF16, both emulated on CPU: {res['preset']}, {res['batch']}x{res['seq']} tokens/step"
    )
    ax.legend()
    ax.set_ylim(top=min(ax.get_ylim()[1], res["bf16"]["losses"][0] + 0.5))
    base = ema(res["bf16"]["losses"])
    for r in res["recipes"]:
        if r != "bf16":
            rel = [100 * (x - b) / b for x, b in zip(ema(res[r]["losses"]), base)]
            ax2.plot(rel, color=colors[r], lw=1, label=f"({r.upper()} - BF16) / BF16")
    for y in (-100 * res["bound"], 100 * res["bound"]):
        ax2.axhline(y, color="k", ls="--", lw=0.8)
    ax2.set_ylabel("relative difference, % (EMA)")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---- driver -------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--data", choices=("corpus", "synthetic"), default="corpus")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--sequential", action="store_true", help="run the recipes one after the other")
    p.add_argument("--no-reference", action="store_true", help="skip the FP32 noise-floor run")
    p.add_argument("--print-every", type=int, default=25)
    p.add_argument("--plot", default=str(ROOT / "docs/img/fp8_vs_bf16.png"))
    p.add_argument("--json", default=str(ROOT / "docs/img/fp8_vs_bf16.json"))
    p.add_argument("--worker", choices=RECIPES, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(train(args.worker, args)))
        return
    start = time.time()
    argv = sys.argv[1:] if argv is None else argv
    recipes = RECIPES[:2] if args.no_reference else RECIPES
    with tempfile.TemporaryDirectory() as tmp:
        outs = {r: Path(tmp) / f"{r}.json" for r in recipes}
        cmds = {
            r: [sys.executable, __file__, *argv, "--worker", r, "--worker-out", str(outs[r])] for r in recipes
        }
        if args.sequential:
            for r in recipes:
                subprocess.run(cmds[r], check=True)
        else:
            procs = {r: subprocess.Popen(cmds[r]) for r in recipes}
            for r, proc in procs.items():
                if proc.wait() != 0:
                    raise SystemExit(f"the {r} run failed (exit code {proc.returncode})")
        runs = {r: json.loads(outs[r].read_text()) for r in recipes}
    res = summarize(runs, args)
    res["elapsed_min"] = (time.time() - start) / 60
    print()
    print(table(res))
    print(f"\n({res['elapsed_min']:.1f} min)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, Path(args.plot))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
