"""Which decode path runs where: the row-count limits between the native kernels, the streamed
copies and the many-row GEMMs, and the cost rule that sends a prefill chunk down the fast path
(dsv3.infer.decode.step). Every limit was measured; the figures are beside it.

Shapes: B rows, T new tokens per row, S key positions, H heads, R kv_lora_rank, P
qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim.
"""

from __future__ import annotations

PREFILL_SCORES = 2**24  # most attention scores (rows x tokens x heads x keys) of a fast prefill chunk
PREFILL_GROWTH = 1.5  # a fast prefill's absorbed attention may cost this x GEMM_GAIN the naive one's (FP32)
GEMM_GAIN = {"bf16": 4.0, "packed": 2.0}  # this path's GEMM rate over the model's FP32 one (ATen): measured
# up to this many rows the native kernels run the routed experts (each row's selected experts in one
# call, FP32 compute), not per-expert GEMMs: v3-mini decode at batch 16 +11% (FP32) and +24% (BF16
# GEMMs), at batch 64 +4% / -1% (Zen 4, 1 thread, medians of 8 alternating runs); with FP32 GEMMs
# the limit is 128 rows: on the AVX2-only Zen 3 one MoE layer's experts at 64 rows take 5.2 ms
# native vs 7.1 on the oneDNN-packed GEMMs (1 thread; 2.8 vs 5.7 at 2), even at 128 rows (1 thread),
# and v3-mini decode at batch 64 ran 1.06x / 1.11x (FP32, 1 / 2 threads) and 1.08x (BF16 weights)
NATIVE_EXPERT_ROWS = {"fp32": 128, "bf16_gemm": 32}
# the same on the one-row decoder's streamed expert copies (`Native.stream_rows`), up to this many rows: against
# the oneDNN-packed grouped GEMMs, v3-mini's routed experts (1 thread, Zen 4, out of cache) 1.3-3x
# faster in FP32 from 16 to 512 rows; with BF16 GEMMs 3.2x at 16 rows, 1.5x at 64, even at 128 and
# 0.74x at 512
STREAMED_EXPERT_ROWS = {"fp32": 512, "bf16_gemm": 128}
# the per-head W_UK / W_UV of many rows on those streamed copies, up to this many rows: against
# ATen's bmm (v3-mini, 1 thread, Zen 4) FP32 1.42x at 16 rows, 1.17x at 64, 1.1x at 512 (the same
# values: sums in the same order); against the BF16 bmm of BF16 GEMMs 1.23x at 16, even at 32,
# 0.9x at 64
STREAMED_HEAD_ROWS = {"fp32": 512, "bf16_gemm": 16}
# the same on the AVX2 strips (gemm.Strips: CPUs with AVX2 and no AVX-512F), up to this many rows:
# one MoE layer of v3-mini's experts (16 x [512, 512] + [256, 512], top 4) out of cache, Zen 3, 1
# thread (bench/strips_vs_onednn.py --experts), against the row-major loop 1.0x at 5-8 rows (most
# experts' 1-3 rows stay on the loop), 1.3-1.8x from 16 to 512; against the grouped oneDNN GEMMs
# 2.3-3x up to 64 rows, 1.5x at 128-256, 1.1x at 512 (a first run: 1.2x at 1,024); 8 V3-shaped
# experts ([7168, 4096] + [2048, 7168], top 2) 1.3-2.6x the loop from 16 rows, 1.1-1.7x grouped
STRIP_EXPERT_ROWS = 1024
KERNEL_ROWS = 4  # up to this many rows, matmuls run on dsv3.infer.decode.kernels; more: decode.gemm
# up to this many positions per row (the verified ones after a speculative step), MTP module 1 runs
# its block over all of them up to the one a draft is taken from: one read of its weights serves
# them all (a lone sequence, v3-mini, Zen 3: 2 positions 2.0 ms, 1 position 1.8), where the cache
# rows alone of the earlier ones (`mtp_latents`) cost a read of eh_proj and the latent columns more;
# more positions (a prompt): the cache rows alone, the block on the last (64 tokens: 19 -> 4.6 ms)
MTP_BLOCK_POSITIONS = 8
# up to this many positions per row, the model's path runs MTP's attention absorbed (over the latent
# cache, decode-sized); more (a prompt's positions): the naive per-head attention, prefill-sized
MTP_ABSORB_POSITIONS = 8


def expert_rows(gemm_kind: str, stream_rows: bool, amx: bool, strips: bool = False) -> int:
    """Up to this many rows the native kernels run the routed experts, more: grouped GEMMs.
    gemm_kind: "fp32" or "bf16_gemm" (the many-row GEMMs' kind); stream_rows: many rows read the
    one-row decoder's streamed copies (`Native.stream_rows`); amx: the AMX grouped GEMMs run them;
    strips: the native experts multiply on the AVX2 strips (`gemm.Strips.experts_`)."""
    if amx:  # its grouped GEMMs beat the FP32 experts_ from 5 rows on (batch 16 1.07x, 8 1.02x)
        return KERNEL_ROWS
    if strips:
        return STRIP_EXPERT_ROWS
    return (STREAMED_EXPERT_ROWS if stream_rows else NATIVE_EXPERT_ROWS)[gemm_kind]


def prefill_pays(
    B: int, T: int, S: int, dims: tuple[int, int, int, int, int], gain: float | None, naive: bool
) -> bool:
    """Whether a prefill chunk of B rows x T new tokens, S key positions (the longest row's
    context), runs on the fast path rather than the model's forward. dims: (H, R, P, N, V); gain:
    the fast path's GEMM rate over the model's FP32 one (`GEMM_GAIN`; None where it runs ATen's FP32
    GEMMs, as fast as the model's: measured); naive: the many-row weights keep W_UK / W_UV apart
    (`AttnWeights.w_kvb`), so the chunk runs the model's naive attention on the fused GEMMs. Else
    the absorbed attention may cost at most PREFILL_GROWTH x gain times the FP32 naive one's
    multiply-adds; and the chunk's attention scores must fit in PREFILL_SCORES entries."""
    H, R, P, N, V = dims
    if gain is None or B * T <= KERNEL_ROWS or B * T * H * S > PREFILL_SCORES:
        return False
    if naive:
        return True
    absorbed = B * T * H * (R * (N + V) + S * (2 * R + P))  # W_UK, W_UV per query; scores over latents
    naive_cost = B * S * H * R * (N + V) + B * T * H * S * (N + P + V)  # K, V per key; per-head scores
    return absorbed <= PREFILL_GROWTH * gain * naive_cost
