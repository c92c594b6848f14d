"""FIM (report §4.1): exact PSM/SPM token layouts, rate, determinism, inference prompt consistency."""

import math

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from dsv3.data.fim import FIMConfig, document_ids, fim_ids, fim_prompt, split_text
from dsv3.data.tokenizer import BOS, EOS, Tokenizer, TokenizerError

TEXTS = ["def add(a, b):\n    return a + b\n", "To be, or not to be: that is the question.\n"] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 320, show_progress=False)


def test_psm_layout_exact(tok):
    prefix, middle, suffix = "def add(a, ", "b):\n    ret", "urn a + b\n"
    got = fim_ids(tok, prefix, middle, suffix)
    want = [0, 3, *tok.encode(prefix), 2, *tok.encode(suffix), 4, *tok.encode(middle), 1]
    assert got == want
    # the same layout spelled with the token strings of DESIGN §6
    assert tok.decode(got) == f"{BOS}<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>{middle}{EOS}"


def test_spm_layout_exact(tok):
    prefix, middle, suffix = "To be, ", "or not", " to be"
    got = fim_ids(tok, prefix, middle, suffix, spm=True)
    want = [0, 3, 2, *tok.encode(suffix), 4, *tok.encode(prefix), *tok.encode(middle), 1]
    assert got == want
    assert tok.decode(got) == f"{BOS}<｜fim▁begin｜><｜fim▁hole｜>{suffix}<｜fim▁end｜>{prefix}{middle}{EOS}"


@pytest.mark.parametrize("spm", [False, True])
def test_inference_prompt_is_training_prefix(tok, spm):
    """complete(prefix, suffix) must see exactly what training put before the middle."""
    prefix, middle, suffix = "def add(a, b):\n", "    return a + b", "\n"
    prompt = fim_prompt(tok, prefix, suffix, spm=spm)
    full = fim_ids(tok, prefix, middle, suffix, spm=spm)
    assert full[: len(prompt)] == prompt
    assert full[len(prompt) :] == tok.encode(middle) + [tok.eos_id]


def test_split_text_covers_text_and_is_uniform():
    rng = np.random.default_rng(0)
    text = "abcdefghij"
    starts, lengths = [], []
    for _ in range(4000):
        p, m, s = split_text(text, rng)
        assert p + m + s == text
        starts.append(len(p))
        lengths.append(len(m))
    # two uniform cut points in 0..10: the first sits at every position, the expected middle is ~10/3
    assert set(starts) == set(range(11))
    assert abs(np.mean(lengths) - 40 / 11) < 0.2  # E|i-j| for i,j uniform on 0..10 = 40/11


def test_document_ids_plain_and_fim_reassemble(tok):
    text = TEXTS[0]
    assert document_ids(tok, text, np.random.default_rng(0), FIMConfig(rate=0.0)) == [0, *tok.encode(text), 1]
    for seed in range(20):
        ids = document_ids(tok, text, np.random.default_rng(seed), FIMConfig(rate=1.0))
        assert ids[:2] == [tok.bos_id, tok.fim_begin_id] and ids[-1] == tok.eos_id
        h, e = ids.index(tok.fim_hole_id), ids.index(tok.fim_end_id)
        prefix, suffix, middle = tok.decode(ids[2:h]), tok.decode(ids[h + 1 : e]), tok.decode(ids[e + 1 : -1])
        assert prefix + middle + suffix == text


def test_fim_rate_and_determinism(tok):
    n, rate = 3000, 0.1

    def run(seed):
        out = []
        for i in range(n):
            out.append(document_ids(tok, "abc def", np.random.default_rng([seed, i]), FIMConfig(rate=rate)))
        return out

    a, b, c = run(0), run(0), run(1)
    assert a == b  # deterministic in the seed
    assert a != c
    n_fim = sum(ids[1] == tok.fim_begin_id for ids in a)
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(n_fim - n * rate) < 5 * sigma, n_fim


def test_spm_rate(tok):
    cfg = FIMConfig(rate=1.0, spm_rate=1.0)
    for seed in range(10):
        ids = document_ids(tok, "hello world", np.random.default_rng(seed), cfg)
        assert ids[1:3] == [tok.fim_begin_id, tok.fim_hole_id]


def test_fim_config_validates():
    with pytest.raises(ValueError, match="rate"):
        FIMConfig(rate=1.5)
    with pytest.raises(ValueError, match="spm_rate"):
        FIMConfig(spm_rate=-0.1)


def test_fim_needs_fim_tokens():
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.add_special_tokens([BOS, EOS])
    tok = Tokenizer(hf)
    assert tok.fim_begin_id is None
    with pytest.raises(TokenizerError, match="fim"):
        fim_prompt(tok, "a", "b")
