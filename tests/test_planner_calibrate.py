"""`dsv3 plan calibrate` on the tiny model with a short run: the profile it fits, the held-out runs
it reports (engine decode, one-process training, a 2-rank EP run and a 2-rank 1F1B pipeline)."""

from __future__ import annotations

import pytest

from dsv3 import ModelConfig
from dsv3.planner import calibrate as cal
from dsv3.planner.hardware import Hardware


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_calibrate_fits_a_profile_and_reports_held_out_runs(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    hw, rows = cal.calibrate(cfg, (3,), prompt=16, steps=2, train=(1, 16), repeats=1)
    assert [r.name for r in rows] == [
        "decode-1 (fit)",
        "decode-3",
        "train 1x16",
        "ep2 train 1x16",
        "pp2 1f1b 4x16",
    ]
    assert [r.held_out for r in rows] == [False, True, True, True, True]
    # kernel_us is solved so that the fit run's prediction equals its measurement
    assert rows[0].predicted == pytest.approx(rows[0].measured, rel=1e-6) or hw.kernel_us == 0.0
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
