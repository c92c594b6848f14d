"""ModelConfig: every architectural field of DeepSeek-V3 in one validated dataclass.

Field names follow the official `inference/model.py` `ModelArgs`; `from_hf` / `to_hf` translate to and
from the Hugging Face `config.json` of the released checkpoints. Presets are plain Python below.
A bad value fails at construction with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3 import paper
from dsv3.errors import Dsv3Error


class ConfigError(Dsv3Error, ValueError):
    """A configuration value is invalid; the message names the field."""


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

    # ---- Hugging Face config.json -----------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict of the official DeepSeek-V3 release, with the keys other tools need."""
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.inter_dim,
            "moe_intermediate_size": self.moe_inter_dim,
            "num_hidden_layers": self.n_layers,
            "first_k_dense_replace": self.n_dense_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts,
            "n_group": self.n_expert_groups,
            "topk_group": self.n_limited_groups,
            "routed_scaling_factor": self.route_scale,
            "scoring_func": self.score_func,
            "topk_method": "noaux_tc",
            "norm_topk_prob": self.score_func == "sigmoid",
            "num_nextn_predict_layers": self.n_mtp_layers,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "initializer_range": self.init_std,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_interleave": True,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.yarn_active:
            hf["rope_scaling"] = {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
                "mscale": self.mscale,
                "mscale_all_dim": self.mscale,
            }
        hf.update(self.extra)
        return hf

    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path) -> ModelConfig:
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

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        try:
            base = PRESETS[name]
        except KeyError:
            raise ConfigError(f"preset: unknown {name!r}; choose one of {sorted(PRESETS)}") from None
        return base.replace(**overrides) if overrides else base

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


_PASSTHROUGH_HF_KEYS = ("quantization_config", "torch_dtype", "dtype")
_REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size",
    "n_routed_experts", "num_experts_per_tok",
)  # fmt: skip


# ---- typed key=value parsing, shared by every config dataclass -----------------------------------
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")


def check_known_fields(cls: type, values: typing.Mapping[str, Any], what: str, prefix: str = "") -> None:
    """A ConfigError naming the first key of `values` that is not a field of dataclass `cls`."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown {what}{hint}")


def parse_typed(name: str, raw: str, hint: Any) -> Any:
    """The command-line text `raw` of field `name` as a value of type `hint`: booleans as
    true/false/1/0/yes/no/on/off, None as none/null for Optional fields, numbers, comma-separated (or
    JSON) lists for tuples. A ConfigError names the field and the value."""
    try:
        return _parse(raw.strip(), hint)
    except (ValueError, TypeError) as e:
        why = f" ({e})" if isinstance(e, _Reason) else ""  # Python's own parse messages add nothing
        raise ConfigError(f"{name}: cannot parse {raw!r} as {_type_name(hint)}{why}") from None


class _Reason(ValueError):
    """A parse failure whose message says more than the expected type does."""


def _parse(raw: str, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in _NONE:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(raw, arg)
            except (ValueError, TypeError):
                continue
        raise ValueError("")
    if hint is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            f = float(raw)  # 1e3 is an integer too
            if not f.is_integer():
                raise
            return int(f)
    if hint is float:
        return float(raw)
    if hint is str:
        return raw
    if origin in (tuple, list):
        items = (
            json.loads(raw) if raw.startswith("[") else [x for x in raw.strip("()").split(",") if x.strip()]
        )
        if not isinstance(items, list):
            raise ValueError("")
        elem = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise _Reason(f"expected {len(args)} values, got {len(items)}")
            return tuple(_parse_item(x, a) for x, a in zip(items, args))
        return (tuple if origin is tuple else list)(_parse_item(x, elem) for x in items)
    if origin is dict or hint is dict:
        raise _Reason("set its entries one by one as key.<name>=value")
    try:  # Any: JSON when it parses, else the text
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _parse_item(x: Any, hint: Any) -> Any:
    return x if hint is Any else _parse(str(x).strip(), hint)


def check_typed(name: str, value: Any, hint: Any) -> Any:
    """`value` (from a file or a dict) checked against type `hint`; lists become tuples for tuple
    fields. A ConfigError names the field and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    ok = True
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None) and value is None:
                return None
            if arg is not type(None):
                try:
                    return check_typed(name, value, arg)
                except ConfigError:
                    continue
        ok = False
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        if isinstance(value, Path):  # a path given from Python is its text
            return str(value)
        ok = isinstance(value, str)
    elif origin in (tuple, list):
        ok = isinstance(value, (list, tuple))
        if ok and origin is tuple and args and args[-1] is not Ellipsis:
            ok = len(value) == len(args)
            if ok:
                return tuple(check_typed(name, v, a) for v, a in zip(value, args))
        elif ok and args:
            value = (tuple if origin is tuple else list)(check_typed(name, v, args[0]) for v in value)
    elif origin is dict or hint is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if hint is bool:
        return "a boolean (true/false, yes/no, on/off, 1/0)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "text"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"{len(args)} comma-separated values"
    if origin in (tuple, list):
        return "a comma-separated list"
    if origin is dict or hint is dict:
        return "a mapping"
    return str(hint)


def _first(x: Any) -> int:
    return x[0] if isinstance(x, list) else x


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


# ---- presets -------------------------------------------------------------------------------------
PRESETS: dict[str, ModelConfig] = {
    # a toy for unit tests: every mechanism present (q_lora, groups, dense + MoE layers, MTP)
    "tiny": ModelConfig(
        vocab_size=512,
        dim=64,
        n_layers=3,
        n_dense_layers=1,
        inter_dim=128,
        n_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        moe_inter_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=2.5,
        n_mtp_layers=1,
        max_seq_len=256,
        original_seq_len=256,
        init_std=0.02,
    ),  # fmt: skip
    # ~14M parameters: trains on a laptop CPU in minutes (the `make demo` model)
    "small": ModelConfig(
        vocab_size=8192,
        dim=256,
        n_layers=6,
        n_dense_layers=1,
        inter_dim=768,
        n_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        moe_inter_dim=128,
        n_routed_experts=16,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=2.5,
        n_mtp_layers=1,
        max_seq_len=1024,
        original_seq_len=1024,
        init_std=0.02,
    ),  # fmt: skip
    # DeepSeek-V3's attention geometry exactly (q_lora 1536, kv_lora 512, nope 128, rope 64, v 128:
    # W_UK does not fold into the query projection, as on the real model; whether W_UV folds into
    # o_proj depends on the width, and at 512 it does) and its router (sigmoid, 4 groups of
    # which 2 kept, a shared expert), scaled down in width, depth, heads and experts so that a CPU
    # decodes it at interactive speed: what the inference fast paths are measured on
    "v3-mini": ModelConfig(
        vocab_size=8192,
        dim=512,
        n_layers=4,
        n_dense_layers=1,
        inter_dim=1536,
        n_heads=8,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        moe_inter_dim=256,
        n_routed_experts=16,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=2.5,
        n_mtp_layers=1,
        max_seq_len=1024,
        original_seq_len=1024,
        init_std=0.02,
    ),  # fmt: skip
    # the shapes of DeepSeek-V2-Lite (15.7B total, 2.4B activated) with its V2 softmax gate
    "16b": ModelConfig(
        vocab_size=102400,
        dim=2048,
        n_layers=27,
        n_dense_layers=1,
        inter_dim=10944,
        n_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        moe_inter_dim=1408,
        n_routed_experts=64,
        n_shared_experts=2,
        n_activated_experts=6,
        n_expert_groups=1,
        n_limited_groups=1,
        score_func="softmax",
        route_scale=1.0,
        n_mtp_layers=0,
        max_seq_len=163840,
        original_seq_len=4096,
        rope_factor=40.0,
        mscale=0.707,
        init_std=0.006,
    ),  # fmt: skip
    # the official DeepSeek-V3 configuration (config_671B.json)
    "671b": ModelConfig(),
}
