"""prepare_data end to end on a tiny corpus: caching, FIM only in training, metrics for the trainer."""

import json
import math

import numpy as np
import pytest

from dsv3.data import dataset as dataset_mod
from dsv3.data.dataset import DataConfig, prepare_data
from dsv3.data.loader import PackedLoader, val_batches
from dsv3.data.metrics import bits_per_byte, bytes_per_token, unigram_entropy

WORDS = "the quick brown fox jumps over a lazy dog while code runs: print(x)\n".split(" ")


@pytest.fixture()
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) + ".\n"} for _ in range(120)]
    d = tmp_path / "data"
    d.mkdir()
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def config(data_dir, tmp_path, **kw):
    return DataConfig(data=str(data_dir), vocab_size=300, cache=str(tmp_path / "cache"), progress=False, **kw)


def test_prepare_tokenizes_every_document(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, val_fraction=0.1, fim_rate=0.0, split_punct_rate=0.0)
    data = prepare_data(cfg)
    tok = data.tokenizer
    assert data.train.n_docs == 108 and data.val.n_docs == 12
    texts = [json.loads(line)["text"] for line in (data_dir / "docs.jsonl").read_text().splitlines()]
    for split in (data.train, data.val):
        assert split.offsets[0] == 0 and split.offsets[-1] == len(split.tokens)
        for i in range(split.n_docs):
            doc = split.doc(i).tolist()
            assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
            assert tok.decode(doc[1:-1]) in texts
    assert data.train.tokens.dtype == np.uint16
    assert data.stats["train_tokens"] == len(data.train)


def test_cache_is_reused_and_keyed_by_settings(data_dir, tmp_path, monkeypatch):
    cfg = config(data_dir, tmp_path)
    first = prepare_data(cfg)

    def boom(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(dataset_mod, "_tokenize_to_disk", boom)
    again = prepare_data(cfg)
    assert again.key == first.key and np.array_equal(again.train.tokens, first.train.tokens)
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_data(config(data_dir, tmp_path, fim_rate=0.5))  # other settings, other key
    monkeypatch.undo()
    other = prepare_data(config(data_dir, tmp_path, seed=1))
    assert other.key != first.key
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_extra_data_is_tokenized_into_training_only(data_dir, tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": f"the fox {i}."}) + "\n" for i in range(7)))
    base = prepare_data(config(data_dir, tmp_path, fim_rate=0.0))
    mixed = prepare_data(config(data_dir, tmp_path, fim_rate=0.0, extra=str(extra)))
    assert mixed.key != base.key and mixed.train.n_docs == base.train.n_docs + 7
    assert np.array_equal(mixed.val.tokens, base.val.tokens)
    tok = mixed.tokenizer
    added = [
        tok.decode(mixed.train.doc(i).tolist()[1:-1]) for i in range(base.train.n_docs, mixed.train.n_docs)
    ]
    assert added == [f"the fox {i}." for i in range(7)]


def test_fim_in_training_only_and_text_preserved(data_dir, tmp_path):
    data = prepare_data(config(data_dir, tmp_path, fim_rate=1.0, split_punct_rate=1.0))
    tok = data.tokenizer
    for i in range(data.train.n_docs):
        doc = data.train.doc(i).tolist()
        assert doc[:2] == [tok.bos_id, tok.fim_begin_id] and doc[-1] == tok.eos_id
        assert doc.count(tok.fim_hole_id) == 1 and doc.count(tok.fim_end_id) == 1
    for i in range(data.val.n_docs):
        assert tok.fim_begin_id not in data.val.doc(i).tolist()
    # token splitting changes tokens, never text
    plain = prepare_data(config(data_dir, tmp_path, fim_rate=0.0, split_punct_rate=0.0))
    split = prepare_data(config(data_dir, tmp_path, fim_rate=0.0, split_punct_rate=1.0))
    assert len(split.train) > len(plain.train)
    assert tok.decode(split.train.tokens.tolist()) == tok.decode(plain.train.tokens.tolist())


def test_loader_on_prepared_data(data_dir, tmp_path):
    data = prepare_data(config(data_dir, tmp_path))
    batch = PackedLoader(data.train, 32, seed=0).next_batch(4)
    assert batch.shape == (4, 33) and int(batch.max()) < data.tokenizer.vocab_size
    assert next(val_batches(data.val, 32, 2)).shape == (2, 33)


def test_existing_tokenizer_is_used(data_dir, tmp_path):
    data = prepare_data(config(data_dir, tmp_path))
    data.tokenizer.save(tmp_path / "tok")
    again = prepare_data(config(data_dir, tmp_path, tokenizer=str(tmp_path / "tok")))
    assert again.key == data.key and "loaded" in again.stats["tokenizer"]


def test_bytes_per_token(data_dir, tmp_path):
    tok = prepare_data(config(data_dir, tmp_path)).tokenizer
    text = "the lazy dog runs.\n"
    ids = np.array(tok.encode(text))
    assert bytes_per_token(ids, tok) == pytest.approx(len(text.encode()) / len(ids))
    with_specials = np.array([tok.bos_id, *ids, tok.eos_id])
    assert bytes_per_token(with_specials, tok) == pytest.approx(len(text.encode()) / (len(ids) + 2))
    assert bits_per_byte(math.log(2) * 3.0, 1.5) == pytest.approx(2.0)


def test_unigram_entropy_matches_definition():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 10, size=5000)
    val = rng.integers(0, 8, size=700)
    counts = np.bincount(train, minlength=12) + 1.0
    p = counts / counts.sum()
    want = -np.mean(np.log(p[val]))
    assert unigram_entropy(train, val, 12) == pytest.approx(want)
    # a uniform unigram over 10 ids costs log(10) nats; same distribution gives about that
    assert unigram_entropy(train, rng.integers(0, 10, size=5000), 12) == pytest.approx(math.log(10), abs=0.02)
    assert unigram_entropy(np.zeros(100, int), np.ones(3, int), 4) > math.log(4)  # unseen ids are expensive
