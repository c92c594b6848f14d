"""The one JSONL reader: one JSON object per non-blank line, errors naming the file and the line.

Used for training data (dsv3.data.corpus) and evaluation rows (dsv3.evals.loaders); each caller
passes its own error class, so a bad line surfaces as that module's user error (`path:line: why`).
Lines are split on line breaks only (as a file iterates), never on the Unicode separators
(U+2028, U+0085) that `str.splitlines` would also cut at and that JSON allows inside strings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path, error: Callable[[str], Exception]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of `path`; `error(message)` is raised for an
    unreadable file, non-UTF-8 text, a line that is not JSON or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))  # so a column past the end names this line
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows
