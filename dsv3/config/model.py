"""ModelConfig: every architectural field of DeepSeek-V3 in one validated dataclass.

Field names follow the official `inference/model.py` `ModelArgs`; `from_hf` / `to_hf` translate to and
from the Hugging Face `config.json` of the released checkpoints (dsv3.config.hf). Presets are plain
Python in dsv3.config.presets. A bad value fails at construction with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3 import paper
from dsv3.config import hf as hf_json
from dsv3.config.fields import ConfigError, check_known_fields


@dataclass(frozen=True)
class ModelConfig:
    # vocabulary and trunk
    vocab_size: int = 129280
    dim: int = 7168
    n_layers: int = 61
    n_dense_layers: int = 3  # the first layers use a dense SwiGLU FFN instead of MoE
    inter_dim: int = 18432  # dense FFN hidden size
    norm_eps: float = 1e-6
    # multi-head latent attention (§2.1.1)
    n_heads: int = 128
    q_lora_rank: int | None = 1536  # None (or 0 in HF configs): plain W_Q, no query compression
    kv_lora_rank: int = 512  # c_kv width: with the rope key, the whole KV cache of a token and layer
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # one decoupled rotary key shared by all heads
    v_head_dim: int = 128
    # DeepSeekMoE (§2.1.2)
    moe_inter_dim: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8  # groups = nodes in training: node-limited routing
    n_limited_groups: int = 4  # kept groups per token (M = 4 nodes)
    score_func: str = "sigmoid"  # V3: sigmoid, normalised over the top-k; V2: softmax, not normalised
    route_scale: float = 2.5
    # multi-token prediction (§2.2)
    n_mtp_layers: int = 1
    # RoPE and YaRN (§4.3); YaRN is active iff max_seq_len > original_seq_len, as in the official code
    max_seq_len: int = 163840
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # initialisation and special tokens
    init_std: float = paper.INIT_STD  # §4.2; small presets use a larger value suited to their width
    bos_token_id: int = 0
    eos_token_id: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # unknown HF keys

    def __post_init__(self) -> None:
        if self.q_lora_rank == 0:
            object.__setattr__(self, "q_lora_rank", None)
        _validate(self)

    # ---- derived sizes ----------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def yarn_active(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token and layer by MLA: the latent c_kv plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        check_known_fields(ModelConfig, changes, "model field")
        return dataclasses.replace(self, **changes)

    # ---- parameter counts -------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameters per component, computed from the shapes (no model needed, works for 671b).

        Keys: embedding, head, attention, dense_mlp, routed_experts, shared_experts, gates, norms,
        mtp, total (main model, without MTP), activated (per token, main model), total_with_mtp,
        mtp_in_checkpoint (MTP with the embedding/head copies the official checkpoint stores).
        """
        d = self.dim
        if self.q_lora_rank is None:
            q = d * self.n_heads * self.qk_head_dim
        else:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.n_heads * self.qk_head_dim
        kv = d * self.kv_cache_dim + self.kv_lora_rank
        kv += self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + self.n_heads * self.v_head_dim * d
        expert = 3 * d * self.moe_inter_dim
        dense_mlp = 3 * d * self.inter_dim
        gate = self.n_routed_experts * d  # the bias is a buffer, not a parameter
        moe_routed = self.n_routed_experts * expert
        moe_shared = self.n_shared_experts * expert
        layer_norms = 2 * d
        c = {
            "embedding": self.vocab_size * d,
            "head": self.vocab_size * d,
            "attention": self.n_layers * attn,
            "dense_mlp": self.n_dense_layers * dense_mlp,
            "routed_experts": self.n_moe_layers * moe_routed,
            "shared_experts": self.n_moe_layers * moe_shared,
            "gates": self.n_moe_layers * gate,
            "norms": self.n_layers * layer_norms + d,
        }
        c["total"] = sum(c.values())
        # activated per token: everything except the routed experts a token does not visit
        c["activated"] = (
            c["total"] - self.n_moe_layers * (self.n_routed_experts - self.n_activated_experts) * expert
        )
        # one MTP module: enorm, hnorm, eh_proj, a MoE block, shared_head.norm (embedding/head shared)
        mtp_block = attn + layer_norms + moe_routed + moe_shared + gate
        c["mtp"] = self.n_mtp_layers * (2 * d + 2 * d * d + mtp_block + d)
        c["total_with_mtp"] = c["total"] + c["mtp"]
        # the release stores a copy of the embedding and the head inside each MTP layer (685B in all)
        c["mtp_in_checkpoint"] = c["mtp"] + self.n_mtp_layers * (c["embedding"] + c["head"])
        return c

    # ---- Hugging Face config.json (dsv3.config.hf) --------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict of the official DeepSeek-V3 release, with the keys other tools need."""
        return hf_json.to_hf(self)

    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path) -> ModelConfig:
        """Build from a Hugging Face config dict, a `config.json` path, or a checkpoint directory."""
        return hf_json.from_hf(cls, hf)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        from dsv3.config.presets import PRESETS  # the presets are ModelConfigs: imported when used

        try:
            base = PRESETS[name]
        except KeyError:
            raise ConfigError(f"preset: unknown {name!r}; choose one of {sorted(PRESETS)}") from None
        return base.replace(**overrides) if overrides else base

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


def _validate(c: ModelConfig) -> None:
    def fail(name: str, msg: str) -> None:
        raise ConfigError(f"{name}: {msg} (got {getattr(c, name)!r})")

    for name in (
        "vocab_size", "dim", "n_layers", "inter_dim", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "moe_inter_dim", "n_expert_groups", "n_limited_groups",
        "max_seq_len", "original_seq_len",
    ):  # fmt: skip
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            fail(name, "must be a positive integer")
    for name in (
        "n_dense_layers",
        "n_routed_experts",
        "n_shared_experts",
        "n_mtp_layers",
        "n_activated_experts",
    ):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            fail(name, "must be a non-negative integer")
    if c.q_lora_rank is not None and (not isinstance(c.q_lora_rank, int) or c.q_lora_rank < 0):
        fail("q_lora_rank", "must be a positive integer, or None/0 for no query compression")
    for name in ("norm_eps", "init_std", "route_scale", "rope_theta"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            fail(name, "must be a positive finite number")
    if c.rope_factor < 1:
        fail("rope_factor", "must be >= 1")
    if c.beta_fast <= c.beta_slow:
        fail("beta_fast", f"must be greater than beta_slow ({c.beta_slow})")
    if c.qk_rope_head_dim % 2:
        fail("qk_rope_head_dim", "must be even: RoPE rotates pairs of dimensions")
    if c.n_dense_layers > c.n_layers:
        fail("n_dense_layers", f"cannot exceed n_layers ({c.n_layers})")
    if c.score_func not in ("sigmoid", "softmax"):
        fail("score_func", "must be 'sigmoid' (V3) or 'softmax' (V2)")
    if c.n_moe_layers > 0 or c.n_mtp_layers > 0:
        if c.n_routed_experts < 2:
            fail("n_routed_experts", "must be >= 2 when the model has MoE layers")
        if c.n_routed_experts % c.n_expert_groups:
            fail("n_expert_groups", f"must divide n_routed_experts ({c.n_routed_experts})")
        if c.n_limited_groups > c.n_expert_groups:
            fail("n_limited_groups", f"kept groups cannot exceed n_expert_groups ({c.n_expert_groups})")
        per_group = c.n_routed_experts // c.n_expert_groups
        if per_group < 2:
            fail("n_expert_groups", "each group needs >= 2 experts: the group score is a top-2 sum")
        if not 1 <= c.n_activated_experts <= c.n_limited_groups * per_group:
            fail(
                "n_activated_experts",
                f"must be in 1..{c.n_limited_groups * per_group} (kept groups x experts per group)",
            )
    for name in ("bos_token_id", "eos_token_id"):
        v = getattr(c, name)
        if not isinstance(v, int) or not 0 <= v < c.vocab_size:
            fail(name, f"must be a token id in [0, vocab_size={c.vocab_size})")
