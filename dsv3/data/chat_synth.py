"""`dsv3 synth`: a small chat data set for the demo, synthesised locally from the training corpus
(as V3's non-reasoning SFT data was generated, §5.1, here by rules rather than by a model).

Four kinds of conversations, each answer checkable from the corpus itself:
- code: "Write a Python function NAME(ARGS): DOC" -> the standard library's function (short ones);
- returns: "What does this function return?" + a short function -> its return statement(s);
- continue: "Continue this passage: ..." (two Shakespeare lines) -> the next line;
- source: "Which Shakespeare work is this line from?" -> the work's title.
A fifth of the conversations have a system prompt, a quarter are two turns (multi-turn).
With `--model CKPT --samples N`, a model writes the answers instead and only those passing the
task's check are kept (rejection sampling, dsv3.data.rejection).

With `--passkey --tokenizer CKPT`, it writes prompt-completion rows of the passkey retrieval task
instead (dsv3.evals.long_context.passkey_training_rows): a model that has never learned to copy from
its context can learn it from them (`dsv3 sft --data`) before a context extension is measured.
With `--text` as well, each row is one plain document (`{"text": prompt + completion}`) to mix into a
training run's data (`dsv3 train --data-extra`), where the loss covers every token.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import numpy as np

SYSTEM = "You are a helpful assistant. Answer briefly."
MAX_FUNCTION_CHARS = 600


def code_pairs(max_pairs: int = 400) -> list[tuple[str, str]]:
    """(question, answer) pairs from short documented top-level functions of the standard library."""
    from dsv3.data.corpus import stdlib_documents

    pairs: list[tuple[str, str]] = []
    for doc in stdlib_documents():
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        lines = doc.text.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            source = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            docstring = ast.get_docstring(node)
            if not docstring or len(source) > MAX_FUNCTION_CHARS or node.decorator_list:
                continue
            summary = docstring.strip().splitlines()[0]
            args = ", ".join(a.arg for a in node.args.args)
            pairs.append((f"Write a Python function {node.name}({args}): {summary}", source))
            returns = [
                ast.get_source_segment(doc.text, r) for r in ast.walk(node) if isinstance(r, ast.Return)
            ]
            returns = [r for r in returns if r and r != "return"]
            if returns:
                pairs.append(
                    (f"What does this function return?\n{source}", "It returns: " + "; ".join(returns[:3]))
                )
            if len(pairs) >= max_pairs:
                return pairs
    return pairs


def verse_pairs(max_pairs: int = 400, seed: int = 0) -> list[tuple[str, str]]:
    from dsv3.data.corpus import shakespeare_documents
    from dsv3.evals.smoke_build import verse_lines

    rng = np.random.default_rng(seed)
    pairs = []
    for doc in shakespeare_documents():
        title = doc.name.split("/")[-1].removesuffix("_gut").replace("_", " ").title()
        runs = verse_lines([doc.text])
        for _ in range(max(1, max_pairs // 40)):
            if not runs:
                break
            run = runs[int(rng.integers(len(runs)))]
            i = int(rng.integers(2, len(run)))
            pairs.append((f"Continue this passage:\n{run[i - 2]}\n{run[i - 1]}", run[i]))
            pairs.append((f"Which Shakespeare work is this line from?\n{run[i]}", title))
    return pairs[:max_pairs]


def synthesise(n: int = 600, seed: int = 0) -> list[dict]:
    """`n` conversations mixing the four kinds, shuffled by `seed`."""
    rng = np.random.default_rng(seed)
    pairs = code_pairs(n) + verse_pairs(n, seed)  # enough for n conversations of up to two turns
    order = rng.permutation(len(pairs)).tolist()
    conversations, i = [], 0
    while i < len(order) and len(conversations) < n:
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.2 else []
        turns = 2 if rng.random() < 0.25 and i + 1 < len(order) else 1
        for q, a in (pairs[j] for j in order[i : i + turns]):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        i += turns
        conversations.append({"messages": messages})
    return conversations


def synth_main(argv: list[str] | None = None) -> int:
    from dsv3.cli import positive_int
    from dsv3.threads import add_threads_argument

    p = argparse.ArgumentParser(
        prog="dsv3 synth", description="Synthesise the demo chat set from the corpus."
    )
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--n", type=positive_int, default=600, help="conversations")
    p.add_argument("--seed", type=int, default=0)
    k = p.add_argument_group("passkey retrieval rows (prompt-completion) instead of conversations")
    k.add_argument("--passkey", action="store_true", help="write passkey retrieval rows")
    k.add_argument("--tokenizer", help="checkpoint or tokenizer.json whose token counts set the lengths")
    k.add_argument("--lengths", default="64-256", help="prompt lengths in tokens, MIN-MAX (uniform)")
    k.add_argument("--text", action="store_true",
                   help='write each row as one document {"text": prompt + completion} (for dsv3 train --data-extra)')  # fmt: skip
    g = p.add_argument_group("rejection sampling (answers written by a model, kept if they pass a check)")
    g.add_argument("--model", help="checkpoint that writes the answers (with tokenizer.json)")
    g.add_argument("--samples", type=positive_int, default=4, help="answers sampled per question")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--max-tokens", type=positive_int, default=256, help="answer length cap")
    g.add_argument("--report", help="write the acceptance counts here (JSON)")
    add_threads_argument(g)
    args = p.parse_args(argv)
    if args.passkey:
        rows = _passkey_rows(args)
    elif args.model is None:
        rows = synthesise(args.n, args.seed)
    else:
        rows = _rejection_rows(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    print(f"wrote {len(rows)} {'passkey rows' if args.passkey else 'conversations'} to {args.out}")
    return 0


def _passkey_rows(args: argparse.Namespace) -> list[dict]:
    from dsv3.cli import UsageError
    from dsv3.data.tokenizer import Tokenizer
    from dsv3.evals.long_context import passkey_training_rows

    if args.model is not None:
        raise UsageError("--passkey: the rows are made by rule; drop --model")
    if args.tokenizer is None:
        raise UsageError("--passkey: needs --tokenizer CKPT (lengths are counted in its tokens)")
    lo, sep, hi = args.lengths.partition("-")
    if not (sep and lo.strip().isdigit() and hi.strip().isdigit()):
        raise UsageError(f"--lengths {args.lengths!r}: expected MIN-MAX, e.g. 64-256")
    if not Path(args.tokenizer).exists():
        raise UsageError(f"--tokenizer {args.tokenizer}: no such file or directory")
    tok = Tokenizer.load(args.tokenizer)
    rows = passkey_training_rows(tok, args.n, int(lo), int(hi), args.seed)
    return [{"text": r["prompt"] + r["completion"]} for r in rows] if args.text else rows


def _rejection_rows(args: argparse.Namespace) -> list[dict]:
    from dsv3.cli import UsageError, existing_dir
    from dsv3.data.rejection import code_items, corpus_items, llm_generator, rejection_sample
    from dsv3.infer.llm import LLM
    from dsv3.threads import configure_threads

    if not args.temperature >= 0:
        raise UsageError(f"--temperature {args.temperature}: must be >= 0")
    configure_threads("dsv3 synth", args.threads)
    llm = LLM(str(existing_dir("--model", args.model)))
    if llm.tokenizer is None:
        raise UsageError(f"--model {args.model}: no tokenizer.json (the questions are text)")
    items = (code_items() + corpus_items(args.n, args.seed))[: args.n]
    generate = llm_generator(llm, args.temperature, args.max_tokens, args.seed)
    rows, report = rejection_sample(items, generate, args.samples)
    print(f"rejection sampling: {report['accepted']}/{report['samples']} answers passed "
          f"({report['rate']:.1%}); kept {report['kept']} of {report['questions']} questions")  # fmt: skip
    for kind, s in sorted(report["by_kind"].items()):
        print(f"  {kind}: {s['accepted']}/{s['samples']} passed, {s['kept']} kept")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=1))
    return rows


if __name__ == "__main__":
    from dsv3.errors import run_cli

    sys.exit(run_cli("dsv3 synth", synth_main))
