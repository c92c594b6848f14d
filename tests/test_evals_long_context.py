"""Long-context evaluation: passkey prompts of the asked length and depth, accuracy by length and
depth, the plots, and the validation loss by position bucket."""

import json

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.data.tokenizer import Tokenizer
from dsv3.evals.long_context import (
    NEEDLE,
    QUESTION,
    accuracy_grid,
    loss_by_position,
    passkey_choice_task,
    passkey_task,
    plot_loss_by_position,
    plot_passkey,
)
from dsv3.evals.runner import evaluate_task

TEXTS = ["def add(a, b):\n    return a + b\n", "To be, or not to be: that is the question.\n"] * 20
FILLER = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 200


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS + [FILLER[:2000]], 300, show_progress=False)


def test_passkey_prompts_have_their_length_depth_and_key(tok):
    task = passkey_task(tok, [128, 192], [0.0, 0.5, 1.0], per_cell=2, filler=FILLER)
    assert len(task.rows) == 2 * 3 * 2 and task.temperatures == (0.0,)
    keys = set()
    for row in task.rows:
        n = len([tok.bos_id, *tok.encode(row["prompt"])])
        assert abs(n - row["length"]) <= 4, (n, row["length"])  # merges at the joins move it a token or two
        needle = NEEDLE.format(key=row["answer"])
        before = len(tok.encode(row["prompt"][: row["prompt"].index(needle)]))  # haystack tokens before it
        hay = n - 1 - len(tok.encode(needle)) - len(tok.encode(QUESTION))
        assert abs(before / hay - row["depth"]) < 0.1
        assert row["prompt"].endswith("What is the pass key? The pass key is")
        keys.add(row["answer"])
    assert len(keys) > 6  # every prompt its own key


class KeyAtShortLengths:
    """Answers with the key for rows of length <= limit, with a wrong key for the others."""

    name = "scripted"

    def __init__(self, task, limit):
        self.by_prompt = {r["prompt"]: r for r in task.rows}
        self.limit = limit

    def generate(self, requests):
        out = []
        for r in requests:
            row = self.by_prompt[r.prompt]
            out.append(f" {row['answer']}. Yes" if row["length"] <= self.limit else " 12345")
        return out


def test_accuracy_by_length_and_depth_and_the_plots(tok, tmp_path):
    task = passkey_task(tok, [128, 192], [0.0, 1.0], per_cell=3, filler=FILLER)
    grid = accuracy_grid(task, evaluate_task(task, KeyAtShortLengths(task, 128)))
    assert grid["lengths"] == [128, 192] and grid["depths"] == [0.0, 1.0]
    assert grid["accuracy"] == [[1.0, 1.0], [0.0, 0.0]] and grid["by_length"] == {"128": 1.0, "192": 0.0}
    png = plot_passkey({"base": grid, "extended": grid}, tmp_path / "p.png")
    assert png.stat().st_size > 1000


class PrefersKeyAtShortLengths:
    """Log-likelihood: highest for the true key in rows of length <= limit, for the first choice otherwise."""

    def __init__(self, task, limit):
        self.rows = {r["query"]: r for r in task.rows}
        self.limit = limit

    def loglikelihood(self, requests):
        out = []
        for ctx, choice in requests:
            row = self.rows[ctx]
            best = row["choices"][row["answer"]] if row["length"] <= self.limit else row["choices"][0]
            out.append(-1.0 if choice == best else -5.0)
        return out


def test_passkey_by_log_likelihood_among_keys_not_in_the_prompt(tok):
    exact = passkey_task(tok, [128, 192], [0.0, 1.0], per_cell=3, filler=FILLER)
    task = passkey_choice_task(tok, [128, 192], [0.0, 1.0], per_cell=3, filler=FILLER, n_choices=10)
    assert [r["query"] for r in task.rows] == [r["prompt"] for r in exact.rows]  # the same prompts
    answers = set()
    for row, plain in zip(task.rows, exact.rows):
        assert len(set(row["choices"])) == 10 and row["choices"][row["answer"]] == " " + plain["answer"]
        others = [c.strip() for j, c in enumerate(row["choices"]) if j != row["answer"]]
        assert all(len(k) == 5 and k not in row["query"] for k in others)
        answers.add(row["answer"])
    assert len(answers) > 1  # the true key's position is shuffled
    backend = PrefersKeyAtShortLengths(task, 128)
    grid = accuracy_grid(task, evaluate_task(task, backend))
    first = [float(r["answer"] == 0) for r in task.rows if r["length"] == 192]  # picks choice 0 there
    assert grid["by_length"] == {"128": 1.0, "192": pytest.approx(sum(first) / len(first))}


def test_loss_by_position_is_the_mean_loss_of_each_position_range(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    batches = [torch.randint(0, 512, (2, 17)), torch.randint(0, 512, (1, 17))]
    buckets = loss_by_position(model, batches, n_buckets=4)
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    rows = torch.cat(batches)
    with torch.no_grad():
        logp = torch.log_softmax(model(rows[:, :-1]), -1)
    nll = -logp.gather(-1, rows[:, 1:, None])[..., 0]  # (3, 16)
    for b in buckets:
        assert b["loss"] == pytest.approx(float(nll[:, b["start"] : b["end"]].mean()), abs=1e-5)
    assert plot_loss_by_position({"m": buckets}, tmp_path / "l.png", mark=8).stat().st_size > 1000


def test_long_context_command_on_a_checkpoint(tmp_path, tok, monkeypatch, capsys):
    import dsv3.evals.long_context as lc
    from dsv3.cli import main

    monkeypatch.setattr(lc, "filler_text", lambda: FILLER)
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), ckpt)
    tok.save(ckpt)
    out = tmp_path / "lc"
    argv = ["eval", "--long-context", "--ckpt", str(ckpt), "--lengths", "128,192,1000", "--depths", "0.5",
            "--per-cell", "1", "--out", str(out), "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ckpt"]["passkey"]["lengths"] == [128, 192]  # 1000 does not fit the 256-position model
    assert len(report["ckpt"]["passkey_choice"]["by_length"]) == 2 and (out / "passkey_choice.png").exists()
    printed = capsys.readouterr().out
    assert (out / "passkey.png").exists() and "passkey accuracy by length" in printed
    assert "passkey by log-likelihood (chance 0.10)" in printed


def test_passkey_training_rows_are_prompt_completions_the_evaluation_scores(tok, tmp_path, capsys):
    from dsv3.cli import main
    from dsv3.data.chat import read_conversations, render
    from dsv3.evals.long_context import passkey_training_rows

    rows = passkey_training_rows(tok, 40, 128, 224, filler=FILLER)
    lengths = [len([tok.bos_id, *tok.encode(r["prompt"])]) for r in rows]
    assert (
        124 <= min(lengths) and max(lengths) <= 228 and max(lengths) - min(lengths) > 40
    )  # spread, in range
    for r in rows:
        key = r["completion"].strip(" .")
        assert r["completion"] == f" {key}." and NEEDLE.format(key=key) in r["prompt"]
        assert r["prompt"].endswith("What is the pass key? The pass key is")
    # no training prompt is an evaluation prompt (their own random stream)
    eval_prompts = {row["prompt"] for row in passkey_task(tok, [128], [0.0, 0.5, 1.0], 5, filler=FILLER).rows}
    assert not eval_prompts & {r["prompt"] for r in rows}
    ckpt, out, argv = _synth_passkey_argv(tok, tmp_path, 12)
    assert main(argv) == 0
    got = read_conversations(out)
    assert len(got) == 12 and all(set(r) == {"prompt", "completion"} for r in got)
    ids, mask = render(tok, got[0])  # trained on exactly the completion and its eos
    want = tok.encode(got[0]["completion"]) + [tok.eos_id]
    assert ids[-len(want) :] == want and mask == [0] * (len(ids) - len(want)) + [1] * len(want)
    assert ids[0] == tok.bos_id and ids[1 : len(ids) - len(want)] == tok.encode(got[0]["prompt"])
    assert main(["synth", "--passkey", "--out", str(out)]) == 2
    assert "--passkey: needs --tokenizer" in capsys.readouterr().err
    assert main(["synth", "--passkey", "--tokenizer", str(ckpt), "--lengths", "64", "--out", str(out)]) == 2
    assert "--lengths '64': expected MIN-MAX" in capsys.readouterr().err


def _synth_passkey_argv(tok, tmp_path, n: int):
    """A saved tokenizer, an output path and the `dsv3 synth --passkey` line writing n rows there."""
    ckpt, out = tmp_path / "tok", tmp_path / "pk.jsonl"
    tok.save(ckpt)
    argv = [
        "synth",
        "--passkey",
        "--tokenizer",
        str(ckpt),
        "--lengths",
        "128-192",
        "--n",
        str(n),
        "--out",
        str(out),
    ]
    return ckpt, out, argv


def test_passkey_rows_as_plain_documents_for_data_extra(tok, tmp_path):
    from dsv3.cli import main
    from dsv3.data.corpus import read_documents
    from dsv3.evals.long_context import passkey_training_rows

    _, out, argv = _synth_passkey_argv(tok, tmp_path, 5)
    assert main([*argv, "--text"]) == 0
    docs = [d.text for d in read_documents(out)]  # what `dsv3 train --data-extra` reads
    pairs = passkey_training_rows(tok, 5, 128, 192)  # same seed, same rows
    assert docs == [r["prompt"] + r["completion"] for r in pairs]
