"""`dsv3 plot RUN_DIR`: loss curves (train/val, main/MTP), learning rate, MaxVio, expert-load heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dsv3.train.log import read_log  # noqa: E402


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r["kind"] == kind and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(y: list[float], window: int = 10) -> np.ndarray:
    if len(y) < window:
        return np.asarray(y)
    kernel = np.ones(window) / window
    return np.convolve(np.asarray(y), kernel, mode="valid")


def plot_run(run: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the run's PNGs; returns their paths."""
    run = Path(run)
    out = Path(out) if out else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    records = read_log(run)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, key, label, style in (
        ("train", "main_loss", "train (main)", "-"),
        ("train", "mtp_loss", "train (MTP)", "-"),
        ("eval", "val_loss", "validation (main)", "o-"),
        ("eval", "val_mtp_loss", "validation (MTP)", "s--"),
    ):
        x, y = _series(records, kind, key)
        if not x:
            continue
        if kind == "train" and len(y) >= 10:
            ax.plot(x[9:], _smooth(y), style, label=label + ", 10-step mean", alpha=0.9)
        else:
            ax.plot(x, y, style, label=label)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"Loss: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    x, y = _series(records, "train", "lr")
    ax.plot(x, y)
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate schedule")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "lr.png"))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    x, y = _series(records, "train", "maxvio_batch")
    if x:
        ax.plot(x, y, alpha=0.4, label="MaxVio_batch")
        if len(y) >= 10:
            ax.plot(x[9:], _smooth(y), label="MaxVio_batch, 10-step mean")
    x, y = _series(records, "eval", "maxvio_global")
    if x:
        ax.plot(x, y, "o-", label="MaxVio_global (validation)")
    ax.set(xlabel="step", ylabel="MaxVio", title="Expert load imbalance (0 = perfectly balanced)")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "maxvio.png"))

    loads = run / "expert_load.jsonl"
    if loads.exists() and loads.stat().st_size:
        last = json.loads(loads.read_text().strip().splitlines()[-1])
        counts = np.asarray(last["counts"], dtype=float)  # (layers, experts)
        share = counts / counts.mean(axis=1, keepdims=True)
        fig, ax = plt.subplots(figsize=(max(6, counts.shape[1] * 0.45), 1.2 + 0.5 * counts.shape[0]))
        im = ax.imshow(share, aspect="auto", cmap="viridis")
        ax.set(
            xlabel="expert",
            ylabel="MoE layer",
            title=f"Expert load / mean load (validation, step {last['step']})",
        )
        ax.set_yticks(range(counts.shape[0]))
        fig.colorbar(im, ax=ax, label="load / mean")
        paths.append(_save(fig, out / "expert_load.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
