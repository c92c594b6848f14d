"""Task files: a small JSON spec beside a JSONL data file, so users add their own tasks.

    {"name": "my_mc", "kind": "multiple_choice", "data": "my_mc.jsonl", "few_shot": 2}

kinds and their data rows (one JSON object per line):
- multiple_choice: {"query": str, "choices": [str, ...], "answer": int} and optionally "preamble"
  (text put once before the few-shot examples). Each choice is scored by its log-likelihood as a
  continuation of the prompt; `acc` compares the sums, `acc_norm` the sums divided by the choice's
  length in bytes (length normalisation). Few-shot examples are the first `few_shot` other rows
  (or rows of `fewshot_data`), each written as query + correct choice + "\n\n".
- generate: {"prompt": str, "answer": str or [str, ...]} scored by exact match (after stripping
  white space), or {"prompt": str, "tests": str} scored by running prompt + completion + tests in
  the sandbox (dsv3.evals.sandbox); `samples` completions per prompt give pass@k for each k in `k`.
- fim: {"prefix": str, "suffix": str} plus "answer" or "tests" as above; the model infills the
  middle (PSM layout, DESIGN §6); tests run prefix + middle + suffix + tests.

Spec fields (defaults): name (the file's stem), kind, data (path relative to the spec), format
("jsonl"; "mmlu_csv" and "humaneval_jsonl" read those layouts, dsv3.evals.loaders), fewshot_data,
few_shot (0), scoring ("exact_match", or "tests" when rows have tests), max_tokens (8192, the
paper's output cap), temperatures ("auto": [0.0] for 1,000 samples or more, else [0.2, 0.5, 0.8],
the paper's several-temperature rule for small benchmarks; or a list), samples (1), k ([1]), stop
([]), extract ("full", or "first_word": exact match on the first word generated,
punctuation stripped), timeout_s (5), memory_mb (512), smoke (false: true marks a bundled smoke task), description.

Errors in a spec or a data file are one line naming the file and line (TaskFileError).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3.errors import Dsv3Error

KINDS = ("multiple_choice", "generate", "fim")
FORMATS = ("jsonl", "mmlu_csv", "humaneval_jsonl")
OUTPUT_CAP = 8192  # tokens; the paper caps generation benchmarks at 8K (§4.4)
SMALL_BENCHMARK = 1000  # under this many samples, several temperatures (§5.3)
AUTO_TEMPERATURES = (0.2, 0.5, 0.8)


class TaskFileError(Dsv3Error, ValueError):
    """A task spec or data file is malformed; the message is `file:line: what is wrong`."""


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    rows: list[dict[str, Any]]
    fewshot_rows: list[dict[str, Any]] = field(default_factory=list)
    few_shot: int = 0
    scoring: str = "exact_match"
    extract: str = "full"  # exact match on the whole completion, or on its first word
    max_tokens: int = OUTPUT_CAP
    temperatures: tuple[float, ...] | None = None  # None: the auto rule
    samples: int = 1
    k: tuple[int, ...] = (1,)
    stop: tuple[str, ...] = ()
    timeout_s: float = 5.0
    memory_mb: int = 512
    smoke: bool = False
    description: str = ""
    source: str = ""

    def run_temperatures(self) -> tuple[float, ...]:
        if self.temperatures is not None:
            return self.temperatures
        return (0.0,) if len(self.rows) >= SMALL_BENCHMARK else AUTO_TEMPERATURES


_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "data": (str,), "format": (str,), "fewshot_data": (str,),
    "few_shot": (int,), "scoring": (str,), "max_tokens": (int,), "temperatures": (str, list),
    "samples": (int,), "k": (list,), "stop": (list,), "timeout_s": (int, float), "memory_mb": (int,),
    "smoke": (bool,), "description": (str,), "extract": (str,),
}  # fmt: skip


def _key_line(text: str, key: str) -> int:
    """The line of `"key"` in a spec's text (1 if not found): errors point at the field."""
    for i, line in enumerate(text.splitlines(), 1):
        if f'"{key}"' in line:
            return i
    return 1


def load_task(spec_path: str | Path) -> Task:
    """Read a task spec (JSON) and its data; TaskFileError naming file and line on any problem."""
    path = Path(spec_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TaskFileError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(spec, dict):
        raise TaskFileError(f"{path}:1: a task spec must be a JSON object")

    def fail(key: str, msg: str) -> TaskFileError:
        return TaskFileError(f"{path}:{_key_line(text, key)}: {key}: {msg}")

    for key, value in spec.items():
        if key not in _SPEC_TYPES:
            raise fail(key, f"unknown field; known: {', '.join(sorted(_SPEC_TYPES))}")
        types = _SPEC_TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise fail(key, f"expected {' or '.join(t.__name__ for t in types)}, got {json.dumps(value)}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    if "data" not in spec:
        raise fail("kind", "the spec needs a 'data' field (a data file relative to the spec)")
    fmt = spec.get("format", "jsonl")
    if fmt not in FORMATS:
        raise fail("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    from dsv3.evals.loaders import read_rows

    rows = read_rows(path.parent / spec["data"], fmt, kind)
    if not rows:
        raise fail("data", f"{spec['data']} holds no rows")
    fewshot_rows = read_rows(path.parent / spec["fewshot_data"], fmt, kind) if "fewshot_data" in spec else []
    has_tests = "tests" in rows[0]
    scoring = spec.get("scoring", "tests" if has_tests else "exact_match")
    if kind != "multiple_choice" and scoring not in ("exact_match", "tests"):
        raise fail("scoring", f"must be exact_match or tests, got {scoring!r}")
    if spec.get("extract", "full") not in ("full", "first_word"):
        raise fail("extract", f"must be full or first_word, got {spec['extract']!r}")
    temps = spec.get("temperatures", "auto")
    if temps != "auto" and not (
        isinstance(temps, list) and temps and all(_number(t) and t >= 0 for t in temps)
    ):
        raise fail("temperatures", f'expected "auto" or a list of numbers >= 0, got {json.dumps(temps)}')
    samples = spec.get("samples", 1)
    ks = spec.get("k", [1])
    if samples < 1:
        raise fail("samples", f"must be >= 1, got {samples}")
    if not ks or not all(isinstance(k, int) and 1 <= k <= samples for k in ks):
        raise fail("k", f"each k must be an integer in [1, samples={samples}], got {json.dumps(ks)}")
    for key in ("few_shot", "memory_mb"):
        if spec.get(key, 0) < 0:
            raise fail(key, f"must be >= 0, got {spec[key]}")
    if spec.get("max_tokens", 1) < 1 or spec.get("timeout_s", 1) <= 0:
        key = "max_tokens" if spec.get("max_tokens", 1) < 1 else "timeout_s"
        raise fail(key, f"must be positive, got {spec[key]}")
    if not all(isinstance(s, str) and s for s in spec.get("stop", [])):
        raise fail("stop", "must be a list of non-empty strings")
    _check_rows(path.parent / spec["data"], rows, kind, scoring)
    return Task(
        name=spec.get("name", path.name.split(".")[0]),
        kind=kind,
        rows=rows,
        fewshot_rows=fewshot_rows,
        few_shot=spec.get("few_shot", 0),
        scoring=scoring,
        extract=spec.get("extract", "full"),
        max_tokens=spec.get("max_tokens", OUTPUT_CAP),
        temperatures=None if temps == "auto" else tuple(float(t) for t in temps),
        samples=samples,
        k=tuple(ks),
        stop=tuple(spec.get("stop", [])),
        timeout_s=float(spec.get("timeout_s", 5.0)),
        memory_mb=spec.get("memory_mb", 512),
        smoke=spec.get("smoke", False),
        description=spec.get("description", ""),
        source=str(path),
    )


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_rows(data: Path, rows: list[dict[str, Any]], kind: str, scoring: str) -> None:
    """Every row has the fields its kind and scoring need, with the right types."""
    need = {
        "multiple_choice": {"query": str, "choices": list, "answer": int},
        "generate": {"prompt": str},
        "fim": {"prefix": str, "suffix": str},
    }[kind]
    if kind != "multiple_choice":
        need = need | ({"tests": str} if scoring == "tests" else {"answer": (str, list)})
    for row in rows:
        where = f"{data}:{row.get('_line', '?')}"
        for key, typ in need.items():
            if key not in row:
                raise TaskFileError(f"{where}: missing field {key!r} (a {kind} row needs {', '.join(need)})")
            if not isinstance(row[key], typ) or isinstance(row[key], bool):
                raise TaskFileError(f"{where}: {key}: wrong type {type(row[key]).__name__}")
        if kind == "multiple_choice":
            choices = row["choices"]
            if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise TaskFileError(f"{where}: choices: need at least two non-empty strings")
            if not 0 <= row["answer"] < len(choices):
                raise TaskFileError(
                    f"{where}: answer: {row['answer']} is not an index into {len(choices)} choices"
                )
