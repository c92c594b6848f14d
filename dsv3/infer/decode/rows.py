"""The native one-row decoder's construction (DESIGN §8): a lone sequence's whole decode step, every
layer's attention over its cache slice and its feed-forward with routing, in one call
(`RowDecoder` in csrc/few_rows.cpp). dsv3.infer.decode.step.FastDecoder builds one for the main
layers and one for MTP module 1, and rebuilds them with its weights.

Shapes: H heads, R kv_lora_rank, P qk_rope_head_dim.
"""

from __future__ import annotations

import torch

from dsv3.infer.decode.weights import AttnWeights, FfnWeights


def row_decoder(
    kernels,
    dims: tuple[int, int, int],
    attn: list[AttnWeights],
    ffn: list[FfnWeights],
    pools: list[torch.Tensor],
    head: torch.Tensor | None = None,
):
    """A RowDecoder over these layers' weights and cache pools (dims: H, R, P), with the output
    `head` [D, V] for its `logits` where given, or None where `kernels` has none (the torch
    reference). Where `kernels.stream`, it keeps every matrix packed for streaming (csrc/streamed.h)."""
    make = getattr(kernels, "RowDecoder", None)
    if make is None:
        return None
    row = make(*dims, stream=getattr(kernels, "stream", False), wide=getattr(kernels, "wide", False))
    for a, f, pool in zip(attn, ffn, pools):
        a = row_attention(a)
        row.add_attention(
            a.w_in, a.w_q, a.kv_norm, a.w_o, pool, a.w_uk, a.w_uv, a.q_rank, a.norm_eps, a.q_eps, a.kv_eps,
            a.norm_w, a.q_norm_w, a.q_scale,
        )  # fmt: skip
        gate = f.moe.gate if f.moe is not None else None
        row.add_ffn(
            f.w_in, f.w_down, f.norm_w, f.gate_w,
            None if gate is None else gate.e_score_correction_bias,
            f.w13_all, f.w2_all, f.hidden,
            0 if gate is None else f.moe.n_experts,
            0 if gate is None else gate.top_k,
            0 if gate is None else gate.n_groups,
            0 if gate is None else gate.topk_groups,
            gate is None or gate.score_func == "sigmoid",
            0.0 if gate is None else gate.route_scale,
            f.norm_eps,
        )  # fmt: skip
    if head is not None:
        row.set_head(head)
    return row


def row_attention(a: AttnWeights) -> AttnWeights:
    """The attention weights the one-row decoder streams: a lone token reads every matrix once, so
    its time is their bytes. Of the stored copy (`AttnWeights.stored`: unfolded in the checkpoint's
    BF16, exact), the few-row layout and the many-row one (`AttnWeights.many`: other folds), the one
    with the fewest bytes, the stored copy on a tie: v3-mini's unfolded W_UV + o_proj is half its
    folded o_proj, and BF16 halves the rest. Every layout computes the model's products (exact to
    FP32 rounding, 1e-5): the activations and the accumulation are FP32, BF16 weights widened exactly."""
    layouts = [t for t in (a.stored, a, a.many) if t is not None]
    return min(layouts, key=attention_bytes)


def attention_bytes(a: AttnWeights) -> int:
    """The bytes one token reads from an attention layer's matrices."""
    return sum(t.numel() * t.element_size() for t in (a.w_in, a.w_q, a.w_o, a.w_uk, a.w_uv) if t is not None)
