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


def steps_until_rank1_stops(rank, world):
    """Data-parallel steps; in step 2 rank 1 stops itself (SIGSTOP: every thread, as a frozen machine)."""
    import signal

    from dsv3.parallel.strategy import build_strategy

    torch.manual_seed(0)
    strategy = build_strategy(dp=2, timeout=120.0)  # the collective timeout alone would take 2 minutes
    model = strategy.parallelize(Transformer(ModelConfig.from_preset("tiny")))
    strategy.build_optimizer(model, _Groups, [{"params": list(model.parameters())}])
    batch = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(rank))
    for step in range(3):
        if step == 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        model.loss(batch).total.backward()
        strategy.reduce_gradients(model)
    return "finished"


def test_a_stopped_peer_is_detected_by_its_heartbeat_long_before_the_collective_timeout():
    from dsv3.parallel.launch import PEER_SILENT_EXIT

    t0 = time.monotonic()
    outcomes = launch(
        steps_until_rank1_stops, 2, timeout=120, deadline=90, grace=2, env={"DSV3_HEARTBEAT_TIMEOUT": "3"}
    )
    elapsed = time.monotonic() - t0
    watcher, stopped = outcomes
    assert not watcher.ok and watcher.exitcode == PEER_SILENT_EXIT, watcher.error
    assert (
        "rank 0: rank 1 sent no heartbeat for" in watcher.error
        and "DSV3_HEARTBEAT_TIMEOUT=3" in watcher.error
    )
    assert stopped.exitcode is not None and stopped.exitcode < 0  # the launcher killed the stopped rank
    assert elapsed < 60  # the 120 s collective timeout never came into it


ORPHAN = """
import os, sys, time
from dsv3.parallel.launch import start_watchdog
start_watchdog()
print(os.getpid(), flush=True)
time.sleep(60)
print("still running", flush=True)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout, stderr=sys.stderr)
time.sleep(60)
"""


def test_a_worker_whose_launcher_is_killed_exits_within_seconds():
    """kill -9 of the parent (torchrun's agent, here a stand-in) ends the watched child promptly."""
    import signal
    import subprocess
    import sys

    from dsv3.parallel.launch import PARENT_DIED_EXIT

    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, ORPHAN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    child = None
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        t0 = time.monotonic()
        out, err = parent.communicate(timeout=20)  # EOF: the child, the last writer, has exited
        assert time.monotonic() - t0 < 5
        assert "still running" not in out
        assert f"the launcher (pid {parent.pid}) died; exiting with code {PARENT_DIED_EXIT}" in err
    finally:
        for pid in (parent.pid, child):
            if pid:
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
