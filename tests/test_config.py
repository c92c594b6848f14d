"""ModelConfig: presets, validation errors naming the field, and the HF config.json round trip."""

import json

import pytest

from dsv3 import ConfigError, ModelConfig

BAD = [
    ({"n_routed_experts": 10, "n_expert_groups": 4}, "n_expert_groups"),  # experts not divisible by groups
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),  # odd rope dim
    ({"n_limited_groups": 5}, "n_limited_groups"),  # kept groups > groups
    ({"n_activated_experts": 5, "n_limited_groups": 2}, "n_activated_experts"),  # more than kept groups hold
    ({"n_activated_experts": 0}, "n_activated_experts"),
    ({"n_routed_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4}, "n_expert_groups"),  # 1 per group
    ({"n_dense_layers": 4}, "n_dense_layers"),
    ({"score_func": "relu"}, "score_func"),
    ({"dim": 0}, "dim"),
    ({"dim": 64.0}, "dim"),
    ({"n_heads": -1}, "n_heads"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"init_std": float("nan")}, "init_std"),
    ({"route_scale": -1.0}, "route_scale"),
    ({"rope_factor": 0.5}, "rope_factor"),
    ({"beta_fast": 1, "beta_slow": 1}, "beta_fast"),
    ({"q_lora_rank": -3}, "q_lora_rank"),
    ({"n_mtp_layers": -1}, "n_mtp_layers"),
    ({"eos_token_id": 512}, "eos_token_id"),
    (
        {"n_routed_experts": 1, "n_expert_groups": 1, "n_limited_groups": 1, "n_activated_experts": 1},
        "n_routed_experts",
    ),
]


@pytest.mark.parametrize("changes,field", BAD, ids=[f for _, f in BAD])
def test_bad_values_fail_naming_the_field(tiny, changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        tiny.replace(**changes)


def test_presets_are_valid_and_small_is_about_14m():
    for name in ("tiny", "small", "16b", "671b"):
        ModelConfig.from_preset(name)
    assert 13e6 < ModelConfig.from_preset("small").param_counts()["total"] < 15e6
    c16 = ModelConfig.from_preset("16b").param_counts()
    assert 15.5e9 < c16["total"] < 16e9  # DeepSeek-V2-Lite: 15.7B
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.from_preset("huge")


def test_q_lora_zero_means_none(tiny):
    assert tiny.replace(q_lora_rank=0).q_lora_rank is None


@pytest.mark.parametrize("name", ["tiny", "small", "16b", "671b"])
def test_hf_round_trip(name):
    cfg = ModelConfig.from_preset(name)
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_official_config_json_fields():
    hf = ModelConfig.from_preset("671b").to_hf()
    assert hf["num_nextn_predict_layers"] == 1 and hf["topk_method"] == "noaux_tc"
    assert hf["scoring_func"] == "sigmoid" and hf["n_group"] == 8 and hf["topk_group"] == 4
    assert hf["rope_scaling"]["factor"] == 40 and hf["rope_scaling"]["mscale_all_dim"] == 1.0
    assert ModelConfig.from_preset("671b").yarn_active


def test_from_hf_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    hf = ModelConfig.from_preset("tiny").to_hf()
    hf["rope_scaling"] = {
        "type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 64,
        "mscale": 1,
        "mscale_all_dim": 0.7,
    }
    hf["max_position_embeddings"] = 256
    with pytest.raises(ConfigError, match="mscale"):
        ModelConfig.from_hf(hf)
    hf = ModelConfig.from_preset("tiny").to_hf() | {"hidden_act": "gelu"}
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_hf(hf)
