"""Exact parity with Hugging Face transformers' DeepseekV3ForCausalLM (the numerical oracle).

Weights saved by either side load into the other, and fp32 logits agree to 1e-4, across config
variants: q_lora None/int, YaRN on/off, groups 4-keep-2 and 1-keep-1, 0 and 1 dense layers."""

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "base": {},
    "no_q_lora": {"q_lora_rank": None},
    "yarn": {"max_seq_len": 256, "original_seq_len": 32, "rope_factor": 8.0, "mscale": 0.8},
    "one_group": {"n_expert_groups": 1, "n_limited_groups": 1},
    "no_dense": {"n_dense_layers": 0},
}


def _hf_model(path):
    return transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    ).eval()


def _randomise_biases(model: Transformer) -> None:
    # non-zero routing biases so that bias-driven selection is part of the comparison
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.05)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dsv3_weights_in_transformers(tmp_path, variant):
    cfg = ModelConfig.from_preset("tiny", **VARIANTS[variant])
    model = Transformer(cfg).eval()
    _randomise_biases(model)
    save_pretrained(model, tmp_path)
    hf = _hf_model(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_weights_in_dsv3(tmp_path, variant):
    cfg = ModelConfig.from_preset("tiny", n_mtp_layers=0, **VARIANTS[variant])
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf())
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path).eval()
    assert model.config.yarn_active == cfg.yarn_active
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    hf = _hf_model(tmp_path)  # reload: the same path both sides read
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
