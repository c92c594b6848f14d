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
    for name in ("tiny", "small", "v3-mini", "16b", "671b"):
        ModelConfig.from_preset(name)
    assert 13e6 < ModelConfig.from_preset("small").param_counts()["total"] < 15e6
    c16 = ModelConfig.from_preset("16b").param_counts()
    assert 15.5e9 < c16["total"] < 16e9  # DeepSeek-V2-Lite: 15.7B
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.from_preset("huge")


def test_q_lora_zero_means_none(tiny):
    assert tiny.replace(q_lora_rank=0).q_lora_rank is None


def test_v3_mini_has_the_attention_geometry_and_router_of_v3():
    mini, v3 = ModelConfig.from_preset("v3-mini"), ModelConfig.from_preset("671b")
    same = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "score_func")
    assert {k: getattr(mini, k) for k in same} == {k: getattr(v3, k) for k in same}
    assert mini.n_expert_groups > 1 and mini.n_shared_experts == 1 and mini.route_scale == v3.route_scale
    assert mini.param_counts()["total"] < 60e6  # decodes on a CPU at interactive speed


@pytest.mark.parametrize("name", ["tiny", "small", "v3-mini", "16b", "671b"])
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


# ---- key=value overrides: parsed by the field's type (TrainConfig.build) -------------------------
OVERRIDES = [
    ("recompute=False", "recompute", False),
    ("recompute=yes", "recompute", True),
    ("tensorboard=off", "tensorboard", False),
    ("tensorboard=0", "tensorboard", False),
    ("tensorboard=ON", "tensorboard", True),
    ("data=None", "data", None),
    ("data=123", "data", "123"),  # a str field keeps the text
    ("warmup_steps=null", "warmup_steps", None),
    ("warmup_steps=7", "warmup_steps", 7),
    ("steps=1e3", "steps", 1000),
    ("lr=3e-3", "lr", 3e-3),
    ("betas=0.8,0.9", "betas", (0.8, 0.9)),
    ("betas=[0.8, 0.9]", "betas", (0.8, 0.9)),
]


@pytest.mark.parametrize("item,field,value", OVERRIDES, ids=[o for o, _, _ in OVERRIDES])
def test_overrides_are_parsed_by_the_field_type(item, field, value):
    from dsv3.train.config import TrainConfig

    assert getattr(TrainConfig.build({}, [item]), field) == value


def test_model_and_parallel_overrides_are_typed():
    from dsv3.train.config import TrainConfig

    cfg = TrainConfig.build({}, ["preset=tiny", "model.q_lora_rank=None", "model.rope_theta=5e4",
                                 "parallel.zero=false", "parallel.dp=none", "parallel.ep=2"])  # fmt: skip
    assert cfg.model == {"q_lora_rank": None, "rope_theta": 50000.0}
    assert cfg.parallel == {"zero": False, "dp": None, "ep": 2}


BAD_OVERRIDES = [
    ("recompute=maybe", "recompute: cannot parse 'maybe' as a boolean"),
    ("steps=1.5", "steps: cannot parse '1.5' as an integer"),
    ("lr=fast", "lr: cannot parse 'fast' as a number"),
    ("betas=0.9", "betas: cannot parse '0.9' as 2 comma-separated values"),
    ("model.foo=1", "model.foo: unknown model field"),
    ("model.n_layer=2", "model.n_layer: unknown model field; did you mean model.n_layers"),
    ("model.n_layers=zero", "model.n_layers: cannot parse 'zero' as an integer"),
    ("model.n_layers=0", "model.n_layers: must be a positive integer"),
    ("parallel.bogus=1", "parallel.bogus: unknown setting"),
    ("parallel.ep=two", "parallel.ep: cannot parse 'two'"),
    ("model=3", "model: cannot parse '3' as a mapping"),
    ("nope=1", "nope: unknown training field"),
    ("lr", "override 'lr': expected key=value"),
    ("seed=1180591620717411303424", "seed: must be an integer in"),
    ("preset=huge", "preset: unknown 'huge'"),
]


@pytest.mark.parametrize("item,message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_overrides_name_the_field_and_value(item, message):
    from dsv3.train.config import TrainConfig

    with pytest.raises(ConfigError) as e:
        TrainConfig.build({}, [item])
    assert str(e.value).startswith(message)


def test_config_file_values_are_type_checked():
    from dsv3.train.config import TrainConfig

    with pytest.raises(ConfigError, match="^recompute: expected a boolean"):
        TrainConfig.build({"recompute": "False"})  # a string from a JSON file is not a boolean
    with pytest.raises(ConfigError, match="^data: expected text or None"):
        TrainConfig.build({"data": 3})
    with pytest.raises(ConfigError, match="^model.foo: unknown model field"):
        TrainConfig.build({"model": {"foo": 1}})
    assert TrainConfig.build({"betas": [0.9, 0.95]}).betas == (0.9, 0.95)  # JSON lists become tuples


def test_seq_len_is_checked_against_the_model_max_seq_len():
    from dsv3.train.config import TrainConfig

    with pytest.raises(
        ConfigError, match=r"^seq_len: 512 exceeds model.max_seq_len \(256 for preset 'tiny'\)"
    ):
        TrainConfig(preset="tiny", seq_len=512)
    with pytest.raises(ConfigError, match="^seq_len: 100000 exceeds model.max_seq_len"):
        TrainConfig(seq_len=100000)
    assert TrainConfig(preset="tiny", seq_len=256).seq_len == 256  # exactly the model's length is fine
    cfg = TrainConfig(preset="tiny", seq_len=512, model={"max_seq_len": 512})
    assert cfg.model_config().max_seq_len == 512


def test_unknown_model_field_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="^foo: unknown model field"):
        tiny.replace(foo=1)
    with pytest.raises(ConfigError, match="^foo: unknown model field"):
        ModelConfig.from_preset("tiny", foo=1)


def test_from_hf_names_the_file_for_non_configs(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"\x80\x00\xff" * 10)
    with pytest.raises(ConfigError, match="weights.safetensors: not a config.json"):
        ModelConfig.from_hf(tmp_path / "weights.safetensors")
    (tmp_path / "config.json").write_text('{"vocab_size": 10}')
    with pytest.raises(ConfigError, match=r"config.json: missing hidden_size"):
        ModelConfig.from_hf(tmp_path)


def test_paths_from_python_are_kept_as_text(tmp_path):
    from dsv3.train.config import TrainConfig

    cfg = TrainConfig(out=tmp_path / "run", data=tmp_path / "corpus")
    assert cfg.out == str(tmp_path / "run") and cfg.data == str(tmp_path / "corpus")
