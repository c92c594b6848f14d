"""Shared set-up of the multi-process training tests: the word corpus prepared once, the Trainer
settings every layout is compared under, and `torchrun -m dsv3.train` as the tests start it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from word_corpus import write_word_corpus

from dsv3.data.dataset import DataConfig, prepare_data
from dsv3.train import TrainConfig


def data_config(root: str) -> DataConfig:
    return DataConfig(
        data=f"{root}/corpus", vocab_size=300, val_fraction=0.1, cache=f"{root}/cache", progress=False
    )


def train_config(root: str, out: str, steps: int, **kw) -> TrainConfig:
    """`tiny`, one global batch of 8 sequences of 32 tokens, lr 3e-3, no eval or checkpoint on the way."""
    base = dict(
        preset="tiny", steps=steps, out=f"{root}/{out}", data=f"{root}/corpus", seq_len=32, micro_batch=1,
        batch_start=8, batch_end=8, lr=3e-3, warmup_steps=2, eval_every=100, eval_batches=1, ckpt_every=100,
        precision="fp32", tensorboard=False, val_fraction=0.1, gamma=0.01,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def prepared_word_corpus(root: Path) -> str:
    """The word corpus under `root`, tokenized into its cache by this process (the ranks then read it)."""
    write_word_corpus(root / "corpus")
    prepare_data(data_config(str(root)))
    return str(root)


def torchrun_train_command(out: Path, *args: str) -> list[str]:
    """`torchrun --nproc-per-node 2 -m dsv3.train --out OUT --quiet --threads 1 ARGS...`."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--nproc-per-node", "2", "-m", "dsv3.train", "--out", str(out), "--quiet",
            "--threads", "1", *args]  # fmt: skip


def torchrun_env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a torchrun test: its own data cache, one OpenMP thread, `extra` on top."""
    return {**os.environ, "DSV3_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def torchrun_train(tmp_path: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run `torchrun -m dsv3.train` into tmp_path/run with collectives bounded to 30 s; it must succeed."""
    env = torchrun_env(tmp_path / "cache", DSV3_DIST_TIMEOUT="30")
    cmd = torchrun_train_command(tmp_path / "run", *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
