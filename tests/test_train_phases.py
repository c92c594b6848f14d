"""Runs that start from another run (`dsv3 train --init CKPT`) and the context-extension phases:
weights and gate biases kept, optimizer and schedule fresh, the YaRN settings in the model exactly
as transformers computes them, the phase recorded in checkpoints and shown by `dsv3 info`."""

import json
import math
from pathlib import Path

import pytest
import torch

from dsv3 import ConfigError, paper
from dsv3.checkpoint import load_pretrained
from dsv3.model.rope import inv_frequencies, softmax_scale
from dsv3.train import TrainConfig, Trainer
from dsv3.train.cli import build_config, parse_train_args
from dsv3.train.phases import PAPER_PRETRAIN_STEPS, phase_values

WORDS = "the model routes every token to experts while the cache keeps latent keys and values".split()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny run pre-trained 4 steps at seq_len 16 (gamma on, so the gate biases moved)."""
    root = tmp_path_factory.mktemp("phases")
    data = root / "corpus"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for d in range(40):
        idx = torch.randint(0, len(WORDS), (80 + d * 3,), generator=g).tolist()
        (data / f"doc{d:02d}.txt").write_text(" ".join(WORDS[i] for i in idx) + ".\n")
    cfg = TrainConfig(
        preset="tiny", steps=4, out=str(root / "pre"), data=str(data), seq_len=16, micro_batch=2,
        batch_start=4, batch_end=4, lr=3e-3, warmup_steps=1, eval_every=4, eval_batches=1, ckpt_every=4,
        precision="fp32", tensorboard=False, val_fraction=0.1, gamma=0.01,
    )  # fmt: skip
    Trainer(cfg, show_progress=False).fit()
    return root, root / "pre" / "checkpoints" / "step_00000004"


def _phase_trainer(root: Path, ckpt: Path, *extra: str) -> Trainer:
    args = parse_train_args(
        ["--init", str(ckpt), "--phase", "ctx1", "--out", str(root / "ctx1"), "--quiet", *extra]
    )
    return Trainer(build_config(args), show_progress=False)


def test_init_keeps_weights_and_biases_and_resets_optimizer_and_schedule(pretrained):
    root, ckpt = pretrained
    trainer = _phase_trainer(root, ckpt, "steps=2")
    source = load_pretrained(ckpt)
    mine, theirs = trainer.model.state_dict(), source.state_dict()
    assert set(mine) == set(theirs)
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), name
    biases = [m.gate.e_score_correction_bias for m in trainer.model.moe_layers()]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # moved in pre-training, and kept
    assert trainer.step == 0 and trainer.tokens_seen == 0 and len(trainer.optimizer.state) == 0
    assert trainer.loader.state_dict() == type(trainer.loader)(trainer.data.train, 128, seed=0).state_dict()
    cfg = trainer.cfg
    assert cfg.seq_len == 8 * 16 and cfg.batch_end == 1 and cfg.gamma == 0.0 and cfg.phase == "ctx1"
    from dsv3.train import schedules

    phase_lr = 3e-3 * paper.TAIL_LR / paper.PEAK_LR
    assert [schedules.learning_rate(cfg, s) for s in (0, 1)] == pytest.approx([phase_lr] * 2)  # constant
    # the first step runs from the initial weights with a fresh optimizer at the phase lr
    result = trainer.train_step()
    assert math.isfinite(result.loss) and len(trainer.optimizer.state) > 0


def test_yarn_phase_settings_reach_the_model_as_transformers_computes_them(pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    root, ckpt = pretrained
    trainer = _phase_trainer(root, ckpt, "steps=1", "--force")
    model_cfg = trainer.model.config
    assert (model_cfg.original_seq_len, model_cfg.max_seq_len, model_cfg.rope_factor) == (16, 640, 40.0)
    assert (model_cfg.beta_fast, model_cfg.beta_slow, model_cfg.mscale) == (32, 1, 1.0)
    hf_cfg = transformers.DeepseekV3Config(**model_cfg.to_hf())
    inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    assert torch.allclose(trainer.model.rotary.inv_freq, inv_freq.float(), rtol=1e-6, atol=0)
    assert torch.allclose(trainer.model.rotary.inv_freq, inv_frequencies(model_cfg))
    trainer.fit()
    phase_ckpt = root / "ctx1" / "checkpoints" / "step_00000001"
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        phase_ckpt, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    ).eval()
    assert hf.model.layers[0].self_attn.scaling == pytest.approx(softmax_scale(model_cfg), rel=1e-6)
    ours = load_pretrained(phase_ckpt).eval()
    ids = torch.randint(0, model_cfg.vocab_size, (1, 100))  # well past the pre-training length of 16
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_checkpoints_record_the_phase_and_info_shows_the_context(pretrained, capsys):
    from dsv3.cli import main

    root, ckpt = pretrained
    phase_ckpt = root / "ctx1" / "checkpoints" / "step_00000001"
    if not phase_ckpt.exists():
        _phase_trainer(root, ckpt, "steps=1", "--force").fit()
    saved = json.loads((phase_ckpt / "trainer.json").read_text())["config"]
    assert saved["phase"] == "ctx1" and saved["init"] == str(ckpt) and saved["steps"] == 1
    assert main(["info", "--ckpt", str(phase_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "context: 640 positions (YaRN x40 from 16" in out and "trained at seq_len 128, phase ctx1" in out
    assert main(["info", "--ckpt", str(ckpt)]) == 0
    assert "context: 256 positions (plain RoPE, no YaRN); trained at seq_len 16, phase pre-training" in (
        capsys.readouterr().out
    )


def test_phase_defaults_scale_the_paper_recipe(pretrained):
    root, ckpt = pretrained
    cfg = build_config(parse_train_args(["--init", str(ckpt), "--phase", "ctx2", "--out", str(root / "x")]))
    assert (
        cfg.seq_len == 32 * 16 and cfg.model["max_seq_len"] == 40 * 16 and cfg.model["original_seq_len"] == 16
    )
    assert cfg.steps == max(20, round(4 * 1000 / PAPER_PRETRAIN_STEPS)) and cfg.warmup == 0
    assert cfg.mtp_lambda == paper.MTP_LAMBDA_LATE
    cfg = build_config(parse_train_args(["--init", str(ckpt), "--phase", "ctx1", "seq_len=64", "--out", "y"]))
    assert cfg.seq_len == 64  # an override wins over the recipe
    # ctx2 from a ctx1 run: the same lr and steps as ctx1 (the paper's 7.3e-6 and 1,000 in both phases)
    first = phase_values("ctx1", {"lr": 2.2e-3, "seq_len": 16, "batch_end": 8}, 50_000)
    second = phase_values("ctx2", {**first, "phase": "ctx1"}, first["steps"])
    assert first["lr"] == pytest.approx(2.2e-3 * paper.TAIL_LR / paper.PEAK_LR) and first["steps"] == 213
    assert second["lr"] == first["lr"] and second["steps"] == first["steps"] and second["seq_len"] == 32 * 16


def test_init_errors_are_one_line(pretrained, tmp_path):
    root, ckpt = pretrained
    with pytest.raises(ConfigError, match="--phase ctx1: needs --init"):
        build_config(parse_train_args(["--phase", "ctx1"]))
    with pytest.raises(ConfigError, match="no config.json"):
        build_config(parse_train_args(["--init", str(tmp_path)]))
    args = parse_train_args(["--init", str(ckpt), "--out", str(tmp_path / "o"), "model.n_layers=2"])
    with pytest.raises(ConfigError, match="--init .*: the model differs"):
        Trainer(build_config(args), show_progress=False)


def test_a_phase_from_an_sft_checkpoint_takes_the_pre_training_run_behind_it(pretrained, tmp_path):
    """`dsv3 sft` on passkey rows, then `--phase ctx1` from its checkpoint: the recipe is the one the
    pre-trained run gets (its data, shape, lr), not the SFT file and the SFT lr."""
    from dsv3.data.tokenizer import Tokenizer
    from dsv3.evals.long_context import passkey_training_rows
    from dsv3.train.phases import init_values
    from dsv3.train.sft import SFTConfig, run_sft

    root, ckpt = pretrained
    tok = Tokenizer.load(ckpt)
    filler = " ".join(WORDS * 40)
    rows = passkey_training_rows(tok, 12, 100, 120, filler=filler)
    data = tmp_path / "pk.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_sft(SFTConfig(init=str(ckpt), data=str(data), out=str(tmp_path / "sft"), lr=1e-3, batch=4,
                            max_steps=1, progress=False), log=lambda *_: None)  # fmt: skip
    from_sft, from_pre = init_values(out["checkpoint"], "ctx1"), init_values(ckpt, "ctx1")
    differ = {k for k in set(from_sft) | set(from_pre) if from_sft.get(k) != from_pre.get(k)}
    assert differ <= {"init", "tokenizer", "precision"}, differ  # precision: "auto" again, SFT ran FP32
    assert from_sft["data"] == from_pre["data"] != str(data)
    assert from_sft["lr"] == pytest.approx(
        3e-3 * paper.TAIL_LR / paper.PEAK_LR
    )  # the pre-training's lr, scaled


def test_a_phase_mixes_extra_documents_into_training_only(pretrained, tmp_path):
    """`--data-extra FILE` (e.g. `dsv3 synth --passkey --text` rows): the corpus keeps its validation
    split and the init's tokenizer; the file's documents are added to training."""
    root, ckpt = pretrained
    extra = tmp_path / "pk.jsonl"
    extra.write_text(
        "".join(json.dumps({"text": f"the model keeps key {i} in the cache."}) + "\n" for i in range(9))
    )
    plain = _phase_trainer(root, ckpt, "steps=1")
    mixed = _phase_trainer(root, ckpt, "steps=1", "--data-extra", str(extra))
    assert mixed.cfg.data_extra == str(extra) and plain.cfg.data_extra is None
    assert mixed.cfg.data == plain.cfg.data  # the pre-training's corpus, plus the extra rows
    assert mixed.data.train.n_docs == plain.data.train.n_docs + 9
    assert torch.equal(torch.from_numpy(mixed.data.val.tokens[:].astype("int64")),
                       torch.from_numpy(plain.data.val.tokens[:].astype("int64")))  # fmt: skip
    tok = mixed.data.tokenizer
    last = mixed.data.train.doc(mixed.data.train.n_docs - 1).tolist()
    assert tok.decode(last[1:-1]) == "the model keeps key 8 in the cache."
