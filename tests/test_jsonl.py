"""The one JSONL reader behind training data and evaluation rows: same rows, same file:line errors."""

import json

import pytest

from dsv3.data.corpus import CorpusError, read_documents
from dsv3.evals.loaders import read_jsonl as eval_rows
from dsv3.evals.tasks import TaskFileError
from dsv3.jsonl import read_jsonl


def test_rows_keep_their_line_numbers_and_unicode_separators(tmp_path):
    f = tmp_path / "d.jsonl"
    # U+2028 and U+0085 are legal unescaped inside a JSON string: the line must not be cut there
    f.write_text('{"text": "a\u2028b\u0085c"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert read_jsonl(f, ValueError) == [(1, {"text": "a\u2028b\u0085c"}), (3, {"text": "two"})]
    assert [d.text for d in read_documents(f)] == ["a\u2028b\u0085c", "two"]
    assert [r["_line"] for r in eval_rows(f)] == [1, 3]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": '], r"d\.jsonl:2: not valid JSON \(Expecting value at column 10\)"),
        (['{"text": "ok"}', "[1, 2]"], r"d\.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_both_callers_name_file_and_line_in_their_own_error(tmp_path, lines, message):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        read_documents(f)
    with pytest.raises(TaskFileError, match=message):
        eval_rows(f)


def test_unreadable_and_non_utf8_files(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(json.dumps({"text": "caf"}).encode() + b"\xe9\n")
    with pytest.raises(CorpusError, match=r"latin\.jsonl: not UTF-8 text"):
        read_documents(f)
    with pytest.raises(TaskFileError, match=r"missing\.jsonl: cannot read"):
        eval_rows(tmp_path / "missing.jsonl")
