"""`torchrun -m dsv3.train --pp 2 parallel.schedule=zb1p ...`, then `--resume`: the documented
pipelined command trains, and a resume through the CLI keeps the saved schedule and step count."""

from __future__ import annotations

import json

import pytest
from train_util import torchrun_train
from word_corpus import write_word_corpus

pytestmark = [pytest.mark.dist, pytest.mark.timeout(200)]


def test_pipelined_train_resumes_through_the_cli_with_its_saved_schedule(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus", n_docs=30, base_len=80, step=2)
    first = torchrun_train(
        tmp_path, "--preset", "tiny", "--steps", "3", "--pp", "2", "--precision", "fp32", "--data", str(corpus),
        "parallel.schedule=zb1p", "seq_len=32", "micro_batch=1", "batch_start=2", "batch_end=2",
        "eval_batches=1", "ckpt_every=2", "tensorboard=false", "parallel.timeout=30",
    )  # fmt: skip
    assert (
        "pipeline: zb1p over pp=2 ranks (2 stages), 2 micro-batches per step" in first.stdout + first.stderr
    )
    ckpts, log = tmp_path / "run" / "checkpoints", tmp_path / "run" / "metrics.jsonl"
    before = {
        r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "train"
    }
    # the run is cut back to its step-2 checkpoint, as if it had been stopped there
    for extra in ("step_00000003",):
        for f in (ckpts / extra).iterdir():
            f.unlink()
        (ckpts / extra).rmdir()
    second = torchrun_train(tmp_path, "--resume")  # nothing but --resume: every setting from the checkpoint
    out = second.stdout + second.stderr
    assert "step_00000002 (step 2)" in second.stdout  # resumed at the saved step count
    assert "pipeline: zb1p over pp=2 ranks (2 stages)" in out  # the saved schedule, not 1f1b
    after = {
        r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "train"
    }
    assert sorted(after) == [1, 2, 3]
    assert after[3] == pytest.approx(before[3], abs=1e-5)  # the same step 3 as the uninterrupted run
    state = json.loads((ckpts / "step_00000003" / "trainer.json").read_text())
    assert state["step"] == 3 and state["config"]["parallel"]["schedule"] == "zb1p"
    assert state["config"]["steps"] == 3
