"""The trainer: schedules, resumption equal to an uninterrupted run, crash-safe checkpoints."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv3 import ConfigError, bf16
from dsv3.data.dataset import DataConfig, prepare_data
from dsv3.train import TrainConfig, Trainer, TrainingDiverged
from dsv3.train import schedules as S
from dsv3.train.state import (
    TrainCheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)

WORDS = "the model routes every token to experts while the cache keeps latent keys and values".split()


def _write_corpus(root: Path) -> Path:
    data = root / "corpus"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for d in range(40):
        n = 60 + d * 3
        idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        (data / f"doc{d:02d}.txt").write_text(" ".join(WORDS[i] for i in idx) + ".\n")
    return data


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = _write_corpus(root)
    cfg = DataConfig(
        data=str(data), vocab_size=300, val_fraction=0.1, cache=str(root / "cache"), progress=False
    )
    return str(data), str(root / "cache"), prepare_data(cfg)


def _cfg(out, data, **kw) -> TrainConfig:
    base = dict(
        preset="tiny", steps=20, out=str(out), data=data, seq_len=32, micro_batch=2, batch_start=2,
        batch_end=4,
        batch_ramp=0.5, lr=3e-3, warmup_steps=3, eval_every=10, eval_batches=2, ckpt_every=10, keep_last=3,
        precision="fp32", tensorboard=False, val_fraction=0.1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _losses(out) -> list[float]:
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


# ---- schedules ----------------------------------------------------------------------------------
def test_learning_rate_schedule_shape():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup_steps=10, lr_constant_until=0.6, lr_decay_until=0.9,
                      lr_tail_from=0.95, final_lr_ratio=0.1, tail_lr_ratio=0.03)  # fmt: skip
    lr = [S.learning_rate(cfg, s) for s in range(1000)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)  # linear warm-up
    assert all(x == pytest.approx(1e-3) for x in lr[10:600])  # constant
    assert lr[750] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # cosine midpoint
    assert all(a >= b for a, b in zip(lr[600:900], lr[601:900]))  # monotone decay
    assert all(x == pytest.approx(1e-4) for x in lr[900:950]) and lr[999] == pytest.approx(3e-5)


def test_paper_schedule_fractions():
    cfg = TrainConfig(steps=14800, lr=2.2e-4)  # one step per billion tokens of V3's 14.8T
    assert S.learning_rate(cfg, 9_999) == pytest.approx(2.2e-4)  # constant until 10T
    assert S.learning_rate(cfg, 14_310) == pytest.approx(2.2e-5)  # 2.2e-5 after the decay to 14.3T
    assert S.learning_rate(cfg, 14_700) == pytest.approx(7.3e-6)  # the last 167B tokens
    assert S.bias_update_speed(cfg, 14_299) == 0.001 and S.bias_update_speed(cfg, 14_301) == 0.0
    assert S.mtp_weight(cfg, 9_999) == 0.3 and S.mtp_weight(cfg, 10_001) == 0.1
    assert S.global_batch(cfg.replace(batch_start=3072, batch_end=15360, micro_batch=1024), 0) == 3072
    assert S.global_batch(cfg.replace(batch_start=3072, batch_end=15360, micro_batch=1024), 470) == 15360


def test_batch_ramp_rounds_to_micro_batch_times_ranks():
    cfg = TrainConfig(steps=100, micro_batch=4, batch_start=8, batch_end=32, batch_ramp=0.5)
    sizes = [S.global_batch(cfg, s, ranks=2) for s in range(100)]
    assert sizes[0] == 8 and sizes[50] == 32 and sizes[99] == 32
    assert all(b % 8 == 0 for b in sizes) and sizes == sorted(sizes)


def test_bad_config_values_name_the_field():
    for kw, field in [({"steps": 0}, "steps"), ({"precision": "fp16"}, "precision"), ({"lr": -1.0}, "lr"),
                      ({"batch_start": 6, "micro_batch": 4}, "batch_start"), ({"fim_rate": 1.5}, "fim_rate"),
                      ({"betas": (0.9, 1.2)}, "betas"),
                      ({"lr_constant_until": 0.99}, "lr_decay_until")]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^{field}:"):
            TrainConfig(**kw)
    with pytest.raises(ConfigError, match="^nope: unknown"):
        TrainConfig.build({}, ["nope=1"])
    cfg = TrainConfig.build({"steps": 5}, ["lr=0.01", "model.n_layers=2", "out=runs/x"])
    assert cfg.lr == 0.01 and cfg.model == {"n_layers": 2} and cfg.out == "runs/x"


# ---- the loop -----------------------------------------------------------------------------------
def test_training_reduces_loss_and_moves_biases(tmp_path, small_data):
    data, cache, ds = small_data
    trainer = Trainer(_cfg(tmp_path / "run", data, steps=30, gamma=0.01), dataset=ds, show_progress=False)
    bias0 = [m.gate.e_score_correction_bias.clone() for m in trainer.model.moe_layers()]
    result = trainer.fit()
    losses = _losses(tmp_path / "run")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert all(
        not torch.equal(a, m.gate.e_score_correction_bias) for a, m in zip(bias0, trainer.model.moe_layers())
    )
    assert result["val_loss"] < math.log(ds.tokenizer.vocab_size)
    assert {"val_loss", "bits_per_byte", "maxvio_global"} <= result.keys()
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "maxvio_batch"} <= rec[
        -2
    ].keys()


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, small_data):
    data, cache, ds = small_data
    full = Trainer(_cfg(tmp_path / "full", data), dataset=ds, show_progress=False)
    full.fit()
    first = Trainer(_cfg(tmp_path / "split", data, steps=20), dataset=ds, show_progress=False)
    first.cfg = first.cfg.replace(steps=20)
    # stop after step 10 (the checkpoint), as a killed run would
    while first.step < 10:
        first.train_step()
    first.save()
    resumed = Trainer(_cfg(tmp_path / "split", data), dataset=ds, resume=True, show_progress=False)
    assert resumed.step == 10
    resumed.fit()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert len(a) == 20 and len(b) == 10
    assert a[10:] == b  # bit-identical: same data, same state, same RNG


def test_non_finite_steps_are_skipped_then_stop(tmp_path, small_data):
    data, cache, ds = small_data
    trainer = Trainer(_cfg(tmp_path / "nan", data, max_bad_steps=3), dataset=ds, show_progress=False)
    trainer.train_step()
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("nan")
    good["lm_head.weight"][0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite steps"):
        trainer.fit()
    assert trainer.skipped_total == 3
    for k, v in trainer.model.state_dict().items():  # no update was applied
        if v.is_floating_point():
            assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(good[k])), k
    assert latest_valid_checkpoint(tmp_path / "nan" / "checkpoints") is not None


def test_truncated_checkpoint_is_reported_and_previous_used(tmp_path, small_data):
    data, cache, ds = small_data
    Trainer(_cfg(tmp_path / "t", data), dataset=ds, show_progress=False).fit()
    ckpts = list_checkpoints(tmp_path / "t" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000010", "step_00000020"]
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TrainCheckpointError, match=r"model.safetensors: truncated or altered \(1000 bytes"):
        verify_checkpoint(ckpts[-1])
    with pytest.warns(UserWarning, match="truncated"):
        assert latest_valid_checkpoint(tmp_path / "t" / "checkpoints") == ckpts[0]


def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path, small_data):
    data, cache, ds = small_data
    out = tmp_path / "kill"
    Trainer(_cfg(out, data, steps=10), dataset=ds, show_progress=False).fit()  # step_10 exists
    marker = tmp_path / "writing"
    env = dict(os.environ, DSV3_TEST_CKPT_PAUSE="60", DSV3_TEST_CKPT_MARKER=str(marker), DSV3_CACHE=cache)
    cmd = [sys.executable, "-m", "dsv3.train", "--resume", "--quiet", "--threads", "1", "--preset", "tiny", "--steps", "20",
           "--out", str(out), "--data", data, "seq_len=32", "micro_batch=2", "batch_start=2", "batch_end=4",
           "batch_ramp=0.5", "lr=0.003", "warmup_steps=3", "eval_every=10", "eval_batches=2", "ckpt_every=10",
           "precision=fp32", "tensorboard=false", "val_fraction=0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the writer never reached the checkpoint"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # mid-write: files of step 20 exist only in the temporary dir
    proc.wait(timeout=30)
    root = out / "checkpoints"
    assert any(p.name.endswith(".tmp") for p in root.iterdir())
    assert latest_valid_checkpoint(root).name == "step_00000010"
    resumed = Trainer(_cfg(out, data), dataset=ds, resume=True, show_progress=False)
    assert resumed.step == 10


def test_recompute_gives_the_same_loss_and_gradients(tiny):
    from dsv3 import Transformer
    from dsv3.train.loop import apply_recompute

    torch.manual_seed(0)
    plain = Transformer(tiny).train()
    again = Transformer(tiny).train()
    again.load_state_dict(plain.state_dict())
    apply_recompute(again)
    ids = torch.randint(0, tiny.vocab_size, (2, 17))
    a, b = plain.loss(ids), again.loss(ids)
    a.total.backward()
    b.total.backward()
    assert torch.equal(a.total, b.total)
    for (n, p), q in zip(plain.named_parameters(), again.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_low_precision_training_runs(tmp_path, small_data, precision):
    data, cache, ds = small_data
    steps = 6
    cfg = _cfg(
        tmp_path / precision, data, steps=steps, eval_every=steps, ckpt_every=steps, precision=precision
    )
    trainer = Trainer(cfg, dataset=ds, show_progress=False)
    assert trainer.precision == precision
    trainer.fit()
    losses = _losses(tmp_path / precision)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    if precision == "bf16":
        assert trainer.model.lm_head.weight.dtype == torch.bfloat16
        assert isinstance(trainer.model.lm_head, bf16.Bf16Linear) == bf16.needed()  # FP32 kernels here
        state = next(iter(trainer.optimizer.state.values()))
        assert state["master"].dtype == torch.float32 and state["exp_avg"].dtype == torch.bfloat16
    else:
        from dsv3.fp8 import Fp8Linear

        assert isinstance(trainer.model.layers[0].self_attn.o_proj, Fp8Linear)


def test_eval_and_plot_commands(tmp_path, small_data, capsys):
    from dsv3.cli import main

    data, cache, ds = small_data
    out = tmp_path / "cli"
    Trainer(_cfg(out, data, steps=10), dataset=ds, show_progress=False).fit()
    os.environ["DSV3_CACHE"] = cache
    capsys.readouterr()  # drop what training printed
    assert main(["eval", "--ckpt", str(out / "checkpoints" / "step_00000010"), "--batches", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{") :])
    assert result["val_loss"] == pytest.approx(_eval_loss(out), rel=1e-6)
    assert main(["plot", str(out)]) == 0
    pngs = {Path(p).name for p in capsys.readouterr().out.split()}
    assert pngs == {"loss.png", "lr.png", "maxvio.png", "expert_load.png"}
    assert all((out / "plots" / p).stat().st_size > 10_000 for p in pngs)


def _eval_loss(out) -> float:
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"][-1]["val_loss"]


def test_oversubscription_warning_names_the_load_and_a_thread_count():
    from dsv3.train.cli import oversubscription_warning

    assert oversubscription_warning(threads=2, load=0.3, cpus=2) is None  # an idle machine
    assert oversubscription_warning(threads=1, load=5.0, cpus=2) is None  # one thread never spins
    msg = oversubscription_warning(threads=2, load=1.0, cpus=2)  # another busy process
    assert msg is not None and "load average 1.0 on 2 cores" in msg and "--threads 1" in msg


def test_read_log_ignores_a_torn_last_line_but_not_a_bad_middle_one(tmp_path):
    """kill -9 mid-write leaves a torn last record; `dsv3 plot` on such a run must still work."""
    from dsv3.train.log import read_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tr')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "tr\n{"kind": "train", "step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_log(tmp_path)
