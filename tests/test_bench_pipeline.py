"""bench/pipeline.py's prediction and figures without processes: the all-to-all cost model of the
simulated step (exposed in a lone op, hidden behind an F&B pair's computation) and the hidden share."""

from __future__ import annotations

import importlib.util
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
