"""ModelConfig <-> the Hugging Face `config.json` of the released DeepSeek-V3 checkpoints.

`to_hf` writes the official keys (and those other tools need: rope_interleave, topk_method, ...);
`from_hf` reads a dict, a `config.json` or a checkpoint directory, naming the file in its errors.
YaRN follows the official semantics: active only beyond the original context length, so a config
that asks for it within that length is refused rather than silently read another way. Unknown HF
keys that matter to other tools (quantization_config, dtype) are carried in `extra`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv3 import paper
from dsv3.config.fields import ConfigError

if TYPE_CHECKING:
    from dsv3.config.model import ModelConfig

_PASSTHROUGH_HF_KEYS = ("quantization_config", "torch_dtype", "dtype")
_REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size",
    "n_routed_experts", "num_experts_per_tok",
)  # fmt: skip


def to_hf(c: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict of the official DeepSeek-V3 release, with the keys other tools need."""
    hf: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.inter_dim,
        "moe_intermediate_size": c.moe_inter_dim,
        "num_hidden_layers": c.n_layers,
        "first_k_dense_replace": c.n_dense_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_heads,
        "q_lora_rank": c.q_lora_rank,
        "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_nope_head_dim,
        "qk_rope_head_dim": c.qk_rope_head_dim,
        "v_head_dim": c.v_head_dim,
        "n_routed_experts": c.n_routed_experts,
        "n_shared_experts": c.n_shared_experts,
        "num_experts_per_tok": c.n_activated_experts,
        "n_group": c.n_expert_groups,
        "topk_group": c.n_limited_groups,
        "routed_scaling_factor": c.route_scale,
        "scoring_func": c.score_func,
        "topk_method": "noaux_tc",
        "norm_topk_prob": c.score_func == "sigmoid",
        "num_nextn_predict_layers": c.n_mtp_layers,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "initializer_range": c.init_std,
        "max_position_embeddings": c.max_seq_len,
        "rope_theta": c.rope_theta,
        "rope_interleave": True,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
    }
    if c.yarn_active:
        hf["rope_scaling"] = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": c.rope_factor,
            "original_max_position_embeddings": c.original_seq_len,
            "beta_fast": c.beta_fast,
            "beta_slow": c.beta_slow,
            "mscale": c.mscale,
            "mscale_all_dim": c.mscale,
        }
    hf.update(c.extra)
    return hf


def from_hf(cls: type[ModelConfig], hf: dict[str, Any] | str | Path) -> ModelConfig:
    """Build from a Hugging Face config dict, a `config.json` path, or a checkpoint directory."""
    where = "config"  # named in errors: the file when there is one
    if not isinstance(hf, dict):
        path = Path(hf)
        if path.is_dir():
            path = path / "config.json"
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no config.json found") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a config.json (not UTF-8 text)") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: a directory, not a config.json") from None
        where = str(path)
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    hf = dict(hf)
    missing = [k for k in _REQUIRED_HF_KEYS if k not in hf]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{where}: missing {', '.join(missing[:3])}{more} (not a DeepSeek-V3 config?)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act: only 'silu' (SwiGLU) is supported, got {hf['hidden_act']!r}")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    kw: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_dense_layers=hf.get("first_k_dense_replace", 0),
        inter_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        n_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        moe_inter_dim=hf["moe_intermediate_size"],
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=hf["num_experts_per_tok"],
        n_expert_groups=hf.get("n_group") or 1,
        n_limited_groups=hf.get("topk_group") or 1,
        score_func=hf.get("scoring_func", "sigmoid"),
        route_scale=hf.get("routed_scaling_factor", 1.0),
        n_mtp_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        init_std=hf.get("initializer_range", paper.INIT_STD),
        bos_token_id=hf.get("bos_token_id", 0) if hf.get("bos_token_id") is not None else 0,
        eos_token_id=_first(hf.get("eos_token_id", 1)),
    )
    if rope_type == "yarn":
        mscale, mscale_all = rope.get("mscale", 1.0), rope.get("mscale_all_dim", rope.get("mscale", 1.0))
        if mscale != mscale_all:
            raise ConfigError(
                f"rope_scaling: mscale ({mscale}) != mscale_all_dim ({mscale_all}) is not supported; "
                "the official DeepSeek configs set both to the same value"
            )
        original = rope.get("original_max_position_embeddings", 4096)
        if kw["max_seq_len"] <= original:
            # HF applies YaRN whenever the type says so; the official code only beyond the original
            # length. Keep the official semantics and say so instead of silently diverging.
            raise ConfigError(
                f"rope_scaling: yarn with max_position_embeddings ({kw['max_seq_len']}) <= "
                f"original_max_position_embeddings ({original}) would be inactive in DeepSeek-V3"
            )
        kw.update(
            original_seq_len=original,
            rope_factor=rope.get("factor", 40.0),
            beta_fast=rope.get("beta_fast", 32),
            beta_slow=rope.get("beta_slow", 1),
            mscale=mscale_all,
        )
    elif rope_type != "default":
        raise ConfigError(f"rope_scaling: type {rope_type!r} is not supported (use yarn or none)")
    else:
        kw["original_seq_len"] = kw["max_seq_len"]
    if hf.get("hidden_size") and hf.get("tie_word_embeddings"):
        raise ConfigError("tie_word_embeddings: DeepSeek-V3 has a separate output head; got true")
    kw["extra"] = {k: v for k, v in hf.items() if k in _PASSTHROUGH_HF_KEYS}
    return cls(**kw)


def _first(x: Any) -> int:
    return x[0] if isinstance(x, list) else x
