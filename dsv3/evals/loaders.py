"""Data readers: the harness's JSONL rows, and the layouts users bring from a local path (no
download at run time): MMLU's CSV (`question,A,B,C,D,answer` without a header; a directory with
`test/` and `dev/` folders of `<subject>_test.csv` / `<subject>_dev.csv`, or a single CSV) and
HumanEval's JSONL (`task_id, prompt, canonical_solution, test, entry_point`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from dsv3.evals.tasks import Task, TaskFileError, load_task
from dsv3.jsonl import read_jsonl as _read_jsonl

MMLU_SHOTS = 5  # the standard MMLU few-shot count, taken from the subject's dev split
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # a completion ends with its function
BUNDLED = Path(__file__).parent / "smoke"


def read_rows(path: Path, fmt: str, kind: str) -> list[dict[str, Any]]:
    if fmt == "mmlu_csv":
        return mmlu_rows(path)
    if fmt == "humaneval_jsonl":
        return humaneval_rows(path)
    return read_jsonl(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line; each row remembers its line (`_line`) for errors."""
    return [{**row, "_line": i} for i, row in _read_jsonl(path, TaskFileError)]


# ---- MMLU ------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[tuple[int, list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [(i, r) for i, r in enumerate(csv.reader(f), 1) if r]
    except OSError as e:
        raise TaskFileError(f"{path}: cannot read ({e.strerror or e})") from None


def _mmlu_question(path: Path, line: int, r: list[str]) -> tuple[str, int]:
    if len(r) != 6:
        raise TaskFileError(f"{path}:{line}: expected 6 columns (question,A,B,C,D,answer), got {len(r)}")
    letter = r[5].strip().upper()
    if letter not in "ABCD" or len(letter) != 1:
        raise TaskFileError(f"{path}:{line}: answer must be A, B, C or D, got {r[5]!r}")
    body = r[0].strip() + "".join(f"\n{c}. {o}" for c, o in zip("ABCD", r[1:5])) + "\nAnswer:"
    return body, "ABCD".index(letter)


def mmlu_rows(path: Path) -> list[dict[str, Any]]:
    """MMLU questions as multiple-choice rows with the standard prompt: a subject header, up to 5
    solved dev questions, the question with its lettered options, choices " A" .. " D"."""
    path = Path(path)
    if path.is_dir():
        tests = sorted((path / "test").glob("*_test.csv")) or sorted(path.glob("*_test.csv"))
        if not tests:
            raise TaskFileError(f"{path}: no <subject>_test.csv files (in {path}/test or {path})")
    elif path.is_file():
        tests = [path]
    else:
        raise TaskFileError(f"{path}: no such MMLU file or directory")
    rows = []
    for test in tests:
        subject = test.name.removesuffix(".csv").removesuffix("_test")
        dev = test.parent.parent / "dev" / f"{subject}_dev.csv"
        dev = dev if dev.is_file() else test.parent / f"{subject}_dev.csv"
        shots = ""
        if dev.is_file():
            for line, r in _read_csv(dev)[:MMLU_SHOTS]:
                body, answer = _mmlu_question(dev, line, r)
                shots += f"{body} {'ABCD'[answer]}\n\n"
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for line, r in _read_csv(test):
            body, answer = _mmlu_question(test, line, r)
            rows.append({"query": header + shots + body, "choices": [" A", " B", " C", " D"],
                         "answer": answer, "subject": subject, "_line": line})  # fmt: skip
    return rows


# ---- HumanEval ---------------------------------------------------------------------------------------
def humaneval_rows(path: Path) -> list[dict[str, Any]]:
    """HumanEval problems as generation rows scored by their tests: the program is the prompt, the
    completion, the problem's `test` (which defines `check`) and `check(entry_point)`."""
    rows = []
    for row in read_jsonl(Path(path)):
        for key in ("prompt", "test", "entry_point"):
            if not isinstance(row.get(key), str):
                raise TaskFileError(f"{path}:{row['_line']}: missing HumanEval field {key!r}")
        rows.append({"prompt": row["prompt"], "tests": f"{row['test']}\n\ncheck({row['entry_point']})\n",
                     "task_id": row.get("task_id", ""), "_line": row["_line"]})  # fmt: skip
    return rows


# ---- task references on the command line -----------------------------------------------------------
def bundled_tasks() -> dict[str, Path]:
    """The bundled smoke tasks: name -> spec file."""
    return {p.name.removesuffix(".task.json"): p for p in sorted(BUNDLED.glob("*.task.json"))}


def resolve_tasks(refs: list[str]) -> list[Task]:
    """`smoke` (every bundled task), a bundled task's name, a spec file, `mmlu:PATH` or
    `humaneval:PATH` -> Tasks, in order."""
    bundled = bundled_tasks()
    tasks: list[Task] = []
    for ref in refs:
        if ref == "smoke":
            tasks += [load_task(p) for p in bundled.values()]
        elif ref in bundled:
            tasks.append(load_task(bundled[ref]))
        elif ref.startswith("mmlu:"):
            path = Path(ref[len("mmlu:") :])
            tasks.append(Task(name=f"mmlu({path.name})", kind="multiple_choice", rows=mmlu_rows(path),
                              source=str(path)))  # fmt: skip
        elif ref.startswith("humaneval:"):
            path = Path(ref[len("humaneval:") :])
            tasks.append(Task(name=f"humaneval({path.name})", kind="generate", rows=humaneval_rows(path),
                              scoring="tests", stop=HUMANEVAL_STOP, source=str(path)))  # fmt: skip
        elif Path(ref).is_file():
            tasks.append(load_task(ref))
        else:
            from dsv3.cli import UsageError

            raise UsageError(
                f"--tasks {ref}: not a bundled task ({', '.join(['smoke', *bundled])}), a spec file, "
                "mmlu:PATH or humaneval:PATH"
            )
    return tasks
