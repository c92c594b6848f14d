"""Named model sizes as plain Python, from a unit-test toy to the official 671B configuration."""

from __future__ import annotations

from dsv3.config.model import ModelConfig

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
