"""`dsv3 synth --model`: rejection sampling (dsv3.data.rejection). A fake generator whose answers
pass and fail both checks (the sandboxed code test against the library's behaviour, exact match);
a tiny model through the engine with a check we control (the kept answer is the engine's own
output); the CLI end to end and its one-line errors."""

import json

import pytest
from serve_util import make_ckpt

from dsv3.data.chat_synth import synth_main
from dsv3.data.rejection import Item, code_items, llm_generator, rejection_sample
from dsv3.errors import run_cli
from dsv3.infer import LLM, SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("synth_ckpt"))


def test_fake_generator_accepts_and_rejects_by_the_task_checks():
    split, isabs = (it for it in code_items() if it.question.split("(")[0].endswith((" split", " isabs")))
    verse = Item("continue", "Continue this passage:\nTo be, or not to be", "that is the question.")
    wrong_code = "def split(p):\n    return (p, '')\n"  # defines the name, behaves differently
    answers = {
        split.question: [wrong_code, split.reference],  # second passes the sandboxed test
        isabs.question: ["def isabs(s):\n    while True: pass\n", "isabs = None"],  # neither passes
        verse.question: ["  that is the question.\n", "no"],  # exact match after stripping
    }
    seen = []

    def fake(prompts, samples):
        seen.append(samples)
        return [answers[p[-1]["content"]][:samples] for p in prompts]

    rows, report = rejection_sample([split, isabs, verse], fake, 2, system="Be brief.")
    assert seen == [2]
    assert report["samples"] == 6 and report["accepted"] == 2 and report["rate"] == pytest.approx(2 / 6)
    assert report["kept"] == 2 and report["questions"] == 3
    assert report["by_kind"] == {"code": {"samples": 4, "accepted": 1, "kept": 1},
                                 "continue": {"samples": 2, "accepted": 1, "kept": 1}}  # fmt: skip
    assert rows[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": split.question},
                                   {"role": "assistant", "content": split.reference.strip()}]  # fmt: skip
    assert rows[1]["messages"][-1]["content"] == "that is the question."


def test_tiny_model_through_the_engine_with_a_controlled_check(ckpt):
    llm = LLM(ckpt)
    items = [Item("returns", "def add", "?"), Item("returns", "To be", "?")]
    generate = llm_generator(llm, temperature=0.0, max_tokens=6, seed=3)
    rows, report = rejection_sample(items, generate, 2, check=lambda it, a: it.question == "def add")
    assert report["samples"] == 4 and report["accepted"] == 2 and report["kept"] == 1
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "def add"}], add_generation_prompt=True
    )
    want = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, seed=3))[0].text
    assert rows == [{"messages": [{"role": "user", "content": "def add"},
                                  {"role": "assistant", "content": want.strip()}]}]  # fmt: skip


def test_cli_writes_the_kept_rows_and_the_report(ckpt, tmp_path, capsys):
    out, rep = tmp_path / "chats.jsonl", tmp_path / "new_dir" / "report.json"
    argv = ["--out", str(out), "--model", str(ckpt), "--n", "3", "--samples", "2", "--max-tokens", "4",
            "--temperature", "0.5", "--report", str(rep), "--threads", "1"]  # fmt: skip
    assert synth_main(argv) == 0
    report = json.loads(rep.read_text())
    assert report["questions"] == 3 and report["samples"] == 6  # three short code questions, two samples each
    assert len(out.read_text().splitlines()) == report["kept"]  # a random tiny model: likely none
    assert f"{report['accepted']}/6 answers passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/ckpt"], "dsv3 synth: --model /nonexistent/ckpt: no such directory"),
        (["--model", ".", "--temperature", "-1"], "dsv3 synth: --temperature -1.0: must be >= 0"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message):
    assert run_cli("dsv3 synth", synth_main, ["--out", str(tmp_path / "x.jsonl"), *argv]) == 2
    assert capsys.readouterr().err.strip() == message
