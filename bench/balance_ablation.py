"""Load-balancing ablation on the `small` preset, in the form of Wang et al. 2024, Table 2 (DESIGN §3.5).

The same model, data, seed and number of steps, trained several ways:
  - aux-loss-free:  the V3 bias update (gamma), no balance loss
  - aux-loss:       no bias update, a sequence-wise balance loss large enough to balance (alpha)
  - neither:        no bias update, no balance loss
  - V3 recipe:      bias update + the complementary alpha = 1e-4 balance loss (what `dsv3 train` does)
For each: validation loss, MaxVio_global (validation set) and MaxVio_batch (mean over the last
quarter of training), plus a plot of MaxVio_batch over training.

    python bench/balance_ablation.py --steps 500          # ~4 x 17 min on 2 quiet cores (FP32)
    python bench/balance_ablation.py --steps 500 --only aux-loss-free,neither
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsv3.train import TrainConfig, Trainer  # noqa: E402

RUNS = {
    "aux-loss-free": {"gamma": 1e-3, "alpha": 0.0},
    "aux-loss": {"gamma": 0.0, "alpha": 1e-2},
    "neither": {"gamma": 0.0, "alpha": 0.0},
    "V3 recipe": {"gamma": 1e-3, "alpha": 1e-4},
}


def run(name: str, settings: dict, steps: int, out: Path, gamma: float | None) -> dict:
    settings = dict(settings)
    if gamma is not None and settings["gamma"] > 0:
        settings["gamma"] = gamma
    cfg = TrainConfig(
        preset="small", steps=steps, out=str(out / name.replace(" ", "_")), seq_len=256, micro_batch=8,
        batch_start=8, batch_end=8, lr=2e-3, warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 5),
        eval_batches=16, ckpt_every=steps, keep_last=1, precision="fp32", tensorboard=False, **settings,
    )  # fmt: skip
    trainer = Trainer(cfg, resume=True)
    result = trainer.fit() if trainer.step < steps else trainer.evaluate()
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    tail = train[-max(1, len(train) // 4) :]
    return {
        "name": name, **settings, "val_loss": result["val_loss"], "maxvio_global": result["maxvio_global"],
        "maxvio_batch": sum(r["maxvio_batch"] for r in tail) / len(tail),
        "curve": [(r["step"], r["maxvio_batch"]) for r in train],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default="runs/balance_ablation")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(RUNS))
    ap.add_argument("--gamma", type=float, help="bias update speed for the runs that use it (default 1e-3)")
    ap.add_argument("--plot", default="docs/img/balance_maxvio.png")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    out = Path(args.out)
    results = [run(n, RUNS[n], args.steps, out, args.gamma) for n in names]
    print(f"\nsmall preset, {args.steps} steps x 8 x 256 tokens, lr 2e-3, same seed and data")
    print(
        f"{'method':<15} {'gamma':>7} {'alpha':>7} {'val loss':>9} {'MaxVio_global':>14} {'MaxVio_batch':>13}"
    )
    for r in results:
        print(f"{r['name']:<15} {r['gamma']:>7g} {r['alpha']:>7g} {r['val_loss']:>9.3f} "
              f"{r['maxvio_global']:>14.3f} {r['maxvio_batch']:>13.3f}")  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        xs, ys = zip(*r["curve"])
        k = 10
        smooth = [
            sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))
        ]
        ax.plot(xs, smooth, label=f"{r['name']} (gamma {r['gamma']:g}, alpha {r['alpha']:g})")
    ax.set(xlabel="step", ylabel="MaxVio_batch (10-step mean)", title="Expert load balance, small preset")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
