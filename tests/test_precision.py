"""precision=auto: the matmul gate, then the timed forward + backward of the model itself."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dsv3 import ModelConfig
from dsv3.train import precision as P

TINY = ModelConfig.from_preset("tiny")


@pytest.fixture
def fast_bf16_matmul(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(P, "matmul_peak", lambda dtype, *a, **k: 4e11 if dtype == torch.bfloat16 else 1e11)


@pytest.mark.parametrize("fp32_s,bf16_s,pick", [(1.0, 2.0, "fp32"), (2.0, 1.0, "bf16"), (1.0, 1.0, "bf16")])
def test_auto_takes_the_precision_whose_step_is_faster(monkeypatch, fast_bf16_matmul, fp32_s, bf16_s, pick):
    seen = []

    def step_time(model, probe, precision, batch, seq_len):
        seen.append((precision, batch, seq_len))
        return {"fp32": fp32_s, "bf16": bf16_s}[precision]

    monkeypatch.setattr(P, "step_time", step_time)
    got, reason = P.pick_precision("auto", TINY, 8, 256)
    assert got == pick
    assert f"BF16 {bf16_s:.2f} s vs FP32 {fp32_s:.2f} s" in reason and "8 x 256 tokens" in reason
    assert sorted(set(seen)) == [("bf16", 8, 256), ("fp32", 8, 256)]  # both timed, alternated
    rounds = 1 if max(fp32_s, bf16_s) > 1.2 * min(fp32_s, bf16_s) else 2  # a close call: timed again
    assert [s[0] for s in seen] == ["fp32", "bf16"] * rounds


def test_auto_leaves_the_seeded_random_stream_alone(monkeypatch):
    """The matmul probe draws random matrices after the trainer seeded torch: a run's initial
    weights must not depend on whether `auto` measured."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(P, "step_time", lambda *a: 1.0)
    before = torch.random.get_rng_state()
    P.pick_precision("auto", TINY, 2, 32)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_auto_caps_the_probe_at_a_few_thousand_tokens(monkeypatch, fast_bf16_matmul):
    seen = []
    monkeypatch.setattr(
        P, "step_time", lambda m, p, precision, batch, seq_len: seen.append((batch, seq_len)) or 1.0
    )
    P.pick_precision("auto", TINY, 16, 1024)
    P.pick_precision("auto", TINY, 4, 8192)
    assert set(seen) == {(2, 1024), (1, 8192)}  # never below one sequence of the run's length


def test_auto_skips_the_step_where_bf16_matmul_is_slow_and_requested_values_pass(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(P, "matmul_peak", lambda dtype, *a, **k: 1e9 if dtype == torch.bfloat16 else 1e11)
    monkeypatch.setattr(P, "step_time", lambda *a: pytest.fail("no step is timed where BF16 matmul is slow"))
    got, reason = P.pick_precision("auto", TINY, 8, 256)
    assert got == "fp32" and "slow" in reason
    assert P.pick_precision("fp8", TINY, 8, 256) == ("fp8", "requested")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert P.pick_precision("auto", TINY, 8, 256) == ("bf16", "GPU")


def test_a_model_too_large_to_copy_keeps_the_matmul_choice(monkeypatch, fast_bf16_matmul):
    monkeypatch.setattr(P, "step_time", lambda *a: pytest.fail("the 671B probe copy would not fit"))
    got, reason = P.pick_precision("auto", ModelConfig(), 1, 4096)  # the full V3 geometry
    assert got == "bf16" and "too large" in reason
    wide = dataclasses.replace(TINY, dim=2048, inter_dim=8192, moe_inter_dim=2048)  # 288M: fits
    assert P.probe_config(wide).param_counts()["total_with_mtp"] < P.PROBE_MAX_PARAMS
    assert "too large" in P.pick_precision("auto", wide, 8, 1024)[1]  # but a pass is 1.7 TFLOP


def test_probe_config_keeps_one_layer_of_each_kind():
    for cfg in [TINY, ModelConfig(), dataclasses.replace(TINY, n_dense_layers=0)]:
        probe = P.probe_config(cfg)
        assert probe.n_dense_layers == min(cfg.n_dense_layers, 1)
        assert probe.n_moe_layers == min(cfg.n_moe_layers, 1)
        assert (probe.dim, probe.n_routed_experts, probe.n_mtp_layers) == (
            cfg.dim, cfg.n_routed_experts, cfg.n_mtp_layers
        )  # fmt: skip


def test_step_time_adds_each_further_layer_as_its_probe_blocks_time(monkeypatch):
    """Every timing counted as 1 s: the probe's loss pass, then one per further layer of a kind."""
    calls = []
    monkeypatch.setattr(P, "_timed", lambda fn: calls.append(fn) or 1.0)
    model = dataclasses.replace(TINY, n_layers=6, n_dense_layers=2)  # 1 more dense, 3 more MoE
    assert P.step_time(model, P.probe_config(model), "fp32", 1, 16) == 1 + 1 + 3
    assert len(calls) == 3  # the loss pass and one block of each kind


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_time_runs_the_model_forward_and_backward(precision):
    model = dataclasses.replace(TINY, n_layers=4)
    before = torch.random.get_rng_state()
    t = P.step_time(model, P.probe_config(model), precision, 2, 32)
    assert math.isfinite(t) and t > 0
    assert torch.equal(torch.random.get_rng_state(), before)  # the run's seeded stream is untouched
