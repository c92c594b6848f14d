"""Interrupted runs resume exactly: SIGINT, SIGTERM and kill -9 of a real `dsv3 train` process, in
FP32, BF16 and FP8, each compared step by step with an uninterrupted run (docs/training.md lists
the matrix); plus the resume bookkeeping (logs truncated to the checkpoint, no silent restart)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from word_corpus import write_word_corpus

from dsv3.data.dataset import DataConfig, prepare_data
from dsv3.train import TrainConfig, Trainer
from dsv3.train.state import TrainCheckpointError, list_checkpoints

STEPS = 16
SETTINGS = dict(
    seq_len=32, micro_batch=2, batch_start=4, batch_end=4, lr=3e-3, warmup_steps=3, eval_every=100,
    eval_batches=1, ckpt_every=4, keep_last=5, tensorboard=False, val_fraction=0.1,
)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("resume")
    corpus = write_word_corpus(root / "corpus")
    cache = str(root / "cache")
    prepare_data(DataConfig(data=str(corpus), vocab_size=300, val_fraction=0.1, cache=cache, progress=False))
    return str(corpus), cache


def _cfg(out: Path, data: str, precision: str, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(preset="tiny", steps=STEPS, out=str(out), data=data, precision=precision),
                          **SETTINGS, **kw})  # fmt: skip


def _records(out: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(out)]


_references: dict[str, list[tuple[int, float]]] = {}


def _reference(tmp_path_factory, data, precision: str) -> list[tuple[int, float]]:
    """The uninterrupted run of each precision, trained once per module (in-process, one thread)."""
    if precision not in _references:
        corpus, cache = data
        out = tmp_path_factory.mktemp(f"ref-{precision}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DSV3_CACHE", cache)
            Trainer(_cfg(out, corpus, precision), show_progress=False).fit()
        _references[precision] = _losses(out)
    return _references[precision]


def _start(out: Path, data, precision: str) -> subprocess.Popen:
    corpus, cache = data
    overrides = [f"{k}={v}" for k, v in SETTINGS.items()]
    cmd = [sys.executable, "-m", "dsv3", "train", "--quiet", "--threads", "1", "--preset", "tiny",
           "--steps", str(STEPS), "--precision", precision, "--data", corpus, "--out", str(out), *overrides]  # fmt: skip
    env = dict(os.environ, DSV3_CACHE=cache)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, ready, what: str, limit: float = 120) -> None:
    end = time.time() + limit
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}"
            )
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def _train_steps_done(out: Path) -> int:
    try:
        return len(_records(out))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


# SIGINT and SIGTERM take one path (the handler finishes the step, saves, exits 128 + signal), so
# BF16 and FP8 each run one of them (and kill -9, the periodic checkpoint): the other two cells
# cost ~21 s of the suite and tested nothing the FP32 cells and these do not
CELLS = [
    ("fp32", signal.SIGINT), ("fp32", signal.SIGTERM), ("fp32", signal.SIGKILL),
    ("bf16", signal.SIGKILL), pytest.param("bf16", signal.SIGTERM, marks=pytest.mark.slow),
    ("fp8", signal.SIGKILL), pytest.param("fp8", signal.SIGINT, marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.parametrize(("precision", "sig"), CELLS)
def test_interrupted_run_resumes_with_the_uninterrupted_losses(
    tmp_path, tmp_path_factory, data, precision, sig
):
    """Kill a real training process, resume it, and get every step's loss of the uninterrupted run
    bit for bit; metrics.jsonl then holds each step once. SIGINT/SIGTERM save the step they finish
    and exit 128 + signal; kill -9 falls back on the last periodic checkpoint (every 4 steps)."""
    reference = _reference(tmp_path_factory, data, precision)
    out = tmp_path / "run"
    proc = _start(out, data, precision)
    try:
        if sig == signal.SIGKILL:  # past the step-4 checkpoint, before the next one
            _wait_for(proc, lambda: _train_steps_done(out) >= 5, "step 5")
        else:
            _wait_for(proc, lambda: _train_steps_done(out) >= 3, "step 3")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    state = json.loads((ckpt / "trainer.json").read_text())
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and state["step"] % 4 == 0
        assert _train_steps_done(out) > state["step"]  # steps after the checkpoint were logged, then lost
    else:
        name = signal.Signals(sig).name
        assert proc.returncode == 128 + sig, err[-2000:]
        assert f"interrupted by {name} at step {state['step']}" in err and "--resume" in err
        assert state["step"] < STEPS
        # the saved loader position is the end of the saved step, not a micro-batch ahead of it
        assert state["loader"]["position"] == state["step"] * 4
        assert _train_steps_done(out) == state["step"]  # the interrupted step was finished and logged
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSV3_CACHE", data[1])
        Trainer(_cfg(out, data[0], precision), resume=True, show_progress=False).fit()
    assert _losses(out) == reference  # every step once, each with the uninterrupted loss


def test_rope_frequencies_stay_fp32_under_a_dtype_cast(tiny):
    """A cast model must rotate by the frequencies `from_pretrained` rebuilds in FP32 (item 3)."""
    from dsv3 import Transformer
    from dsv3.model.rope import inv_frequencies

    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.bfloat16(), lambda m: m.half()):
        model = cast(Transformer(tiny))
        assert model.rotary.inv_freq.dtype == torch.float32
        assert torch.equal(model.rotary.inv_freq, inv_frequencies(tiny))
        assert model.embed_tokens.weight.dtype != torch.float32  # the weights were cast


def test_resume_without_a_valid_checkpoint_refuses_to_overwrite(tmp_path, data, monkeypatch):
    corpus, cache = data
    monkeypatch.setenv("DSV3_CACHE", cache)
    out = tmp_path / "run"
    Trainer(_cfg(out, corpus, "fp32", steps=6), show_progress=False).fit()
    for ckpt in list_checkpoints(out / "checkpoints"):  # every checkpoint truncated
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="truncated"):
        with pytest.raises(
            TrainCheckpointError, match=r"--resume found 2 checkpoint\(s\), none valid.*--force"
        ):
            Trainer(_cfg(out, corpus, "fp32", steps=6), resume=True, show_progress=False)
    assert len(_records(out)) == 6  # the run is untouched
    with pytest.warns(UserWarning, match="truncated"):
        fresh = Trainer(_cfg(out, corpus, "fp32", steps=6), resume=True, force=True, show_progress=False)
    assert fresh.step == 0 and list_checkpoints(out / "checkpoints") == []
    fresh.fit()
    assert [s for s, _ in _losses(out)] == list(range(1, 7))  # a new log, not appended to the old one


def test_resume_into_a_new_directory_starts_fresh(tmp_path, data, monkeypatch):
    corpus, cache = data
    monkeypatch.setenv("DSV3_CACHE", cache)
    trainer = Trainer(_cfg(tmp_path / "new", corpus, "fp32", steps=2), resume=True, show_progress=False)
    assert trainer.step == 0 and trainer.resumed_from is None


def test_single_text_file_gets_a_validation_tail_and_a_checkpoint(tmp_path, data, monkeypatch):
    """One text file is one document: its last lines become the validation split (item 4)."""
    corpus, cache = data
    text = "".join(p.read_text() for p in sorted(Path(corpus).iterdir()))
    lone = tmp_path / "one.txt"
    lone.write_text(text)
    cfg = _cfg(tmp_path / "lone", str(lone), "fp32", steps=2, ckpt_every=2, eval_every=2)
    monkeypatch.setenv("DSV3_CACHE", cache)
    trainer = Trainer(cfg, show_progress=False)
    assert len(trainer.data.val) > 33
    result = trainer.fit()
    assert result["val_loss"] > 0 and list_checkpoints(tmp_path / "lone" / "checkpoints")


def test_too_small_validation_split_fails_before_training(tmp_path, data, monkeypatch):
    from dsv3.data.corpus import CorpusError

    corpus, cache = data
    lone = tmp_path / "one.txt"
    lone.write_text(Path(corpus, "doc00.txt").read_text().strip() * 6)  # one line: cut by characters
    monkeypatch.setenv("DSV3_CACHE", cache)
    with pytest.raises(CorpusError, match="validation split has .* tokens"):
        Trainer(_cfg(tmp_path / "small", str(lone), "fp32", steps=2, val_fraction=0.01), show_progress=False)
    assert not (tmp_path / "small" / "metrics.jsonl").exists()


def test_due_checkpoint_is_written_before_the_evaluation_of_its_step(tmp_path, data, monkeypatch):
    corpus, cache = data
    monkeypatch.setenv("DSV3_CACHE", cache)
    trainer = Trainer(
        _cfg(tmp_path / "ev", corpus, "fp32", steps=4, ckpt_every=2, eval_every=2), show_progress=False
    )

    def failing_evaluation() -> dict:
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer, "evaluate", failing_evaluation)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "ev" / "checkpoints")] == ["step_00000002"]


def test_resume_runs_the_evaluation_a_kill_lost_and_hashes_the_checkpoint_once(tmp_path, data, monkeypatch):
    """Killed between the checkpoint of step 2 and its evaluation: the resumed run evaluates step 2
    first (the value an uninterrupted run logs) and reads each checkpoint file's SHA-256 once."""
    import dsv3.data.fetch as fetch

    corpus, cache = data
    monkeypatch.setenv("DSV3_CACHE", cache)
    cfg = lambda name: _cfg(tmp_path / name, corpus, "fp32", steps=4, ckpt_every=2, eval_every=2)  # noqa: E731
    Trainer(cfg("ref"), show_progress=False).fit()
    trainer = Trainer(cfg("ev"), show_progress=False)
    monkeypatch.setattr(trainer, "_evaluate_and_log", lambda log: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()  # as a kill right after the checkpoint: no eval record of step 2
    assert _records(tmp_path / "ev", "eval") == []
    hashed = []
    monkeypatch.setattr(fetch, "sha256_file", lambda f, real=fetch.sha256_file: hashed.append(f) or real(f))
    resumed = Trainer(cfg("ev"), resume=True, show_progress=False)
    manifest = json.loads((resumed.resumed_from / "manifest.json").read_text())["files"]
    assert resumed.step == 2 and sorted(hashed) == sorted(resumed.resumed_from / n for n in manifest)
    resumed.fit()
    evals = lambda name: [(r["step"], r["val_loss"]) for r in _records(tmp_path / name, "eval")]  # noqa: E731
    assert [s for s, _ in evals("ev")] == [s for s, _ in evals("ref")] == [2, 4]
    assert [v for _, v in evals("ev")] == pytest.approx([v for _, v in evals("ref")], abs=1e-6)


def test_train_command_says_how_it_resumes(tmp_path, data, monkeypatch, capsys):
    """`dsv3 train --resume`: a fresh start is announced; a run with only broken checkpoints is
    refused in one line with exit code 2, naming the directory and --force."""
    from dsv3.cli import main

    train_main = lambda argv: main(["train", *argv])  # noqa: E731  (through run_cli, as `dsv3 train`)
    corpus, cache = data
    monkeypatch.setenv("DSV3_CACHE", cache)
    out = tmp_path / "run"
    argv = ["--resume", "--quiet", "--threads", "1", "--preset", "tiny", "--steps", "2", "--precision", "fp32", "--data", corpus,
            "--out", str(out), *[f"{k}={v}" for k, v in SETTINGS.items()]]  # fmt: skip
    assert train_main(argv) == 0
    assert f"no valid checkpoint in {out / 'checkpoints'}: starting from step 0" in capsys.readouterr().out
    for ckpt in list_checkpoints(out / "checkpoints"):
        (ckpt / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="incomplete"):
        assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--force" in err


def test_resume_through_the_cli_keeps_the_saved_settings(tmp_path, data, monkeypatch, capsys):
    """`dsv3 train --out DIR --resume` continues with the run's own TrainConfig (it used to fall back
    to the defaults: 1,000 steps, the default lr schedule, precision re-measured), with explicit
    options and overrides on top and printed; a model change is refused naming the field; and a
    fresh run into a directory with checkpoints is refused without --force."""
    from dsv3.cli import main

    corpus, cache = data
    monkeypatch.setenv("DSV3_CACHE", cache)
    out = tmp_path / "run"
    first = ["train", "--quiet", "--threads", "1", "--preset", "tiny", "--steps", "4", "--precision", "fp32",
             "--data", corpus, "--out", str(out), *[f"{k}={v}" for k, v in SETTINGS.items()]]  # fmt: skip
    assert main(first) == 0
    saved = json.loads((list_checkpoints(out / "checkpoints")[-1] / "trainer.json").read_text())["config"]
    capsys.readouterr()

    # no --preset, --steps, lr or schedule on the line: all come from the checkpoint
    assert main(["train", "--quiet", "--threads", "1", "--out", str(out), "--resume", "--steps", "6"]) == 0
    printed = capsys.readouterr().out
    assert "resume: the settings saved in" in printed and "steps=6 (saved 4)" in printed
    last = list_checkpoints(out / "checkpoints")[-1]
    state = json.loads((last / "trainer.json").read_text())
    assert state["step"] == 6 and state["precision"] == "fp32"
    assert {k: v for k, v in state["config"].items() if k != "steps"} == {
        k: v for k, v in saved.items() if k != "steps"
    }
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4, 5, 6]
    lrs = [r["lr"] for r in _records(out)]
    assert lrs[4] == pytest.approx(SETTINGS["lr"]) and max(lrs) == pytest.approx(SETTINGS["lr"])

    assert main(["train", "--quiet", "--out", str(out), "--resume", "model.n_layers=4"]) == 2
    assert "model.n_layers: a resumed run keeps its checkpoint's model" in capsys.readouterr().err
    assert main(["train", "--quiet", "--out", str(out), "--resume", "--preset", "small"]) == 2
    assert "preset: a resumed run keeps" in capsys.readouterr().err
    assert main(first) == 2  # a fresh run over it, without --force
    assert "already holds a run (step_00000006)" in capsys.readouterr().err
