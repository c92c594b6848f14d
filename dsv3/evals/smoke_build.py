"""Build the bundled SMOKE tasks from the project's own corpus (the Python standard library and
Shakespeare, dsv3.data.corpus): `python -m dsv3.evals.smoke_build [DIR]` (default: dsv3/evals/smoke).

They are smoke tests of the harness and of a demo model, not benchmarks: small (10 to 40 rows),
drawn from the training corpus itself (so a model may have seen the answers), and labelled
`"smoke": true` in their specs and as [smoke] in reports.

- smoke_code: complete a standard-library function from its signature and docstring; the tests
  compare it with the library's own function on fixed arguments (the module's other globals are
  provided, so helper names resolve).
- smoke_fim: the same functions with the body held out between the docstring and the end (FIM).
- smoke_cloze: the last word of a Shakespeare line, given the two lines before it (exact match of
  the first word generated).
- smoke_mc: which of four lines follows two Shakespeare lines (three from elsewhere in the play).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np

# (module, function, argument tuples as Python literals): pure functions whose results compare by ==
FUNCTIONS = [
    ("colorsys", "rgb_to_yiq", "[(0.2, 0.4, 0.6), (1.0, 0.0, 0.5)]"),
    ("colorsys", "yiq_to_rgb", "[(0.5, 0.1, -0.1), (0.2, 0.3, 0.4)]"),
    ("colorsys", "rgb_to_hls", "[(0.2, 0.4, 0.6), (0.5, 0.5, 0.5), (1.0, 0.0, 0.0)]"),
    ("colorsys", "hls_to_rgb", "[(0.3, 0.5, 0.5), (0.7, 0.2, 0.0)]"),
    ("colorsys", "rgb_to_hsv", "[(0.2, 0.4, 0.6), (0.0, 0.0, 0.0), (0.9, 0.1, 0.3)]"),
    ("colorsys", "hsv_to_rgb", "[(0.1, 0.5, 0.5), (0.6, 1.0, 0.2), (0.0, 0.0, 0.7)]"),
    ("bisect", "bisect_right", "[([1, 3, 5, 7], 4), ([1, 1, 2], 1), ([], 3)]"),
    ("bisect", "bisect_left", "[([1, 3, 5, 7], 5), ([1, 1, 2], 1), ([2], 3)]"),
    ("bisect", "insort_right", "[([1, 3, 5], 4), ([1, 1], 1)]"),
    ("string", "capwords", "[('hello  big world',), ('a-b c', '-')]"),
    ("html", "escape", '[(\'<a href="x">&</a>\',), ("it\'s", False)]'),
    ("shlex", "quote", "[('simple',), ('has space',), (\"it's\",), ('',)]"),
    ("calendar", "isleap", "[(1900,), (2000,), (2024,), (2023,)]"),
    ("calendar", "leapdays", "[(1900, 2000), (2001, 2025)]"),
    ("textwrap", "indent", "[('a\\nb\\n', '> '), ('x\\n\\ny', '  ')]"),
    ("posixpath", "basename", "[('/a/b/c.txt',), ('c',), ('/a/',)]"),
    ("posixpath", "dirname", "[('/a/b/c.txt',), ('c',), ('/a/',)]"),
    ("statistics", "median", "[([3, 1, 2],), ([4, 1, 3, 2],)]"),
]

TEST_TEMPLATE = """import copy as _copy
import {module} as _ref
globals().update({{k: v for k, v in vars(_ref).items() if k != {name!r} and not k.startswith("__")}})

def _close(x, y):
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= 1e-9 * max(1.0, abs(y))
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y))
    return x == y

for _args in {args}:
    _mine, _theirs = _copy.deepcopy(_args), _copy.deepcopy(_args)
    _x, _y = {name}(*_mine), _ref.{name}(*_theirs)
    assert _close(_x, _y) and _mine == _theirs, (_args, _x, _y)
"""


def function_parts(module: str, name: str) -> tuple[str, str]:
    """(signature + docstring, body) of a top-level function, from the module's source file."""
    mod = importlib.import_module(module)
    source = Path(mod.__file__).read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            first = node.body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
            split = first.end_lineno if has_doc and len(node.body) > 1 else first.lineno - 1
            return "".join(lines[node.lineno - 1 : split]), "".join(lines[split : node.end_lineno])
    raise LookupError(f"{module}.{name}: no top-level function in {mod.__file__}")


def code_rows() -> tuple[list[dict], list[dict]]:
    gen, fim = [], []
    for module, name, args in FUNCTIONS:
        head, body = function_parts(module, name)
        tests = TEST_TEMPLATE.format(module=module, name=name, args=args)
        gen.append({"prompt": head, "tests": tests, "source": f"stdlib/{module}.{name}"})
        fim.append({"prefix": head, "suffix": "\n", "tests": tests, "answer": body.rstrip("\n"),
                    "source": f"stdlib/{module}.{name}"})  # fmt: skip
    return gen, fim


def verse_lines(texts: list[str]) -> list[list[str]]:
    """Runs of consecutive verse-like lines (indented or not, 20-60 characters, no stage
    directions) per document."""
    runs = []
    for text in texts:
        run: list[str] = []
        for line in text.splitlines():
            s = line.strip()
            if 20 <= len(s) <= 60 and not s.isupper() and not s.startswith(("[", "Enter", "Exit", "ACT")):
                run.append(s)
            else:
                if len(run) >= 4:
                    runs.append(run)
                run = []
    return runs


def shakespeare_rows(n_cloze: int = 40, n_mc: int = 40, seed: int = 0) -> tuple[list[dict], list[dict]]:
    from dsv3.data.corpus import shakespeare_documents

    docs = shakespeare_documents()
    rng = np.random.default_rng(seed)
    runs = verse_lines([d.text for d in docs])
    cloze, mc = [], []
    while len(cloze) < n_cloze or len(mc) < n_mc:
        run = runs[int(rng.integers(len(runs)))]
        i = int(rng.integers(2, len(run)))
        context = f"{run[i - 2]}\n{run[i - 1]}\n"
        words = run[i].split()
        last = re.sub(r"[^A-Za-z']", "", words[-1])
        if len(cloze) < n_cloze and len(words) >= 3 and len(last) >= 3:
            stem = run[i][: run[i].rfind(words[-1])].rstrip()
            cloze.append({"prompt": context + stem, "answer": last})
        if len(mc) < n_mc:
            others = [runs[int(rng.integers(len(runs)))] for _ in range(3)]
            wrong = [o[int(rng.integers(len(o)))] for o in others]
            if run[i] in wrong:
                continue
            answer = int(rng.integers(4))
            choices = wrong[:answer] + [run[i]] + wrong[answer:]
            mc.append({"query": context, "choices": choices, "answer": answer})
    return cloze, mc


SPECS = {
    "smoke_code": {"kind": "generate", "scoring": "tests", "max_tokens": 192, "stop": ["\ndef ", "\nclass "],
                   "description": "complete a stdlib function from its signature and docstring (tests)"},
    "smoke_fim": {"kind": "fim", "scoring": "tests", "max_tokens": 192,
                  "description": "infill a stdlib function's body between docstring and end (tests)"},
    "smoke_cloze": {"kind": "generate", "scoring": "exact_match", "extract": "first_word", "max_tokens": 8,
                    "stop": ["\n"], "description": "the last word of a Shakespeare line (exact match)"},
    "smoke_mc": {"kind": "multiple_choice", "few_shot": 2,
                 "description": "which of four lines follows two Shakespeare lines (log-likelihood)"},
}  # fmt: skip


def build(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    gen, fim = code_rows()
    cloze, mc = shakespeare_rows()
    written = []
    for name, rows in (("smoke_code", gen), ("smoke_fim", fim), ("smoke_cloze", cloze), ("smoke_mc", mc)):
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        spec = {"name": name, "smoke": True, **SPECS[name], "data": data.name}
        path = out / f"{name}.task.json"
        path.write_text(json.dumps(spec, indent=2) + "\n")
        written += [data, path]
    return written


if __name__ == "__main__":
    for p in build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "smoke"):
        print(p)
