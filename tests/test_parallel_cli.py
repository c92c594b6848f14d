"""`torchrun --nproc-per-node 2 -m dsv3.train --ep 2 ...`: the documented command trains and checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_util import torchrun_env, torchrun_train, torchrun_train_command
from word_corpus import write_word_corpus

from dsv3.checkpoint import load_pretrained

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]

WORDS = "experts on every rank receive their tokens by all-to-all and send the outputs back".split()


def test_torchrun_trains_with_expert_parallelism_and_zero(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus", n_docs=30, base_len=80, step=2, words=WORDS)
    proc = torchrun_train(
        tmp_path, "--preset", "tiny", "--steps", "2", "--ep", "2", "--precision", "fp32", "--data", str(corpus),
        "seq_len=32", "micro_batch=1", "batch_start=4", "batch_end=4", "eval_batches=1", "tensorboard=false",
        "parallel.two_hop=true", "parallel.ranks_per_node=1", "parallel.timeout=30", timeout=140,
    )  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert "val_loss" in json.loads(proc.stdout[proc.stdout.index("{") :])  # rank 0 prints the last eval
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    model = load_pretrained(ckpt)  # one ordinary checkpoint with all 8 experts
    assert model.moe_layers()[0].experts.w1.shape[0] == 8


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/task").exists(), reason="needs /proc to find the workers"
)


@contextlib.contextmanager
def training_under_torchrun(tmp_path: Path, **env: str):
    """torchrun with 2 workers training `tiny` for 100000 steps; yields (agent, worker pids) once both
    train, and kills every process it started afterwards."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(20):
        (corpus / f"d{d}.txt").write_text(" ".join(WORDS[(d + i) % len(WORDS)] for i in range(80)) + ".\n")
    run = tmp_path / "run"
    cmd = torchrun_train_command(
        run, "--preset", "tiny", "--steps", "100000", "--dp", "2", "--precision", "fp32", "--data", str(corpus),
        "seq_len=32", "micro_batch=1", "batch_start=2", "batch_end=2", "log_every=1", "eval_every=100000",
        "ckpt_every=100000", "tensorboard=false",
    )  # fmt: skip
    env = torchrun_env(tmp_path / "cache", **env)
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 100
        while not ((run / "metrics.jsonl").exists() and '"train"' in (run / "metrics.jsonl").read_text()):
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate(timeout=10)[1][
                -3000:
            ]
            time.sleep(0.2)
        workers = _children(agent.pid)
        assert len(workers) == 2
        yield agent, workers
    finally:
        for pid in [agent.pid, *workers]:  # torchrun starts each worker in a session of its own
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        agent.wait(10)


def _wait_gone(pids: list[int], limit: float) -> float:
    t0 = time.monotonic()
    while not all(_gone(p) for p in pids) and time.monotonic() - t0 < limit:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), f"still running after {limit} s"
    return time.monotonic() - t0


@needs_proc
def test_workers_exit_within_seconds_when_the_torchrun_agent_is_killed(tmp_path):
    """kill -9 of the agent used to leave both workers training to the end as orphans."""
    from dsv3.parallel.launch import PARENT_DIED_EXIT

    with training_under_torchrun(tmp_path) as (agent, workers):
        os.kill(agent.pid, signal.SIGKILL)
        assert _wait_gone(workers, 30) < 5
        _, err = agent.communicate(timeout=20)
        # the first worker to notice exits with the message; the other may fail first on its dead peer
        assert f"the launcher (pid {agent.pid}) died; exiting with code {PARENT_DIED_EXIT}" in err


@needs_proc
def test_a_stopped_worker_ends_the_torchrun_run_by_heartbeat_not_collective_timeout(tmp_path):
    """SIGSTOP of one worker: its peer reports it by rank after DSV3_HEARTBEAT_TIMEOUT, and torchrun
    stops the run, instead of waiting out the collective timeout (120 s here, 600 s by default)."""
    from dsv3.parallel.launch import PEER_SILENT_EXIT

    env = {"DSV3_HEARTBEAT_TIMEOUT": "3", "DSV3_DIST_TIMEOUT": "120"}
    with training_under_torchrun(tmp_path, **env) as (agent, workers):
        os.kill(workers[1], signal.SIGSTOP)
        line = _stderr_line_with(agent, "sent no heartbeat for", limit=30)
        assert "DSV3_HEARTBEAT_TIMEOUT=3" in line and f"exiting with code {PEER_SILENT_EXIT}" in line
        assert _wait_gone(workers[:1], 10) < 10  # the watcher is gone; torchrun then stops the stopped one


def _stderr_line_with(proc: subprocess.Popen, text: str, limit: float) -> str:
    """The first line of proc's stderr that holds `text`, read within `limit` seconds."""
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=max(0.01, end - time.monotonic()))
        except queue.Empty:
            break
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r} on stderr within {limit} s")
