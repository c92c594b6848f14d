"""lm-evaluation-harness against `dsv3 serve` vs the built-in harness, on one multiple-choice task
(issue 19, part 5; docs/evaluation.md).

1. the task (a bundled or user multiple-choice task) is exported to lm-eval's format: a local JSONL
   whose `context` is the built-in harness's exact context (its few-shot prefix baked in, bos
   written as its token text, which both tokenizers read as the special token) and a YAML task
   (`output_type: multiple_choice`, `target_delimiter: ""`, `num_fewshot: 0`);
2. `dsv3 serve CKPT --port 0` is started and lm-eval's `local-completions` model scores the task
   through it (`tokenizer_backend=remote`: the server's /tokenizer_info and /tokenize), with
   `--log_samples` for the per-choice log-likelihoods;
3. the built-in harness scores the same task on the same checkpoint in this process
   (dsv3.evals, LocalBackend: batched forwards, no server);
4. both accuracies are printed, with per-item agreement and the per-choice log-likelihood gaps.

    .venv/bin/python bench/lm_eval_vs_builtin.py --ckpt runs/demo/checkpoints/step_00000500 \\
        --lm-eval /path/to/venv/bin/lm_eval --work /tmp/lmeval_cmp [--task smoke_mc] [--limit 10]

lm-eval must be installed in its own environment (it brings its own dependencies); --lm-eval names
its `lm_eval` executable.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from dsv3.evals.backends import LocalBackend
from dsv3.evals.loaders import resolve_tasks
from dsv3.evals.runner import evaluate_task, mc_context

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def export_task(task, rows: list[int], bos_text: str, out: Path) -> str:
    """The task as lm-eval reads it: JSONL + YAML under `out`; returns the lm-eval task name."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"dsv3_{task.name}"
    data = out / f"{name}.jsonl"
    with data.open("w") as f:
        for i in rows:
            row = task.rows[i]
            f.write(json.dumps({"context": bos_text + mc_context(task, i), "choices": row["choices"],
                                "answer": row["answer"]}) + "\n")  # fmt: skip
    (out / f"{name}.yaml").write_text(YAML.format(name=name, data=data.resolve()))
    return name


def space_delimited(task, out: Path) -> Path:
    """The task rewritten so that no context ends in whitespace: query.rstrip() and " " + choice
    (the layout of MMLU-style prompts). lm-eval moves a context's trailing whitespace into the
    continuation and encodes context + continuation as one string, so with this layout both
    harnesses score the same tokens wherever the tokenizer does not merge across the boundary."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"{task.name}_sp"
    rows = [
        {**r, "query": r["query"].rstrip(), "choices": [" " + c.strip() for c in r["choices"]]}
        for r in task.rows
    ]
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": name, "kind": "multiple_choice", "few_shot": task.few_shot, "data": f"{name}.jsonl",
            "description": f"{task.name} with space-delimited choices (bench/lm_eval_vs_builtin.py)"}  # fmt: skip
    path = out / f"{name}.task.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def start_server(ckpt: str, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dsv3", "serve", ckpt, "--port", "0", "--served-model-name", "dsv3",
           "--threads", str(threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        m = re.search(r"ready on (http://\S+)", line)
        if m:
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"lm_eval_vs_builtin: dsv3 serve did not become ready ({' '.join(cmd)})")


def run_lm_eval(lm_eval: str, url: str, task_dir: Path, name: str, out: Path) -> list[dict]:
    args = (f"model=dsv3,base_url={url}/v1/completions,tokenizer_backend=remote,num_concurrent=1,"
            "max_retries=1,max_length=4096")  # fmt: skip
    cmd = [lm_eval, "--model", "local-completions", "--model_args", args, "--include_path", str(task_dir),
           "--tasks", name, "--batch_size", "8", "--output_path", str(out), "--log_samples"]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    print(f"lm-eval: {time.perf_counter() - t0:.1f} s", flush=True)
    files = sorted(glob.glob(str(out / "**" / f"samples_{name}_*.jsonl"), recursive=True))
    if not files:
        raise SystemExit(f"lm_eval_vs_builtin: no samples file under {out}")
    samples = [json.loads(line) for line in open(files[-1])]
    return sorted(samples, key=lambda s: s["doc_id"])


def compare(task, rows: list[int], builtin: dict, samples: list[dict]) -> dict:
    """Accuracies of both, per-item agreement of the picks, and the per-choice log-likelihood gaps
    (lm-eval's minus the built-in's) with their spread within each item."""
    details = {d["row"]: d for d in builtin["details"]}
    agree = agree_norm = 0
    gaps, spreads, items = [], [], []
    lm_hits = lm_hits_norm = 0
    for s, i in zip(samples, rows):
        ll_lm = [float(r[0][0]) for r in s["resps"]]
        ll_b = details[i]["loglikelihoods"]
        choices = task.rows[i]["choices"]
        pick = max(range(len(ll_lm)), key=ll_lm.__getitem__)
        norm = [v / len(c) for v, c in zip(ll_lm, choices)]  # lm-eval's acc_norm: by characters
        pick_norm = max(range(len(norm)), key=norm.__getitem__)
        lm_hits += float(s["acc"])
        lm_hits_norm += float(s["acc_norm"])
        agree += pick == details[i]["pick"]
        agree_norm += pick_norm == details[i]["pick_norm"]
        g = [a - b for a, b in zip(ll_lm, ll_b)]
        gaps += g
        spreads.append(max(g) - min(g))
        items.append({"row": i, "builtin_pick": details[i]["pick"], "lm_eval_pick": pick,
                      "builtin_pick_norm": details[i]["pick_norm"], "lm_eval_pick_norm": pick_norm,
                      "gap_mean": sum(g) / len(g), "gap_spread": max(g) - min(g)})  # fmt: skip
    n = len(rows)
    return {"n": n, "builtin_acc": builtin["acc"], "builtin_acc_norm": builtin["acc_norm"],
            "lm_eval_acc": lm_hits / n, "lm_eval_acc_norm": lm_hits_norm / n,
            "acc_agree": agree / n, "acc_norm_agree": agree_norm / n,
            "max_abs_gap": max(abs(g) for g in gaps), "max_gap_spread_within_item": max(spreads),
            "items": items}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ckpt", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)"
    )
    p.add_argument("--lm-eval", required=True, help="the lm_eval executable (its own environment)")
    p.add_argument(
        "--work", required=True, help="directory for the exported task, lm-eval's output, the report"
    )
    p.add_argument("--task", default="smoke_mc", help="a multiple-choice task (bundled name or spec file)")
    p.add_argument("--limit", type=int, default=None, help="first N rows only")
    p.add_argument("--space-delimited", action="store_true",
                   help="score the task rewritten with no trailing whitespace in contexts (see space_delimited)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and the built-in run")
    args = p.parse_args(argv)
    (task,) = resolve_tasks([args.task])
    if task.kind != "multiple_choice":
        raise SystemExit(f"lm_eval_vs_builtin: --task {args.task}: kind {task.kind!r}, needs multiple_choice")
    work = Path(args.work)
    if args.space_delimited:
        (task,) = resolve_tasks([str(space_delimited(task, work / "derived"))])
    if not os.access(args.lm_eval, os.X_OK):
        raise SystemExit(f"lm_eval_vs_builtin: --lm-eval {args.lm_eval}: not an executable")
    import torch

    torch.set_num_threads(args.threads)
    rows = list(range(len(task.rows) if args.limit is None else min(args.limit, len(task.rows))))
    backend = LocalBackend.from_checkpoint(args.ckpt)
    name = export_task(task, rows, backend.tok.bos_token, work / "task")
    t0 = time.perf_counter()
    builtin = evaluate_task(task, backend, len(rows))
    print(f"built-in: {time.perf_counter() - t0:.1f} s", flush=True)
    proc, url = start_server(args.ckpt, args.threads)
    try:
        samples = run_lm_eval(args.lm_eval, url, work / "task", name, work / "lm_eval_out")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if len(samples) != len(rows):
        raise SystemExit(f"lm_eval_vs_builtin: lm-eval scored {len(samples)} items, expected {len(rows)}")
    result = compare(task, rows, builtin, samples)
    se = lambda acc: math.sqrt(acc * (1 - acc) / max(result["n"] - 1, 1))  # noqa: E731
    print(f"\n{task.name}, {result['n']} items, checkpoint {args.ckpt}")
    print("| harness | acc | acc_norm |\n|---|---|---|")
    print(f"| built-in (`dsv3 eval --tasks`) | {result['builtin_acc']:.3f} ± {se(result['builtin_acc']):.3f} | "
          f"{result['builtin_acc_norm']:.3f} |")  # fmt: skip
    print(f"| lm-eval `local-completions` via `dsv3 serve` | {result['lm_eval_acc']:.3f} ± "
          f"{se(result['lm_eval_acc']):.3f} | {result['lm_eval_acc_norm']:.3f} |")  # fmt: skip
    print(
        f"per-item agreement of the picks: acc {result['acc_agree']:.3f}, acc_norm {result['acc_norm_agree']:.3f}"
    )
    print(f"per-choice log-likelihood, lm-eval minus built-in: max |gap| {result['max_abs_gap']:.4f}, "
          f"max spread within an item {result['max_gap_spread_within_item']:.2e}")  # fmt: skip
    for it in result["items"]:
        if it["builtin_pick"] != it["lm_eval_pick"] or it["builtin_pick_norm"] != it["lm_eval_pick_norm"]:
            print(f"  row {it['row']}: picks built-in {it['builtin_pick']}/{it['builtin_pick_norm']} (acc/acc_norm), "
                  f"lm-eval {it['lm_eval_pick']}/{it['lm_eval_pick_norm']}, gap {it['gap_mean']:.4f}")  # fmt: skip
    (work / "comparison.json").write_text(json.dumps(result, indent=1))
    print(f"report: {work / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
