"""Long-context evaluation (§4.3): passkey retrieval ("needle in a haystack") at lengths up to the
model's context, scored by exact match and plotted by length and depth; and the validation loss by
position bucket (does the model use, or at least survive, positions past its pre-training length?).

A passkey prompt is filler text from the corpus (Shakespeare) with one sentence holding a random
5-digit key inserted at a relative depth (0: the start, 1: just before the question), then the
question; the model must write the key:

    <bos> ...filler... The pass key is 48213. Remember it. 48213 is the pass key. ...filler...
    What is the pass key? The pass key is

Lengths are in tokens of the whole prompt (bos included), so a row of length L tests positions up
to L - 1 and the answer's positions just past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3.evals.tasks import Task

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def filler_text(max_chars: int = 400_000) -> str:
    """Shakespeare's works, concatenated (the haystack)."""
    from dsv3.data.corpus import shakespeare_documents

    text = "\n".join(d.text for d in shakespeare_documents())
    return text[:max_chars]


def passkey_rows(
    tok,
    lengths: Sequence[int],
    depths: Sequence[float],
    per_cell: int,
    seed: int = 0,
    filler: str | None = None,
) -> list[dict[str, Any]]:
    """`per_cell` prompts for every (length, depth), each with its own key and filler window."""
    filler_ids = tok.encode(filler if filler is not None else filler_text())
    rng = np.random.default_rng(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                prompt, key = _passkey_prompt(tok, filler_ids, rng, length, depth)
                rows.append({"prompt": prompt, "answer": key, "length": length, "depth": depth})
    return rows


def _passkey_prompt(
    tok, filler_ids: list[int], rng: np.random.Generator, length: int, depth: float
) -> tuple[str, str]:
    """One prompt of `length` tokens with its needle at relative `depth`, and its key."""
    key = str(int(rng.integers(10_000, 100_000)))
    needle, question = tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION)
    room = length - 1 - len(needle) - len(question)
    if room < 0:
        from dsv3.cli import UsageError

        raise UsageError(f"--lengths {length}: too short for the needle and the question")
    start = int(rng.integers(0, len(filler_ids) - room))
    hay = filler_ids[start : start + room]
    cut = round(depth * room)
    # decode pieces separately: the token count is what the model sees, up to merges
    prompt = tok.decode(hay[:cut]) + NEEDLE.format(key=key) + tok.decode(hay[cut:]) + QUESTION.lstrip(" ")
    return prompt, key


def passkey_training_rows(
    tok, n: int, min_len: int, max_len: int, seed: int = 0, filler: str | None = None
) -> list[dict[str, str]]:
    """`n` prompt-completion rows for learning the task: prompts as the evaluation's, of a length
    drawn uniformly in [min_len, max_len] tokens with the needle at a uniform depth, and the
    completion " KEY." that the evaluation's exact match reads. Keys and filler windows come from
    their own random stream (seed + 7919): with the evaluation's default seeds no prompt repeats."""
    if not 0 < min_len <= max_len:
        from dsv3.cli import UsageError

        raise UsageError(f"--lengths {min_len}-{max_len}: need 0 < min <= max")
    filler_ids = tok.encode(filler if filler is not None else filler_text())
    rng = np.random.default_rng(seed + 7919)
    rows = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        prompt, key = _passkey_prompt(tok, filler_ids, rng, length, float(rng.random()))
        rows.append({"prompt": prompt, "completion": f" {key}."})
    return rows


def passkey_task(tok, lengths, depths, per_cell: int = 5, seed: int = 0, filler: str | None = None) -> Task:
    rows = passkey_rows(tok, lengths, depths, per_cell, seed, filler)
    return Task(name="passkey", kind="generate", rows=rows, scoring="exact_match", extract="first_word",
                max_tokens=8, temperatures=(0.0,), description="passkey retrieval by length and depth")  # fmt: skip


def passkey_choice_task(
    tok, lengths, depths, per_cell: int = 5, seed: int = 0, filler: str | None = None, n_choices: int = 10
) -> Task:
    """The same prompts as passkey_task, scored by log-likelihood instead of generation: the true key
    against `n_choices - 1` random 5-digit keys that are not in the prompt, as a continuation of
    "The pass key is". Chance is 1 / n_choices. It separates a model that attends to the needle,
    however weakly, from one that does not, where exact match of a generated key is all or nothing
    (a small model that prefers the right key may still not write all five digits)."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    for row in passkey_rows(tok, lengths, depths, per_cell, seed, filler):
        keys = {row["answer"]}
        while len(keys) < n_choices:
            k = str(int(rng.integers(10_000, 100_000)))
            if k not in row["prompt"]:
                keys.add(k)
        choices = [" " + k for k in rng.permutation(sorted(keys))]
        rows.append({"query": row["prompt"], "choices": choices, "answer": choices.index(" " + row["answer"]),
                     "length": row["length"], "depth": row["depth"]})  # fmt: skip
    return Task(name="passkey_choice", kind="multiple_choice", rows=rows,
                description=f"passkey retrieval by log-likelihood among {n_choices} keys")  # fmt: skip


def accuracy_grid(task: Task, result: dict[str, Any]) -> dict[str, Any]:
    """Accuracy by (length, depth) and by length, from an `evaluate_task` result of passkey_task
    (exact match) or passkey_choice_task (the true key has the highest log-likelihood)."""
    cells: dict[tuple[int, float], list[int]] = {}
    if task.kind == "multiple_choice":
        details = [{"row": d["row"], "correct": int(d["pick"] == d["answer"])} for d in result["details"]]
    else:
        details = result["runs"][0]["details"]
    for d in details:
        row = task.rows[d["row"]]
        cells.setdefault((row["length"], row["depth"]), []).append(d["correct"])
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = [[float(np.mean(cells[(n, d)])) for d in depths] for n in lengths]
    by_length = {
        str(n): float(np.mean([c for (m, _), v in cells.items() if m == n for c in v])) for n in lengths
    }
    return {"lengths": lengths, "depths": depths, "accuracy": grid, "by_length": by_length}


def plot_passkey(grids: dict[str, dict[str, Any]], path: str | Path, chance: float | None = None) -> Path:
    """Accuracy by length (one line per model; `chance` drawn as a line) and a length x depth
    heatmap per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(grids)
    fig, axes = plt.subplots(1, n + 1, figsize=(4 * (n + 1), 3.4), squeeze=False)
    ax = axes[0][0]
    for name, g in grids.items():
        ax.plot(g["lengths"], [g["by_length"][str(x)] for x in g["lengths"]], marker="o", label=name)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.set(xlabel="prompt length (tokens)", ylabel="passkey accuracy", ylim=(-0.05, 1.05), xscale="log")
    ticks = sorted({x for g in grids.values() for x in g["lengths"]})
    ax.set_xticks(ticks, [str(x) for x in ticks])  # the lengths themselves, not 10^k and overlapping minors
    ax.minorticks_off()
    ax.legend()
    for ax, (name, g) in zip(axes[0][1:], grids.items()):
        im = ax.imshow(
            np.array(g["accuracy"]).T, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower"
        )
        ax.set_xticks(range(len(g["lengths"])), [str(x) for x in g["lengths"]])
        ax.set_yticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]])
        ax.set(title=name, xlabel="length", ylabel="depth")
    fig.colorbar(im, ax=axes[0][-1])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def loss_by_position(model, batches, n_buckets: int = 8) -> list[dict[str, float]]:
    """Mean next-token loss in `n_buckets` equal position ranges over packed batches [B, T+1]."""
    total, count = None, None
    for batch in batches:
        logits = model(batch[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch[:, 1:], reduction="none"
        )  # (B, T)
        total = nll.sum(0) if total is None else total + nll.sum(0)
        count = batch.shape[0] if count is None else count + batch.shape[0]
    if total is None:
        raise ValueError("loss_by_position: no batches")
    T = total.shape[0]
    edges = [round(i * T / n_buckets) for i in range(n_buckets + 1)]
    return [{"start": a, "end": b, "loss": float(total[a:b].sum() / (count * (b - a)))}
            for a, b in zip(edges, edges[1:]) if b > a]  # fmt: skip


def plot_loss_by_position(
    curves: dict[str, list[dict[str, float]]], path: str | Path, mark: int | None = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, buckets in curves.items():
        ax.plot(
            [(b["start"] + b["end"]) / 2 for b in buckets],
            [b["loss"] for b in buckets],
            marker="o",
            label=name,
        )
    if mark:
        ax.axvline(mark, color="grey", linestyle="--", label=f"pre-training length {mark}")
    ax.set(xlabel="position", ylabel="validation loss (nats)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def checkpoint_val_batches(ckpt: str | Path, seq_len: int, batch_size: int, max_batches: int):
    """Validation batches of the run that wrote training checkpoint `ckpt`, at `seq_len`."""
    from dsv3.data.dataset import DataConfig, prepare_data
    from dsv3.data.loader import val_batches
    from dsv3.train.cli import _saved_config
    from dsv3.train.config import TrainConfig

    cfg = TrainConfig.build({**_saved_config(Path(ckpt)), "tokenizer": str(ckpt)})
    data = prepare_data(DataConfig(data=cfg.data, tokenizer=str(ckpt), val_fraction=cfg.val_fraction, seed=cfg.seed,
                                   max_bytes=cfg.max_corpus_bytes, fim_rate=cfg.fim_rate, progress=False))  # fmt: skip
    return list(val_batches(data.val, seq_len, batch_size, max_batches=max_batches))


def long_context_main(argv: list[str]) -> int:
    """`dsv3 eval --long-context --ckpt CKPT [...]`: passkey accuracy and loss by position."""
    import argparse
    import json

    from dsv3.cli import existing_dir, positive_int
    from dsv3.evals.backends import LocalBackend
    from dsv3.evals.runner import evaluate_task
    from dsv3.threads import add_threads_argument, configure_threads

    p = argparse.ArgumentParser(prog="dsv3 eval --long-context", description=__doc__.split("\n\n")[0])
    p.add_argument("--long-context", action="store_true")
    p.add_argument(
        "--ckpt", required=True, nargs="+", help="checkpoint(s); several are compared in the plots"
    )
    p.add_argument("--lengths", default="128,256,512,1024", help="prompt lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths (fractions)")
    p.add_argument("--per-cell", type=positive_int, default=5, help="prompts per (length, depth)")
    p.add_argument(
        "--buckets", type=int, default=8, help="position buckets of the validation loss (0: skip it)"
    )
    p.add_argument(
        "--seq-len", type=positive_int, help="sequence length of the loss by position (default: max length)"
    )
    p.add_argument("--batches", type=positive_int, default=4)
    p.add_argument("--choices", type=int, default=10,
                   help="passkey by log-likelihood among this many keys (0: skip it)")  # fmt: skip
    p.add_argument("--out", default="long_context", help="directory for report.json and the plots")
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)
    args = p.parse_args(argv)
    configure_threads("dsv3 eval", args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    report, grids, choice_grids, curves = {}, {}, {}, {}
    for ckpt in args.ckpt:
        backend = LocalBackend.from_checkpoint(str(existing_dir("--ckpt", ckpt)))
        name = Path(ckpt).parent.parent.name if Path(ckpt).parent.name == "checkpoints" else Path(ckpt).name
        fits = [n for n in lengths if n + 8 <= backend.max_len]
        task = passkey_task(backend.tok, fits, depths, args.per_cell, args.seed)
        grids[name] = accuracy_grid(task, evaluate_task(task, backend))
        entry: dict[str, Any] = {"checkpoint": str(ckpt), "passkey": grids[name]}
        if args.choices > 1:
            choice = passkey_choice_task(
                backend.tok, fits, depths, args.per_cell, args.seed, n_choices=args.choices
            )
            choice_grids[name] = entry["passkey_choice"] = accuracy_grid(
                choice, evaluate_task(choice, backend)
            )
        if args.buckets > 0 and (Path(ckpt) / "trainer.json").is_file():
            seq_len = min(args.seq_len or max(lengths), backend.max_len)
            batches = checkpoint_val_batches(ckpt, seq_len, 2, args.batches)
            curves[name] = entry["loss_by_position"] = loss_by_position(backend.model, batches, args.buckets)
        report[name] = entry
        print(
            f"{name}: passkey accuracy by length "
            + ", ".join(f"{k}: {v:.2f}" for k, v in grids[name]["by_length"].items())
        )
        if name in choice_grids:
            print(
                f"{name}: passkey by log-likelihood (chance {1 / args.choices:.2f}) "
                + ", ".join(f"{k}: {v:.2f}" for k, v in choice_grids[name]["by_length"].items())
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(plot_passkey(grids, out / "passkey.png"))
    if choice_grids:
        print(plot_passkey(choice_grids, out / "passkey_choice.png", chance=1 / args.choices))
    if curves:
        print(plot_loss_by_position(curves, out / "loss_by_position.png"))
    return 0
