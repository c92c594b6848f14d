"""`dsv3 plan calibrate` on the tiny model with a short run: the profile it fits, the held-out runs
it reports (engine decode, one-process training, a 2-rank EP run and a 2-rank 1F1B pipeline)."""

from __future__ import annotations

import pytest

from dsv3 import ModelConfig
from dsv3.planner import calibrate as cal
from dsv3.planner.hardware import Hardware


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_calibrate_fits_a_profile_and_reports_held_out_runs(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    hw, rows = cal.calibrate(
        cfg, (3,), prompt=16, steps=2, train=(1, 16), repeats=1, fit_batches=(1, 2), rounds=1
    )
    assert [r.name for r in rows] == [
        "decode-1 (fit)",
        "decode-2 (fit)",
        "train 1x8 (fit)",
        "decode-3",
        "train 1x16",
        "ep2 train 1x16",
        "pp2 1f1b 4x16",
        "train 1x8 2 busy (fit)",
    ]
    assert [r.held_out for r in rows] == [False, False, False, True, True, True, True, False]
    # kernel_us and seq_us are solved so that the fit runs' predictions equal their measurements
    # (unless the noise made one of them negative, then it is 0); two runs leave group_us at 0
    assert hw.group_us == 0.0
    if hw.kernel_us > 0 and hw.seq_us > 0:
        assert all(r.predicted == pytest.approx(r.measured, rel=1e-6) for r in rows[:2])
    if hw.block_us > 0:
        assert rows[2].predicted == pytest.approx(rows[2].measured, rel=1e-6)
    assert all(r.predicted > 0 and r.measured > 0 for r in rows)
    assert hw.bf16_tflops > 0 and hw.ib_gbps > 0 and hw.gemm_eff == 1.0
    assert Hardware.load(hw.save(tmp_path / "cpu.json")) == hw
    text = cal.format_rows(hw, rows)
    assert "held-out runs within 20%" in text and "decode-3" in text


def test_predictions_grow_with_the_work():
    from dsv3.planner.hardware import PRESETS

    cfg, hw = ModelConfig.from_preset("tiny"), PRESETS["cpu"]
    assert cal.predict_decode(cfg, hw, 8, 16, 4) > cal.predict_decode(cfg, hw, 1, 16, 4)
    one, _ = cal.predict_train(cfg, hw, 1, 32)
    two, comm = cal.predict_train(cfg, hw, 2, 32, ep=2)
    assert two > one and comm > 0
    assert cal.predict_pipeline(cfg, hw, 32) > 0


def test_cli_refuses_a_bad_batch_spec(capsys):
    from dsv3.cli import main

    assert main(["plan", "calibrate", "--train", "2by128"]) == 2
    assert "--train" in capsys.readouterr().err
    assert main(["plan", "calibrate", "--batches", "4,32", "--fit-batches", "1,8,32"]) == 2
    assert "--fit-batches" in capsys.readouterr().err


def test_overheads_are_solved_from_two_decode_runs():
    """Measurements made from known kernel_us and seq_us give them back (the 2x2 solve), and a
    single run fits kernel_us alone."""
    from dataclasses import replace

    from dsv3.planner.hardware import PRESETS

    cfg = ModelConfig.from_preset("tiny")
    truth = replace(PRESETS["cpu"], kernel_us=37.0, seq_us=180.0)
    fits = {b: cal.predict_decode(cfg, truth, b, 16, 4) for b in (1, 8)}
    hw = cal.solve_overheads(cfg, replace(truth, kernel_us=0.0, seq_us=0.0), fits, 16, 4)
    assert hw.kernel_us == pytest.approx(37.0, rel=1e-6) and hw.seq_us == pytest.approx(180.0, rel=1e-6)
    one = cal.solve_overheads(cfg, truth, {1: fits[1]}, 16, 4)
    assert one.seq_us == 0.0 and cal.predict_decode(cfg, one, 1, 16, 4) == pytest.approx(fits[1], rel=1e-9)
    # the host term is B x seq_us on top of the same step
    base = cal.predict_decode(cfg, replace(truth, seq_us=0.0), 8, 16, 4)
    assert cal.predict_decode(cfg, truth, 8, 16, 4) - base == pytest.approx(8 * 180e-6, rel=1e-9)


def test_pipeline_prediction_uses_per_stage_costs():
    """The runtime's split puts the head, the loss and MTP on the last stage: its stage costs more
    than the first, the stages add up to the whole model, and equal stages simulate as Costs does."""
    from dsv3.parallel.pipeline.plan import Costs, simulate
    from dsv3.parallel.pipeline.schedule import build_schedule
    from dsv3.planner import cost
    from dsv3.planner.hardware import PRESETS
    from dsv3.planner.train import StageCosts, model_costs, stage_costs

    cfg, hw = ModelConfig.from_preset("small"), PRESETS["cpu"]
    pairs = cost.causal_pairs(64)
    sc = stage_costs(cfg, hw, 2, 64, pairs, False, recompute=False)
    (f0, b0, w0), (f1, b1, w1) = sc.per_stage
    assert f1 > 1.5 * f0 and b1 > 1.5 * b0
    f, b, w, _ = model_costs(cfg, hw, 64, pairs, False, recompute=False)
    assert (f0 + f1, b0 + b1, w0 + w1) == pytest.approx((f, b, w), rel=1e-9)
    sched = build_schedule("1f1b", 2, 4)
    even = StageCosts(1.0, 2.0, 1.0, per_stage=((1.0, 2.0, 1.0),) * 2)
    assert simulate(sched, even, 0.1).makespan == pytest.approx(
        simulate(sched, Costs(1.0, 2.0, 1.0), 0.1).makespan
    )
    # 1F1B on 2 stages is bound by the heavy stage: its 4 F + 4 B, after stage 0's first forward
    assert simulate(sched, sc).makespan >= 4 * (f1 + b1) + f0
    assert cal.predict_pipeline(cfg, hw, 64) > simulate(sched, Costs(f / 2, b / 2, w / 2)).makespan


def test_ep_balance_of_the_runs_routing():
    cfg = ModelConfig.from_preset("tiny")
    assert cal.measure_ep_balance(cfg, 1, 16, ep=1) == pytest.approx(1.0)
    bal = cal.measure_ep_balance(cfg, 1, 16, ep=2)
    assert 1.0 <= bal <= 2.0
    one, _ = cal.predict_train(cfg, cal.PRESETS["cpu"], 1, 16, ep=2)
    heavy, _ = cal.predict_train(cfg, cal.PRESETS["cpu"], 1, 16, ep=2, balance=1.5)
    assert heavy > one


def test_block_us_is_solved_from_one_training_run_and_costs_every_pass():
    """A training step measured with a known block_us gives it back; the term is blocks x block_us
    in the forward and twice that in the backward (as the element-wise passes), whatever the batch."""
    from dataclasses import replace

    from dsv3.planner.hardware import PRESETS

    cfg = ModelConfig.from_preset("tiny")
    truth = replace(PRESETS["cpu"], block_us=6.0)
    measured = sum(cal.predict_train(cfg, truth, 1, 32))
    assert cal.solve_block_us(cfg, PRESETS["cpu"], 1, 32, measured).block_us == pytest.approx(6.0, rel=1e-9)
    extra = measured - sum(cal.predict_train(cfg, replace(truth, block_us=0.0), 1, 32))
    blocks = cfg.n_layers + cfg.n_mtp_layers
    assert extra == pytest.approx(3 * blocks * 6e-6, rel=1e-9)  # forward 1x + backward 2x
    two = sum(cal.predict_train(cfg, truth, 2, 32)) - sum(
        cal.predict_train(cfg, replace(truth, block_us=0.0), 2, 32)
    )
    assert two == pytest.approx(extra, rel=1e-9)  # not per token
    assert cal.fit_train_shape(2, 128) == (1, 128) and cal.fit_train_shape(1, 16) == (1, 8)


def test_rounds_take_every_run_in_turn_and_keep_its_fastest():
    order: list[str] = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 6.0, 4.0])}

    def run(name: str) -> float:
        order.append(name)
        return next(times[name])

    best = cal.measure_rounds({"a": lambda: run("a"), "b": lambda: run("b")}, rounds=3)
    assert order == ["a", "b", "a", "b", "a", "b"]  # interleaved, not all of "a" first
    assert best == {"a": 1.0, "b": 4.0}
    assert cal.measure_rounds({"a": lambda: 2.0}, rounds=0) == {"a": 2.0}  # at least one round


def test_three_decode_runs_solve_the_expert_group_term_too():
    """Measurements made from known kernel_us, seq_us and group_us give all three back; an overhead
    the measurements make negative is 0 and the others are solved without it."""
    from dataclasses import replace

    from dsv3.planner.hardware import PRESETS

    cfg = ModelConfig.from_preset("small")
    truth = replace(PRESETS["cpu"], kernel_us=20.0, seq_us=150.0, group_us=90.0)
    fits = {b: cal.predict_decode(cfg, truth, b, 64, 4) for b in (1, 8, 32)}
    hw = cal.solve_overheads(cfg, truth, fits, 64, 4)
    assert (hw.kernel_us, hw.seq_us, hw.group_us) == pytest.approx((20.0, 150.0, 90.0), rel=1e-6)
    # the group term grows with the experts a step touches, so it is not a per-kernel constant
    none = replace(truth, group_us=0.0)
    small = cal.predict_decode(cfg, truth, 1, 64, 4) - cal.predict_decode(cfg, none, 1, 64, 4)
    large = cal.predict_decode(cfg, truth, 32, 64, 4) - cal.predict_decode(cfg, none, 32, 64, 4)
    assert large > 2 * small > 0
    # steps that shrink with the batch cannot be explained by non-negative overheads: clipped
    odd = cal.solve_overheads(cfg, truth, {1: fits[32], 8: fits[8], 32: fits[1]}, 64, 4)
    assert min(odd.kernel_us, odd.seq_us, odd.group_us) == 0.0
    assert all(v >= 0 for v in (odd.kernel_us, odd.seq_us, odd.group_us))


def test_loaded_profile_computes_slower_and_keeps_the_network():
    from dsv3.planner.hardware import PRESETS

    cfg, hw = ModelConfig.from_preset("tiny"), PRESETS["cpu"]
    slow = cal.loaded(hw, 1.25)
    assert slow.bf16_tflops == pytest.approx(hw.bf16_tflops / 1.25) and slow.kernel_us == hw.kernel_us * 1.25
    assert (slow.ib_gbps, slow.net_latency_us) == (hw.ib_gbps, hw.net_latency_us)
    one, comm = cal.predict_train(cfg, hw, 1, 32, ep=2)
    one_slow, comm_slow = cal.predict_train(cfg, slow, 1, 32, ep=2)
    assert one_slow > one and comm_slow == pytest.approx(comm)
    assert cal.loaded(hw, 1.0) == hw


def test_model_gemm_rate_is_measured_on_the_models_shapes():
    """With a clock that makes every product take one tick, the rate is the shapes' FLOPs per
    product: twice the tokens, twice the FLOPs of every product (the experts' rows rounded)."""
    cfg = ModelConfig.from_preset("tiny")

    def rate(tokens: int) -> float:
        ticks = iter(range(10**6))
        return cal.measure_model_gemms(cfg, tokens, repeats=1, clock=lambda: float(next(ticks)))

    assert rate(64) / rate(32) == pytest.approx(2.0, rel=0.05)
    # the attention projections alone are 2 x tokens x dim x (their outputs) per product: far above 0
    assert rate(32) > 2 * 32 * cfg.dim
