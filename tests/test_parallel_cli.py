"""`torchrun --nproc-per-node 2 -m dsv3.train --ep 2 ...`: the documented command trains and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3 import Transformer

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]

WORDS = "experts on every rank receive their tokens by all-to-all and send the outputs back".split()


def test_torchrun_trains_with_expert_parallelism_and_zero(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    for d in range(30):
        idx = torch.randint(0, len(WORDS), (80 + 2 * d,), generator=g).tolist()
        (corpus / f"d{d}.txt").write_text(" ".join(WORDS[i] for i in idx) + ".\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nproc-per-node", "2", "-m", "dsv3.train", "--preset", "tiny", "--steps", "2",
        "--ep", "2", "--precision", "fp32", "--data", str(corpus), "--out", str(tmp_path / "run"), "--quiet",
        "--threads", "1", "seq_len=32", "micro_batch=1", "batch_start=4", "batch_end=4", "eval_batches=1",
        "tensorboard=false", "parallel.two_hop=true", "parallel.ranks_per_node=1", "parallel.timeout=30",
    ]  # fmt: skip
    env = {
        **os.environ,
        "DSV3_CACHE": str(tmp_path / "cache"),
        "DSV3_DIST_TIMEOUT": "30",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert "val_loss" in json.loads(proc.stdout[proc.stdout.index("{") :])  # rank 0 prints the last eval
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    model = Transformer.from_pretrained(ckpt)  # one ordinary checkpoint with all 8 experts
    assert model.moe_layers()[0].experts.w1.shape[0] == 8
