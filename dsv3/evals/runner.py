"""Scoring a task on a backend, and the report (JSON and a table)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsv3.evals.backends import GenRequest
from dsv3.evals.metrics import mean_stderr, pass_at_k, spread
from dsv3.evals.sandbox import run_program
from dsv3.evals.tasks import Task


# ---- multiple choice -----------------------------------------------------------------------------
def fewshot_prefix(task: Task, index: int) -> str:
    """The first `few_shot` rows of fewshot_data (or of the task other than row `index`), each as
    query + correct choice, separated by blank lines."""
    pool = task.fewshot_rows or [r for i, r in enumerate(task.rows) if i != index]
    return "".join(f"{r['query']}{r['choices'][r['answer']]}\n\n" for r in pool[: task.few_shot])


def mc_context(task: Task, index: int) -> str:
    row = task.rows[index]
    return row.get("preamble", "") + fewshot_prefix(task, index) + row["query"]


def score_multiple_choice(task: Task, backend, rows: Sequence[int]) -> dict[str, Any]:
    """acc: the option of highest log-likelihood is the answer; acc_norm: the same after dividing
    each option's log-likelihood by its length in bytes (so long options are not penalised for
    their length). Each with the standard error over questions."""
    requests, owners = [], []
    for i in rows:
        ctx = mc_context(task, i)
        for j, choice in enumerate(task.rows[i]["choices"]):
            requests.append((ctx, choice))
            owners.append((i, j))
    lls = backend.loglikelihood(requests)
    per_row: dict[int, list[float]] = {i: [] for i in rows}
    for (i, _), ll in zip(owners, lls):
        per_row[i].append(ll)
    hits, hits_norm, details = [], [], []
    for i in rows:
        row, ll = task.rows[i], per_row[i]
        norm = [v / len(c.encode("utf-8")) for v, c in zip(ll, row["choices"])]
        pick, pick_norm = _argmax(ll), _argmax(norm)
        hits.append(float(pick == row["answer"]))
        hits_norm.append(float(pick_norm == row["answer"]))
        details.append({"row": i, "loglikelihoods": ll, "pick": pick, "pick_norm": pick_norm,
                        "answer": row["answer"]})  # fmt: skip
    acc, acc_se = mean_stderr(hits)
    acc_norm, acc_norm_se = mean_stderr(hits_norm)
    random = sum(1 / len(task.rows[i]["choices"]) for i in rows) / len(rows)
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_se,
            "random_baseline": random, "details": details}  # fmt: skip


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: values[j])


# ---- generation and FIM --------------------------------------------------------------------------
def _expected(row: dict[str, Any]) -> list[str]:
    answer = row["answer"]
    return [a.strip() for a in (answer if isinstance(answer, list) else [answer])]


def check_completion(task: Task, row: dict[str, Any], completion: str) -> bool:
    """Exact match (stripped) or the program with the completion passes its tests in the sandbox."""
    if task.scoring == "exact_match":
        got = completion.strip()
        if task.extract == "first_word":
            got = re.sub(r"[^\w']", "", got.split()[0]) if got.split() else ""
        return got in _expected(row)
    if task.kind == "fim":
        program = row["prefix"] + completion + row["suffix"]
    else:
        program = row["prompt"] + completion
    result = run_program(f"{program}\n\n{row['tests']}\n", task.timeout_s, task.memory_mb)
    return result.passed


def score_generation(task: Task, backend, rows: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Per temperature: `samples` completions per row, each checked; pass@k per row (the unbiased
    estimator), averaged over rows. Several temperatures give mean, std, min and max of pass@1."""
    runs = []
    for t_index, temperature in enumerate(task.run_temperatures()):
        requests, owners = [], []
        for i in rows:
            row = task.rows[i]
            for s in range(task.samples):
                prompt = row["prefix"] if task.kind == "fim" else row["prompt"]
                requests.append(GenRequest(prompt, temperature, task.max_tokens, task.stop,
                                           seed=seed + 1_000_003 * t_index + 1_009 * i + s,
                                           suffix=row["suffix"] if task.kind == "fim" else None))  # fmt: skip
                owners.append(i)
        completions = backend.generate(requests)
        correct = {i: 0 for i in rows}
        samples: dict[int, list[str]] = {i: [] for i in rows}
        for i, text in zip(owners, completions):
            correct[i] += check_completion(task, task.rows[i], text)
            samples[i].append(text)
        run: dict[str, Any] = {"temperature": temperature}
        for k in task.k:
            values = [pass_at_k(task.samples, correct[i], k) for i in rows]
            run[f"pass@{k}"], run[f"pass@{k}_stderr"] = mean_stderr(values)
        run["details"] = [{"row": i, "correct": correct[i], "completions": samples[i]} for i in rows]
        runs.append(run)
    result: dict[str, Any] = {f"pass@{k}": spread([r[f"pass@{k}"] for r in runs]) for k in task.k}
    result["runs"] = runs
    return result


# ---- tasks and reports ---------------------------------------------------------------------------
def evaluate_task(task: Task, backend, limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    rows = list(range(len(task.rows) if limit is None else min(limit, len(task.rows))))
    t0 = time.perf_counter()
    if task.kind == "multiple_choice":
        scores = score_multiple_choice(task, backend, rows)
    else:
        scores = score_generation(task, backend, rows, seed)
    return {"task": task.name, "kind": task.kind, "smoke": task.smoke, "source": task.source,
            "n": len(rows), "scoring": "loglikelihood" if task.kind == "multiple_choice" else task.scoring,
            "seconds": time.perf_counter() - t0, **scores}  # fmt: skip


def headline(result: dict[str, Any]) -> tuple[str, float, float | None, str]:
    """(metric, value, stderr or None, extra) of one task result, for the table."""
    if result["kind"] == "multiple_choice":
        extra = f"acc_norm {result['acc_norm']:.3f}, random {result['random_baseline']:.3f}"
        return "acc", result["acc"], result["acc_stderr"], extra
    p1 = result["pass@1"]
    temps = ", ".join(f"{r['temperature']:g}" for r in result["runs"])
    extra = f"T=[{temps}] std {p1['std']:.3f} min {p1['min']:.3f} max {p1['max']:.3f}"
    ks = [key for key in result if key.startswith("pass@") and key != "pass@1"]
    extra += "".join(f", {key} {result[key]['mean']:.3f}" for key in ks)
    return (
        "pass@1",
        p1["mean"],
        None if len(result["runs"]) > 1 else result["runs"][0]["pass@1_stderr"],
        extra,
    )


def format_table(results: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'task':<28} {'n':>5}  {'metric':<7} {'value':>7} {'± se':>7}  notes", "-" * 90]
    for r in results:
        metric, value, se, extra = headline(r)
        name = r["task"] + (" [smoke]" if r["smoke"] else "")
        se_text = f"{se:.3f}" if se is not None else "-"
        lines.append(f"{name:<28} {r['n']:>5}  {metric:<7} {value:>7.3f} {se_text:>7}  {extra}")
    return "\n".join(lines)


def write_report(path: str | Path, backend_name: str, results: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"backend": backend_name, "tasks": list(results)}, indent=2))
    return path
