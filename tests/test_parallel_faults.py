"""A rank that dies or hangs makes the others fail with a clear error in bounded time."""

from __future__ import annotations

import os
import time

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.parallel.launch import launch

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

TIMEOUT = 5.0  # parallel.timeout: seconds a collective waits for a silent peer


def steps_until_rank1_fails(rank, world, mode):
    """Expert-parallel training steps (forward, backward, reduction); rank 1 stops in step 2."""
    from dsv3.parallel.strategy import build_strategy

    torch.manual_seed(0)
    strategy = build_strategy(ep=2, timeout=TIMEOUT)
    model = strategy.parallelize(Transformer(ModelConfig.from_preset("tiny")))
    strategy.build_optimizer(model, _Groups, [{"params": list(model.parameters())}])
    batch = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(rank))
    for step in range(3):
        if step == 1 and rank == 1:
            if mode == "die":
                os._exit(3)
            time.sleep(600)  # alive but silent: only the timeout can tell
        model.loss(batch).total.backward()
        strategy.reduce_gradients(model)
    return "finished"


class _Groups:
    def __init__(self, groups):
        self.param_groups = groups


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_survivor_reports_the_failed_peer_instead_of_hanging(mode):
    t0 = time.monotonic()
    outcomes = launch(steps_until_rank1_fails, 2, mode, timeout=TIMEOUT, deadline=90, grace=3)
    elapsed = time.monotonic() - t0
    survivor, failed = outcomes
    assert not survivor.ok and survivor.exitcode == 1  # it raised and exited, nobody had to kill it
    assert "PeerFailure: rank 0:" in survivor.error and "of ranks [0, 1]" in survivor.error
    assert "died or did not answer" in survivor.error
    if mode == "die":
        assert failed.exitcode == 3
    else:
        assert f"within {TIMEOUT:g} s" in survivor.error
        assert failed.exitcode is not None and failed.exitcode < 0  # the launcher stopped the silent rank
    assert elapsed < 80
