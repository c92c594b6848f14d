"""ZeRO-1 + expert-parallel training through the Trainer on gloo processes, against one process.

The same global batch split over ranks must give the single process's losses (the logged loss is
the mean of the ranks' losses), and a checkpoint written by 4 ranks must resume on 2 ranks and on
1 (the plain Strategy) with the losses of the uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_util import data_config, prepared_word_corpus
from train_util import train_config as _train_config

from dsv3.checkpoint import load_pretrained
from dsv3.data.dataset import prepare_data
from dsv3.parallel.launch import run_ranks
from dsv3.train import TrainConfig, Trainer

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

STEPS = 4  # the schedules see 4 steps; the first 2 run on 4 ranks, the rest after a resume


def train_config(root: str, out: str, **kw) -> TrainConfig:
    return _train_config(root, out, STEPS, **kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return prepared_word_corpus(tmp_path_factory.mktemp("ptrain"))


def train_steps(rank, world, root, out, parallel, checkpoint, n):
    """Each rank: build the Trainer (maybe from a checkpoint), run n steps, save."""
    trainer = Trainer(
        train_config(root, out, parallel=parallel), dataset=prepare_data(data_config(root)),
        checkpoint=checkpoint, show_progress=False,
    )  # fmt: skip
    losses = [trainer.train_step().loss for _ in range(n)]
    path = trainer.save()
    opt = trainer.strategy.optimizer
    state_numel = sum(s.numel() for b in opt.buckets for s in b.shards) if opt is not None else None
    return {"losses": losses, "path": str(path) if path else None, "state_numel": state_numel}


@pytest.fixture(scope="module")
def reference(root) -> list[float]:
    trainer = Trainer(
        train_config(root, "single"), dataset=prepare_data(data_config(root)), show_progress=False
    )
    return [trainer.train_step().loss for _ in range(STEPS)]


@pytest.fixture(scope="module")
def four_ranks(root):
    """EP over 2 ranks x 2 replicas, ZeRO-1 over 4 (replicated weights) and 2 (experts)."""
    return run_ranks(train_steps, 4, root, "four", {"ep": 2}, None, 2, timeout=60, deadline=240)


def test_zero1_expert_parallel_losses_equal_single_process(four_ranks, reference):
    for res in four_ranks:
        assert res["losses"] == pytest.approx(reference[:2], rel=1e-5)
    full = load_pretrained(four_ranks[0]["path"]).num_params()
    for res in four_ranks:  # the optimizer really is sharded: at most ~1/2 of the model on each rank
        assert res["state_numel"] < 0.6 * full


def test_four_rank_checkpoint_is_an_ordinary_single_device_one(four_ranks):
    path = Path(four_ranks[0]["path"])
    assert all(res["path"] is None for res in four_ranks[1:])  # only the main rank writes
    model = load_pretrained(path)  # every expert is there, in the HF layout
    state = torch.load(path / "optimizer.pt", weights_only=False)
    params = list(model.parameters())
    assert sum(len(g["params"]) for g in state["param_groups"]) == len(params)
    shapes = sorted(tuple(s["exp_avg"].shape) for s in state["state"].values())
    assert shapes == sorted(tuple(p.shape) for p in params)  # full tensors, as one process has


def test_four_rank_checkpoint_resumes_on_two_ranks(root, four_ranks, reference):
    """Pure ZeRO-1 data parallelism on 2 ranks (no EP) continues the 4-rank EP run exactly."""
    res = run_ranks(
        train_steps, 2, root, "two", {"dp": 2}, four_ranks[0]["path"], 2, timeout=60, deadline=180
    )
    for r in res:
        assert r["losses"] == pytest.approx(reference[2:], rel=1e-5)


def test_four_rank_checkpoint_resumes_on_one_process(root, four_ranks, reference):
    trainer = Trainer(
        train_config(root, "one"), dataset=prepare_data(data_config(root)), checkpoint=four_ranks[0]["path"],
        show_progress=False,
    )  # fmt: skip
    assert trainer.step == 2
    assert [trainer.train_step().loss for _ in range(2)] == pytest.approx(reference[2:], rel=1e-5)


def batch_on_two_ranks(rank, world, root):
    """micro_batch 8 on 2 ranks cannot make a global batch of 8: refused, naming the fields; micro_batch
    4 trains exactly 8 sequences per step (the 1-process run's batch)."""
    from dsv3.config import ConfigError

    data = prepare_data(data_config(root))
    try:
        Trainer(
            train_config(root, "bad", micro_batch=8, parallel={"dp": 2}), dataset=data, show_progress=False
        )
        refused = ""
    except ConfigError as e:
        refused = str(e)
    trainer = Trainer(
        train_config(root, "fits", micro_batch=4, parallel={"dp": 2}), dataset=data, show_progress=False
    )
    loss = trainer.train_step().loss
    return {"refused": refused, "tokens_seen": trainer.tokens_seen, "loss": loss}


def test_two_ranks_never_silently_change_the_global_batch(root, reference):
    for res in run_ranks(batch_on_two_ranks, 2, root, timeout=60, deadline=180):
        assert (
            "micro_batch (8) x 2 data ranks = 16" in res["refused"] and "set micro_batch=4" in res["refused"]
        )
        assert res["tokens_seen"] == 8 * 32  # the configured global batch of 8 sequences of 32 tokens
        assert res["loss"] == pytest.approx(reference[0], rel=1e-5)
