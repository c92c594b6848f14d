"""`dsv3 plan train`: the project's schedules and simulator fed with the cost model's chunk costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsv3 import ModelConfig
from dsv3.config import ConfigError
from dsv3.parallel.pipeline.plan import formula_bubble
from dsv3.parallel.pipeline.schedule import SCHEDULES
from dsv3.planner.hardware import PRESETS
from dsv3.planner.train import ChunkCosts, TrainLayout, chunk_costs, plan_train

V3 = ModelConfig.from_preset("671b")
H800 = PRESETS["H800"]


def small_v3(schedule: str, **kw) -> TrainLayout:
    """V3's layout with 8 stages and fewer micro-batches (fast to simulate)."""
    gpus = 512 if schedule == "dualpipev" else 1024
    return TrainLayout(gpus=gpus, pp=8, ep=64, schedule=schedule, global_batch=128 * 16, **kw)


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p"])
def test_bubble_is_the_design_formula_with_the_cost_models_costs_and_free_communication(schedule):
    plan = plan_train(V3, H800, small_v3(schedule, communication=False))
    assert plan.chunk.comm_f == plan.chunk.comm_b == plan.chunk.p2p == 0.0
    assert plan.formula_caveat is None
    assert plan.bubble == pytest.approx(formula_bubble(schedule, 8, plan.costs), rel=1e-9)
    assert plan.exposed_comm == 0.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bubble_is_the_design_formula_for_every_schedule_when_its_conditions_hold(schedule):
    """DualPipe's formula needs F = B - W (Figure 5's equal cells); with such chunk costs and free
    communication the planner's pipeline gives exactly DESIGN §5's bubble."""
    cc = ChunkCosts(f=1.0, b=2.0, w=1.0, comm_f=0.0, comm_b=0.0, p2p=0.0)
    plan = plan_train(V3, H800, small_v3(schedule, communication=False), chunk=cc)
    assert plan.formula_caveat is None
    assert plan.bubble == pytest.approx(plan.formula_bubble, rel=1e-12)
    assert plan.formula_bubble == formula_bubble(schedule, 8, plan.costs)


def test_the_cost_models_dualpipe_costs_say_why_the_formula_is_not_exact():
    plan = plan_train(V3, H800, small_v3("dualpipe", communication=False))
    assert plan.formula_caveat is not None and "F = B - W" in plan.formula_caveat
    cc = plan.chunk
    assert cc.w < cc.f < cc.b  # W: the weight-gradient GEMMs only; B adds attention and recompute


def test_dualpipe_hides_the_all_to_all_that_1f1b_exposes():
    """§3.2.1: with cross-node EP the communication is about as long as the computation (1:1), and
    DualPipe overlaps most of it; 1F1B pays it in full."""
    lay = {s: TrainLayout(**{**small_v3(s).__dict__, "global_batch": 128 * 64}) for s in ("1f1b", "dualpipe")}
    plans = {s: plan_train(V3, H800, lay[s]) for s in lay}
    assert plans["dualpipe"].comm_to_compute == pytest.approx(1.0, rel=0.2)
    assert plans["dualpipe"].exposed_comm < 0.25 * plans["1f1b"].exposed_comm
    assert plans["dualpipe"].sm_overhead > 0 == plans["1f1b"].sm_overhead
    assert plans["dualpipe"].step_time < plans["1f1b"].step_time
    # two model chunks per rank: twice the parameters
    mem = {s: p.memory_gb for s, p in plans.items()}
    assert mem["dualpipe"]["parameters"] == pytest.approx(2 * mem["1f1b"]["parameters"])


def test_fp8_and_communication_change_the_chunk_costs():
    lay = small_v3("dualpipe")
    fp8, bf16 = (
        chunk_costs(V3, H800, lay),
        chunk_costs(V3, H800, TrainLayout(**{**lay.__dict__, "fp8": False})),
    )
    assert fp8.w < bf16.w  # FP8 GEMMs are faster
    bf16_wire = chunk_costs(V3, H800, TrainLayout(**{**lay.__dict__, "dispatch": "bf16"}))
    assert fp8.comm_f < bf16_wire.comm_f and fp8.comm_b == bf16_wire.comm_b  # the backward is BF16 anyway
    plan = plan_train(V3, H800, lay)
    assert plan.gpu_hours_per_t == pytest.approx(lay.gpus * 1e12 / plan.tokens_per_s / 3600)
    assert plan.total_cost == pytest.approx(plan.total_gpu_hours * H800.price_per_gpu_hour)


def test_layout_errors_name_the_field():
    with pytest.raises(ConfigError, match="global_batch"):
        TrainLayout(gpus=1024, pp=8, global_batch=100)
    with pytest.raises(ConfigError, match="ep"):
        TrainLayout(gpus=1024, pp=8, ep=48)
    with pytest.raises(ConfigError, match="chunks"):  # dualpipe needs >= 2 PP micro-batches
        plan_train(V3, H800, TrainLayout(gpus=1024, pp=8, global_batch=128 * 8))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsv3", "plan", "train", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_cli_prints_the_plan_and_draws_the_timeline(tmp_path):
    png = tmp_path / "t.png"
    r = _cli("--model", "671b", "gpus=1024", "pp=8", "global_batch=2048", "--timeline", str(png))
    assert r.returncode == 0, r.stderr
    assert "GPU-hours per trillion tokens" in r.stdout and "bubble" in r.stdout
    assert png.stat().st_size > 10_000


def test_cli_json_overrides_and_errors(capsys):
    from dsv3.cli import main

    assert main(["plan", "train", "--json", "schedule=zb1p", "gpus=1024", "pp=8", "global_batch=2048",
                 "--set", "ib_gbps=25"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["layout"]["schedule"] == "zb1p" and out["step_time_s"] > 0
    assert main(["plan", "train", "pipes=3"]) == 2
    assert "pipes: unknown train layout field" in capsys.readouterr().err
    assert main(["plan", "train", "--set", "ib_gbps=-1"]) == 2
    assert "ib_gbps" in capsys.readouterr().err
