"""`dsv3 eval`: with --tasks, the evaluation harness; with --long-context, passkey retrieval and the
loss by position (dsv3.evals.long_context); otherwise the validation loss of a training checkpoint
(dsv3.train.cli.eval_main, unchanged)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dsv3.cli import UsageError, positive_int
from dsv3.threads import add_threads_argument, configure_threads


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv3 eval --tasks",
        description="Score tasks (multiple choice by log-likelihood, generation by exact match or "
        "tests, FIM) on a checkpoint or an OpenAI-compatible server. Without --tasks, `dsv3 eval "
        "--ckpt RUN/checkpoints/step_N` reports the validation loss.",
    )
    p.add_argument("--tasks", required=True, nargs="+",
                   help="smoke (every bundled smoke task), a bundled task name, a task spec file, "
                   "mmlu:PATH or humaneval:PATH (comma-separated or several)")  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a checkpoint directory with tokenizer.json")
    src.add_argument("--server", help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default="dsv3", help="model name sent to --server")
    p.add_argument("--server-bos", default="auto",
                   help="text put before every prompt sent to --server: auto (the bos token of its "
                        "/tokenizer_info when it does not add one itself), none, or the text")  # fmt: skip
    p.add_argument("--limit", type=positive_int, help="score only the first N rows of each task")
    p.add_argument("--temperatures", help="comma-separated, overriding every generation task's")
    p.add_argument("--samples", type=positive_int, help="completions per prompt (pass@k), overriding")
    p.add_argument("--k", help="comma-separated k of pass@k (each <= samples), overriding")
    p.add_argument("--max-tokens", type=positive_int, help="output cap, overriding (default 8192)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="log-likelihood rows per forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="write the JSON report here")
    add_threads_argument(p)
    return p


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"--temperatures {text}: expected comma-separated numbers") from None
    if not values or any(not t >= 0 for t in values):
        raise UsageError(f"--temperatures {text}: need one or more numbers >= 0")
    return values


def _override(task, args: argparse.Namespace):
    changes = {}
    if args.temperatures:
        changes["temperatures"] = _temperatures(args.temperatures)
    if args.samples:
        changes["samples"] = args.samples
        changes["k"] = tuple(k for k in task.k if k <= args.samples) or (1,)
    if args.k:
        try:
            ks = tuple(int(k) for k in args.k.split(","))
        except ValueError:
            raise UsageError(f"--k {args.k}: expected comma-separated integers") from None
        samples = changes.get("samples", task.samples)
        if not all(1 <= k <= samples for k in ks):
            raise UsageError(f"--k {args.k}: each k must be in [1, samples={samples}]")
        changes["k"] = ks
    if args.max_tokens:
        changes["max_tokens"] = args.max_tokens
    return dataclasses.replace(task, **changes) if changes else task


def tasks_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dsv3.evals.backends import LocalBackend, OpenAIBackend, server_bos
    from dsv3.evals.loaders import resolve_tasks
    from dsv3.evals.runner import evaluate_task, format_table, write_report

    refs = [r for item in args.tasks for r in item.split(",") if r]
    tasks = [_override(t, args) for t in resolve_tasks(refs)]  # every task file checked before any work
    configure_threads("dsv3 eval", args.threads)
    if args.server:
        bos = {"auto": None, "none": ""}.get(args.server_bos, args.server_bos)
        if bos is None:
            bos = server_bos(args.server) or ""
            print(
                f"--server-bos auto: {'prompts start with ' + repr(bos) if bos else 'no bos added'}",
                file=sys.stderr,
            )
        backend = OpenAIBackend(args.server, args.model, bos=bos)
    else:
        from dsv3.cli import existing_dir

        backend = LocalBackend.from_checkpoint(
            str(existing_dir("--ckpt", args.ckpt)), batch_size=args.batch_size
        )
    results = []
    for task in tasks:
        results.append(evaluate_task(task, backend, args.limit, args.seed))
        print(f"{task.name}: done in {results[-1]['seconds']:.1f} s", file=sys.stderr)
    print(format_table(results))
    if args.report:
        print(f"report: {write_report(args.report, backend.name, results)}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--long-context" in argv:
        from dsv3.evals.long_context import long_context_main

        return long_context_main(argv)
    if any(a == "--tasks" or a.startswith("--tasks=") for a in argv):
        return tasks_main(argv)
    from dsv3.train.cli import eval_main as loss_main

    return loss_main(argv)
