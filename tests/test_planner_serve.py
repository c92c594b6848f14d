"""`dsv3 plan serve`: the SLO search, cache-hit accounting, the real EPLB placement, the sweep."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from dsv3 import ModelConfig
from dsv3.config import ConfigError
from dsv3.planner import loads
from dsv3.planner.hardware import PRESETS
from dsv3.planner.serve import (
    ServeLayout,
    decode_slots,
    plan_decode,
    plan_prefill,
    plan_serve,
    sweep,
)

V3 = ModelConfig.from_preset("671b")
H800 = PRESETS["H800"]


def test_the_decode_batch_is_the_largest_that_meets_the_slo():
    lay = ServeLayout(tpot_ms=30.0)
    d = plan_decode(V3, H800, lay)
    assert d.tpot_s * 1e3 <= 30.0 and d.fits
    nxt = plan_decode(V3, H800, dataclasses.replace(lay, batch=d.batch + 1))
    assert nxt.tpot_s * 1e3 > 30.0 or not nxt.fits
    # a looser SLO allows a larger batch and more tokens per node, each user slower
    loose = plan_decode(V3, H800, dataclasses.replace(lay, tpot_ms=60.0))
    assert loose.batch >= d.batch and loose.output_tps_per_node >= d.output_tps_per_node


def test_mtp_emits_more_tokens_per_step():
    on = plan_decode(V3, H800, ServeLayout(batch=32))
    off = plan_decode(V3, H800, ServeLayout(batch=32, mtp=False))
    assert on.step_s > off.step_s  # two tokens per sequence to verify, and the draft
    assert on.tpot_s == pytest.approx(on.step_s / 1.85)
    assert off.tpot_s == off.step_s


def test_small_decode_batches_are_memory_bound():
    """A step at batch 1 costs about what reading the weights and the cache costs, not the FLOPs."""
    one, two = (plan_decode(V3, H800, ServeLayout(batch=b, mtp=False)) for b in (1, 2))
    assert two.compute_s < 1.2 * one.compute_s  # twice the tokens, nearly the same time


def test_prefill_counts_cache_hits_as_input():
    p = plan_prefill(V3, H800, ServeLayout())
    assert p.input_tps_per_node == pytest.approx(p.computed_tps_per_node / (1 - 0.563))
    cold = plan_prefill(V3, H800, ServeLayout(cache_hit=0.0))
    assert cold.input_tps_per_node == pytest.approx(cold.computed_tps_per_node)
    assert cold.compute_s < p.compute_s  # with hits, each new token also attends to the cached prefix


def test_overlapped_prefill_computes_on_the_sms_deepep_leaves():
    free = plan_prefill(V3, H800, ServeLayout(prefill_comm_sm_fraction=0.0))
    held = plan_prefill(V3, H800, ServeLayout())  # 24 of 132 SMs for the all-to-all
    assert held.compute_s == pytest.approx(free.compute_s * 132 / 108)
    assert held.comm_s == free.comm_s
    serial = plan_prefill(V3, H800, ServeLayout(prefill_overlap=False))  # nothing runs beside it
    assert serial.compute_s == pytest.approx(free.compute_s)
    assert serial.batch_s == pytest.approx(serial.compute_s + serial.comm_s)


def test_eplb_balance_is_the_real_planners_on_the_load_distribution():
    lay = ServeLayout(loads="zipf:0.8")
    p = plan_prefill(V3, H800, lay)
    w = loads.make_loads("zipf:0.8", lay.balance_layers, V3.n_routed_experts)
    assert p.balance == pytest.approx(loads.balance(w, 32, slots=288, groups=8, nodes=4))
    assert p.balance_no_eplb == pytest.approx(loads.balance(w, 32))
    assert p.balance < p.balance_no_eplb
    uniform = plan_prefill(V3, H800, ServeLayout())
    assert p.batch_s > uniform.batch_s  # the busiest GPU's experts set the pace
    assert decode_slots(V3, ServeLayout()) == 320  # 256 routed + 32 redundant + 32 shared replicas


def test_nodes_and_cost_for_a_target():
    lay = ServeLayout(target_input_tps=1e6, target_output_tps=3e5)
    plan = plan_serve(V3, H800, lay)
    assert plan.prefill_nodes % 4 == 0 and plan.decode_nodes % 40 == 0  # whole units
    assert (
        (plan.prefill_nodes - 4) * plan.prefill.input_tps_per_node
        < 1e6
        <= plan.prefill_nodes * plan.prefill.input_tps_per_node
    )
    per_gpu_s = H800.price_per_gpu_hour / 3600
    assert plan.cost_per_m_output == pytest.approx(8 * per_gpu_s / plan.decode.output_tps_per_node * 1e6)


def test_sweep_puts_layouts_meeting_the_slo_first():
    lay = ServeLayout(tpot_ms=40.0)
    rows = sweep(V3, H800, lay)
    ok = [d.fits and d.tpot_s * 1e3 <= 40.0 for _, d in rows]
    assert ok[0] and ok == sorted(ok, reverse=True)
    good = [d.output_tps_per_node for (_, d), o in zip(rows, ok) if o]
    assert good == sorted(good, reverse=True)
    assert {v.decode_ep for v, _ in rows} >= {64, 320}


def test_layout_errors_name_the_field():
    with pytest.raises(ConfigError, match="decode_tp"):
        ServeLayout(decode_gpus=320, decode_tp=3)
    with pytest.raises(ConfigError, match="cache_hit"):
        ServeLayout(cache_hit=1.0)
    with pytest.raises(ConfigError, match="prefill_comm_sm_fraction"):
        ServeLayout(prefill_comm_sm_fraction=1.0)
    with pytest.raises(ConfigError, match="decode_redundant"):
        plan_decode(V3, H800, ServeLayout(decode_redundant=33))


def test_cli_sweep_table_and_plot(tmp_path):
    png = tmp_path / "sweep.png"
    r = subprocess.run(
        [sys.executable, "-m", "dsv3", "plan", "serve", "--sweep", "--plot", str(png), "tpot_ms=40"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "tok/s/node" in r.stdout and png.stat().st_size > 10_000


def test_cli_plan_and_errors(capsys):
    from dsv3.cli import main

    assert main(["plan", "serve", "--hardware", "H200", "loads=zipf:1"]) == 0
    out = capsys.readouterr().out
    assert "input tokens/s per node" in out and "per million output tokens" in out
    assert main(["plan", "serve", "prefil_gpus=8"]) == 2
    assert "did you mean prefill_gpus" in capsys.readouterr().err


def test_a_ttft_slo_shrinks_the_prefill_micro_batch():
    free = plan_prefill(V3, H800, ServeLayout())
    slo = free.batch_s * 1e3 / 3
    tight = plan_prefill(V3, H800, ServeLayout(ttft_ms=slo))
    assert tight.tokens < free.tokens and tight.batch_s * 1e3 <= slo
    assert tight.input_tps_per_node <= free.input_tps_per_node * 1.0001  # smaller batches: no faster
