"""bench/pipeline.py: its prediction and figures without processes (the all-to-all cost model of the
simulated step: exposed in a lone op, hidden behind an F&B pair's computation; the hidden share),
and a toy run of the whole bench on 4 gloo ranks, which times `Trainer.train_step()` itself."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3.parallel.pipeline.plan import simulate
from dsv3.parallel.pipeline.schedule import build_schedule


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_all_to_all_time_is_exposed_in_lone_ops_and_hidden_in_pairs(bench):
    base = bench.StageCosts(f=1.0, b=2.0, w=1.0, per_stage=((1.0, 2.0, 1.0),) * 4, a2a=(0.0,) * 4)
    costs = base.with_latency(0.25, (2, 2, 2, 2))  # 0.5 s of all-to-all per forward or backward
    sched = build_schedule("dualpipev", 4, 4)
    ops = {len(op.tasks): op for ops in sched.ops for op in ops}
    lone_f = next(op for ops in sched.ops for op in ops if op.kind == "F")
    assert costs.of(lone_f) == pytest.approx(1.5)  # F + its all-to-alls
    assert costs.of(ops[2]) == pytest.approx(max(1.0 + 2.0, 1.0))  # the pair's computation hides them
    heavy = base.with_latency(2.0, (2, 2, 2, 2))  # more communication than computation: it shows
    assert heavy.of(ops[2]) == pytest.approx(8.0)
    assert simulate(sched, costs).makespan > simulate(sched, base).makespan


def test_hidden_share_counts_only_the_latency_s_part_of_the_blocked_time(bench):
    steps = [{"comm_wait": 0.5, "exchanges": 10}]
    base = [{"comm_wait": 0.1, "exchanges": 10}]  # blocked for a slower peer even without latency
    assert bench.hidden_share(steps, base, 0.1, "comm_wait", "exchanges") == pytest.approx(0.6)
    assert bench.hidden_share(steps, None, 0.1, "comm_wait", "exchanges") == pytest.approx(0.5)
    assert bench.hidden_share(steps, base, 0.0, "comm_wait", "exchanges") is None


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_the_bench_times_the_trainer_s_own_step():
    """A toy run on 4 ranks (pp=2 x ep=2): every timed step is a `Trainer.train_step()` (the step
    counters advance, the two schedules' trainers give the same losses on the same data), the
    trainer step is at least its runner part, and the injected all-to-all time is counted."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "pipeline.py"
    cmd = [sys.executable, str(bench), "--preset", "tiny", "--layers", "3", "--vocab", "300", "--seq", "16",
           "--chunks", "4", "--steps", "1", "--warmup", "0", "--repeats", "1", "--schedules", "1f1b",
           "dualpipev", "--a2a-latency", "0", "0.001", "--timeout", "60"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    steps = re.search(r"trainer steps taken: 1f1b=(\d+) dualpipev=(\d+); losses of 1f1b: (.*); "
                      r"largest loss difference between the schedules: (\S+)", out)  # fmt: skip
    assert steps, out
    assert steps.group(1) == steps.group(2) == "2"  # one step per latency, each a trainer step
    assert all(math.isfinite(float(v)) for v in steps.group(3).split())
    assert float(steps.group(4)) < 1e-5
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("1f1b", "dualpipev"):
            rows[cells[0], cells[1]] = [float(c) if c[-1].isdigit() else c for c in cells[2:]]
    assert set(rows) == {(s, ms) for s in ("1f1b", "dualpipev") for ms in ("0.00", "1.00")}, out
    for (name, ms), (wall, runner, sim, *_, injected, _, _, hidden, pair) in rows.items():
        assert wall >= runner > 0 and sim > 0, (name, ms, wall, runner)
        assert (injected > 0) == (ms == "1.00")  # the EP exchanges of the step, x 1 ms
        assert (hidden == "-") == (ms == "0.00") and (pair == "-") == (name == "1f1b" or ms == "0.00")
