"""The same data gives the same corpus, tokenizer and token arrays in every run, wherever it lies.

Multi-process tests build their data in a fresh tmp_path per run; document names once held that
absolute path, and the name keys the train/validation split, so the tokenizer trained on the split
(and every token) changed from run to run. Two fresh interpreters, with different hash seeds and
the corpus in different directories, must now agree byte for byte.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from word_corpus import write_word_corpus

from dsv3.data.corpus import CorpusError, read_documents

TESTS = Path(__file__).parent

PREPARE = """
import hashlib, json, sys
from pathlib import Path
from word_corpus import write_word_corpus
from dsv3.data.dataset import DataConfig, prepare_data
root = Path(sys.argv[1])
write_word_corpus(root / "corpus")
data = prepare_data(DataConfig(data=str(root / "corpus"), vocab_size=300, val_fraction=0.1,
                               cache=str(root / "cache"), progress=False))
model = json.loads(data.tokenizer.hf.to_str())["model"]
digest = lambda a: hashlib.sha256(a.tobytes()).hexdigest()
print(json.dumps({"merges": model["merges"], "vocab": model["vocab"], "train": digest(data.train.tokens),
                  "val": digest(data.val.tokens), "val_docs": data.val.n_docs}))
"""


def _prepare_in_fresh_process(root: Path, hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", PREPARE, str(root)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_two_runs_in_other_directories_and_hash_seeds_give_identical_data(tmp_path):
    a = _prepare_in_fresh_process(tmp_path / "run_a", "1")
    b = _prepare_in_fresh_process(tmp_path / "elsewhere" / "run_b", "2")
    assert a["val_docs"] >= 1 and len(a["merges"]) > 0
    assert a["merges"] == b["merges"] and a["vocab"] == b["vocab"]
    assert (a["train"], a["val"]) == (b["train"], b["val"])


def test_document_names_are_relative_to_the_data_path(tmp_path):
    write_word_corpus(tmp_path / "x" / "corpus", n_docs=2)
    write_word_corpus(tmp_path / "y" / "corpus", n_docs=2)
    names = [d.name for d in read_documents(tmp_path / "x" / "corpus")]
    assert names == ["corpus/doc00.txt", "corpus/doc01.txt"]
    assert [d.name for d in read_documents(tmp_path / "y" / "corpus")] == names
    both = [d.name for d in read_documents([tmp_path / "x" / "corpus", tmp_path / "y" / "corpus"])]
    assert both == ["0/corpus/doc00.txt", "0/corpus/doc01.txt", "1/corpus/doc00.txt", "1/corpus/doc01.txt"]
    with pytest.raises(CorpusError, match=r"doc01\.txt: the same file is listed twice"):
        read_documents([tmp_path / "x" / "corpus", tmp_path / "x" / "corpus" / "doc01.txt"])
