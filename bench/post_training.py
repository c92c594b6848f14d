"""After pre-training, end to end (issue 19): pre-train the demo model, extend its context with
YaRN (256 -> 1,024), fine-tune it on the synthesised chat set, and score every stage.

Stages, each the documented command run in this process (dsv3.cli.main), timed:
1. pre-train `small` as `make demo` does (500 steps of 8 x 256), or reuse --base CKPT;
2. retrieval: the demo model has never learned to copy from its context (passkey 0.00 at every
   length), so it first learns the task inside its pre-training length: `dsv3 synth --passkey`
   prompt-completion rows of 40-160 tokens, `dsv3 sft` on them (loss on the key only);
3. extend that model: `dsv3 train --init RETRIEVAL --phase ctx1 seq_len=1024` (the scaled §4.3
   recipe, 4x here) on the pre-training corpus plus `dsv3 synth --passkey --text` rows of 64-1,024
   tokens (`--data-extra`, the loss on every token); this restores the language model the key-only
   fine-tune broke, and loses most of the retrieval;
4. long retrieval: `dsv3 sft` on passkey rows of 64-960 tokens at seq_len 1,024, once from the
   extended model and once, as the control, from the un-extended retrieval model (same rows, steps
   and lr): what the YaRN extension adds is the difference between the two;
5. passkey retrieval and loss by position of all four: `dsv3 eval --long-context`;
6. `dsv3 synth` the demo chat set, then `dsv3 sft --init EXTENDED` (held-out chat loss before/after);
7. `dsv3 eval --tasks smoke` on the base, extended and SFT models;
then RESULTS.md in --work with every table (and the plots beside it).

    .venv/bin/python bench/post_training.py --work runs/post            # the demo scale: ~1.7 hours on 2 cores, quiet
    .venv/bin/python bench/post_training.py --toy --work /tmp/post      # a few steps of `tiny`: the smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dsv3.cli import main as dsv3

DEMO = {"preset": "small", "steps": 500, "seq_len": 256, "extend_seq_len": 1024, "extend_steps": 600,
        "extend_extra": ["lr=3e-4", "eval_every=200", "ckpt_every=200"], "extend_passkey_rows": 3000,
        "extend_passkey_lengths": "64-1024", "lengths": "128,256,512,1024", "per_cell": 5, "chats": 600,
        "sft_steps": None, "eval_limit": None, "long_rows": 1200, "long_lengths": "64-960",
        "long_retrieval": ["--lr", "3e-4", "--batch", "8", "--epochs", "1", "--max-steps", "120", "--seq-len", "1024"],
        "temperatures": None, "passkey_rows": 30000, "passkey_lengths": "40-160",
        "retrieval": ["--lr", "1.5e-3", "--batch", "16", "--epochs", "1", "--max-steps", "1500", "--seq-len", "256"],
        "train_extra": ["micro_batch=8", "batch_start=8", "batch_end=8", "lr=2e-3",
        "eval_every=125", "eval_batches=16", "ckpt_every=250", "keep_last=1"]}  # fmt: skip
TOY = {"preset": "tiny", "steps": 3, "seq_len": 32, "extend_seq_len": 128, "extend_steps": 2,
       "extend_extra": ["eval_every=2", "ckpt_every=2"], "extend_passkey_rows": 8, "extend_passkey_lengths": "100-128",
       "lengths": "128,192", "per_cell": 1, "chats": 24, "sft_steps": 2, "eval_limit": 1, "temperatures": "0",
       "passkey_rows": 24, "passkey_lengths": "100-128", "long_rows": 24, "long_lengths": "100-120",
       "long_retrieval": ["--lr", "1e-3", "--batch", "4", "--epochs", "1", "--max-steps", "2", "--seq-len", "128"],
       "retrieval": ["--lr", "1e-3", "--batch", "4", "--epochs", "1", "--max-steps", "2", "--seq-len", "128"],
       "train_extra": ["micro_batch=2", "batch_start=2", "batch_end=2", "eval_every=3", "eval_batches=1",
       "ckpt_every=3", "precision=fp32", "tensorboard=false"]}  # fmt: skip


def run(stage: str, argv: list[str], times: dict[str, float]) -> None:
    print(f"\n== {stage}: dsv3 {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = dsv3(argv)
    times[stage] = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"post_training: stage {stage} failed (exit {rc})")


def newest(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


def reusable(args: argparse.Namespace, run_dir: Path, stage: str) -> bool:
    """--reuse: a training stage whose run directory already holds checkpoints is not run again."""
    if args.reuse and list((run_dir / "checkpoints").glob("step_*")):
        print(f"\n== {stage}: reusing {newest(run_dir)}", flush=True)
        return True
    return False


def stages(args: argparse.Namespace, s: dict) -> dict:
    work = Path(args.work)
    threads = ["--threads", str(args.threads)]
    times: dict[str, float] = {}
    data = ["--data", args.data] if args.data else []
    if args.base:
        base = Path(args.base)
    elif not reusable(args, work / "base", "pretrain"):
        run("pretrain", ["train", "--preset", s["preset"], "--steps", str(s["steps"]), "--out", str(work / "base"),
                         "--quiet", "--force", *data, *threads, f"seq_len={s['seq_len']}", *s["train_extra"]], times)  # fmt: skip
    if not args.base:
        base = newest(work / "base")
    if not reusable(args, work / "retrieval", "retrieval"):
        passkeys = work / "passkeys.jsonl"
        run("passkey_rows", ["synth", "--passkey", "--tokenizer", str(base), "--n", str(s["passkey_rows"]),
                             "--lengths", s["passkey_lengths"], "--out", str(passkeys)], times)  # fmt: skip
        run("retrieval", ["sft", "--init", str(base), "--data", str(passkeys), "--out", str(work / "retrieval"),
                          *s["retrieval"], *threads], times)  # fmt: skip
    retrieval = newest(work / "retrieval")
    if not reusable(args, work / "extended", "extend"):
        long_keys = work / "passkeys_long.jsonl"
        run("passkey_text", ["synth", "--passkey", "--text", "--tokenizer", str(base), "--n",
                             str(s["extend_passkey_rows"]), "--lengths", s["extend_passkey_lengths"], "--seed", "1",
                             "--out", str(long_keys)], times)  # fmt: skip
        run("extend", ["train", "--init", str(retrieval), "--phase", "ctx1", "--out", str(work / "extended"), "--quiet",
                       "--force", "--data-extra", str(long_keys), *threads, f"seq_len={s['extend_seq_len']}",
                       f"steps={s['extend_steps']}", *s["extend_extra"]], times)  # fmt: skip
    extended = newest(work / "extended")
    long_rows = work / "passkeys_long_rows.jsonl"
    run("passkey_rows_long", ["synth", "--passkey", "--tokenizer", str(base), "--n", str(s["long_rows"]),
                              "--lengths", s["long_lengths"], "--seed", "2", "--out", str(long_rows)], times)  # fmt: skip
    long = {}
    for name, init in (("retrieval_long", retrieval), ("extended_long", extended)):
        if not reusable(args, work / name, name):
            run(name, ["sft", "--init", str(init), "--data", str(long_rows), "--out", str(work / name),
                       *s["long_retrieval"], *threads], times)  # fmt: skip
        long[name] = newest(work / name)
    run("long_context", ["eval", "--long-context", "--ckpt", str(retrieval), str(extended),
                         *(str(c) for c in long.values()), "--lengths", s["lengths"],
                         "--per-cell", str(s["per_cell"]), "--seq-len", str(s["extend_seq_len"]),
                         "--out", str(work / "long_context"), *threads], times)  # fmt: skip
    chats = work / "chats.jsonl"
    run("synth", ["synth", "--out", str(chats), "--n", str(s["chats"])], times)
    sft_steps = ["--max-steps", str(s["sft_steps"])] if s["sft_steps"] else []
    if not reusable(args, work / "sft", "sft"):
        run("sft", ["sft", "--init", str(extended), "--data", str(chats), "--out", str(work / "sft"),
                    "--seq-len", str(s["extend_seq_len"]), *sft_steps, *threads], times)  # fmt: skip
    sft = newest(work / "sft")
    limit = ["--limit", str(s["eval_limit"])] if s["eval_limit"] else []
    temps = ["--temperatures", s["temperatures"]] if s["temperatures"] else []
    for name, ckpt in (("base", base), ("extended", extended), ("sft", sft)):
        run(f"eval_{name}", ["eval", "--tasks", "smoke", "--ckpt", str(ckpt), "--report", str(work / f"eval_{name}.json"),
                             *limit, *temps, *threads], times)  # fmt: skip
    return {"base": str(base), "retrieval": str(retrieval), "extended": str(extended), "sft": str(sft),
            **{k: str(v) for k, v in long.items()}, "times": times}  # fmt: skip


def length_table(lc: dict, names: list[str], lengths: list[int], key: str) -> list[str]:
    """Accuracy by prompt length, a row per model ("-" where a length exceeds its context)."""
    lines = ["| model | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for name in names:
        by = lc[name][key]["by_length"]
        lines.append(
            f"| {name} | " + " | ".join(f"{by[str(n)]:.2f}" if str(n) in by else "-" for n in lengths) + " |"
        )
    return lines


def results_markdown(work: Path, info: dict) -> str:
    lc = json.loads((work / "long_context" / "report.json").read_text())
    lines = ["# Post-training results", "", f"Checkpoints: base `{info['base']}`, retrieval `{info['retrieval']}`, "
             f"extended `{info['extended']}`, SFT `{info['sft']}`.", "", "## Passkey accuracy by prompt length", ""]  # fmt: skip
    names = list(lc)
    ret = json.loads((Path(info["retrieval"]) / "trainer.json").read_text())
    rows = ["## Retrieval (passkey rows, loss on the key)", "", "| stage | held-out loss before | after |",
            "|---|---:|---:|", f"| retrieval (from base, 40-160 tokens) | {ret['val_chat_loss_before']:.4f} | "
            f"{ret['val_chat_loss_after']:.4f} |"]  # fmt: skip
    for name in ("retrieval_long", "extended_long"):
        st = json.loads((Path(info[name]) / "trainer.json").read_text())
        rows.append(f"| {name} (64-960 tokens at 1,024) | {st['val_chat_loss_before']:.4f} | "
                    f"{st['val_chat_loss_after']:.4f} |")  # fmt: skip
    lines[-2:-2] = [*rows, ""]
    lengths = sorted(
        {n for name in names for n in lc[name]["passkey"]["lengths"]}
    )  # the extended model's go further
    lines += length_table(lc, names, lengths, "passkey")
    lines += ["", "![passkey](long_context/passkey.png)", ""]
    if all("passkey_choice" in lc[n] for n in names):
        lines += ["## Passkey by log-likelihood (the true key among 10; chance 0.10)", ""]
        lines += length_table(lc, names, lengths, "passkey_choice")
        lines += ["", "![passkey by log-likelihood](long_context/passkey_choice.png)", ""]
    if any("loss_by_position" in lc[n] for n in names):
        buckets = next(lc[n] for n in names if "loss_by_position" in lc[n])["loss_by_position"]
        lines += ["## Validation loss by position", "",
                  "| model | " + " | ".join(f"{b['start']}-{b['end']}" for b in buckets) + " |",
                  "|---|" + "---:|" * len(buckets)]  # fmt: skip
        for name in names:
            if "loss_by_position" in lc[name]:
                lines.append(
                    f"| {name} | "
                    + " | ".join(f"{b['loss']:.3f}" for b in lc[name]["loss_by_position"])
                    + " |"
                )
        lines += ["", "![loss by position](long_context/loss_by_position.png)", ""]
    sft_state = json.loads((Path(info["sft"]) / "trainer.json").read_text())
    lines += ["## SFT", "", "| held-out chat loss | nats per assistant token |", "|---|---:|",
              f"| before (extended model) | {sft_state['val_chat_loss_before']:.4f} |",
              f"| after SFT | {sft_state['val_chat_loss_after']:.4f} |", "", "## Smoke tasks", ""]  # fmt: skip
    reports = {
        n: json.loads((work / f"eval_{n}.json").read_text())["tasks"] for n in ("base", "extended", "sft")
    }
    tasks = [t["task"] for t in reports["base"]]
    lines += ["| model | " + " | ".join(f"{t} [smoke]" for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    lines.append("| random baseline | " + " | ".join(
        f"{t['random_baseline']:.3f}" if t["kind"] == "multiple_choice" else "0.000" for t in reports["base"]) + " |")  # fmt: skip
    for name, rep in reports.items():
        cells = [
            f"{t['acc']:.3f}" if t["kind"] == "multiple_choice" else f"{t['pass@1']['mean']:.3f}" for t in rep
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Multiple choice: acc; generation: pass@1, mean over the temperatures.", "", "## Times", "",
              "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in info["times"].items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/post", help="directory for every run, report and plot")
    p.add_argument(
        "--base", help="reuse this pre-trained checkpoint (e.g. runs/demo/checkpoints/step_00000500)"
    )
    p.add_argument("--data", help="pre-training data (default: the bundled corpus)")
    p.add_argument(
        "--toy", action="store_true", help="a few steps of `tiny`: tests the script, not the model"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true",
                   help="skip the training stages whose run directory in --work already holds checkpoints")  # fmt: skip
    args = p.parse_args(argv)
    settings = TOY if args.toy else DEMO
    info = stages(args, settings)
    out = Path(args.work) / "RESULTS.md"
    out.write_text(results_markdown(Path(args.work), info))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
