"""Block-scaled FP8 GEMM with FP32 promotion (§3.3.2), and the emulations used to study it.

    out[m, n] = sum_k (A_k[m] . B_k[n]) * sa[m, k] * sb[n, k]        A [M, K], B [N, K], out = A B^T

k runs over 128-wide blocks of K. Each block's dot products are accumulated in FP32 and only then
multiplied by the two scales and added to the FP32 total: on Hopper this is the "promotion" of the
tensor core's partial sums to CUDA-core FP32 registers every N_C = 128 elements (4 WGMMAs).

Scale layouts, told apart by their first dimension: sa [M, Kt] is one scale per 1x128 tile (an
activation or a gradient), sa [ceil(M/128), Kt] one per 128x128 block (a weight); the same for sb.
The three training GEMMs all fit `a @ b.T`:
    Fprop  y  = x  @ W^T    a = x  [M, K] tiles along K,   b = W   [N, K] blocks
    Dgrad  dx = dy @ W      a = dy [M, N] tiles along N,   b = W^T [K, N] blocks (transposed)
    Wgrad  dW = dy^T @ x    a = dy^T [N, M], b = x^T [K, M], both tiled along M (128x1 tiles)

Backends behind `fp8_gemm` (one interface, chosen by `backend`; DESIGN §4):
- "blocked": the reference. One batched FP32 matmul over the K blocks, [Kt, M, 128] x [Kt, 128, N],
  scaled per block and summed in FP32: exactly the promoted kernel's block structure. E4M3 values
  upcast to FP32 are exact, so only FP32 rounding separates it from the exact FP8 product.
- "dequant": the CPU fast path. sum_k (A_k B_k^T) sa_k sb_k equals (A * sa) @ (B * sb)^T: dequantise
  both operands and run one FP32 matmul, which accumulates the whole K in FP32 (promotion at every
  element, never less precise than every 128). It differs from "blocked" by FP32 rounding only,
  and a test holds it to the reference.
- "auto" picks "dequant". A CUDA kernel (block-scaled `torch._scaled_mm`, DeepGEMM or Triton) would
  plug in here, chosen by device; none is included yet, so GPUs run the same emulation.

`limited_acc_gemm` emulates Hopper's ~14-bit FP8 accumulator (SageAttention2 reports 1 sign, 8
exponent, 13 mantissa bits) to show why promotion matters: each 32-wide MMA step's products are
summed exactly, added to the accumulator, and the accumulator is truncated to 14 significant bits.
`interval=128` flushes it to FP32 every 128 elements (DeepSeek's kernel); `interval=None` never does.
The truncation model is an assumption about undocumented hardware; the ~2% the paper saw at K=4096
is reproduced in order of magnitude, not exactly. `bf16_gemm` is the emulated GPU BF16 GEMM that the
BF16 baseline uses on CPU (operands rounded to BF16, FP32 accumulation, BF16 output).

Shapes: M rows of a, N rows of b, K reduction, Kt = ceil(K/128).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.fp8.quant import TILE, _ceil_div, _pad_to, to_float

MMA_K = 32  # K of one Hopper FP8 WGMMA instruction: products summed before touching the accumulator
HOPPER_ACC_BITS = 14  # significant bits of the FP8 tensor-core accumulator ("around 14 bits", §3.3.2)


def _row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, Kt] (1x128 tiles) or [ceil(rows/128), Kt] (128x128 blocks) -> per-row [rows, Kt] FP32."""
    if scale.shape[0] == rows:
        return scale.float()
    if scale.shape[0] == _ceil_div(rows, TILE):
        return scale.float().repeat_interleave(TILE, dim=0)[:rows]
    raise ValueError(
        f"scale: {scale.shape[0]} rows fit neither 1x128 tiles nor 128x128 blocks of {rows} rows"
    )


def _check(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)}: expected [M, K] and [N, K]")
    Kt = _ceil_div(a.shape[1], TILE)
    if sa.shape[-1] != Kt or sb.shape[-1] != Kt:
        raise ValueError(f"scales {tuple(sa.shape)}, {tuple(sb.shape)}: expected {Kt} K blocks")


def _k_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[R, K] -> FP32 [Kb, R, block], zero-padded along K."""
    return _pad_to(to_float(x), -1, block).unflatten(-1, (-1, block)).transpose(0, 1)


def _blocked(a, sa, b, sb) -> torch.Tensor:
    M, N = a.shape[0], b.shape[0]
    partial = torch.bmm(_k_blocks(a, TILE), _k_blocks(b, TILE).transpose(1, 2))  # (Kt, M, N), FP32
    scales = _row_scales(sa, M).t()[:, :, None] * _row_scales(sb, N).t()[:, None, :]  # (Kt, M, N)
    return (partial * scales).sum(dim=0)


def _dequant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    K = x.shape[1]
    s = _row_scales(scale, x.shape[0])  # (R, Kt)
    return (_pad_to(to_float(x), -1, TILE).unflatten(-1, (-1, TILE)) * s[..., None]).flatten(-2)[:, :K]


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """a_fp8 [M, K], b_fp8 [N, K] (E4M3) with tile or block scales -> a @ b.T [M, N] in out_dtype."""
    _check(a_fp8, a_scale, b_fp8, b_scale)
    if backend == "blocked":
        out = _blocked(a_fp8, a_scale, b_fp8, b_scale)
    elif backend in ("auto", "dequant"):
        out = _dequant(a_fp8, a_scale) @ _dequant(b_fp8, b_scale).t()
    else:
        raise ValueError(f"backend: {backend!r} is not one of 'auto', 'dequant', 'blocked'")
    return out.to(out_dtype)


# ---- emulations for study and for the BF16 baseline --------------------------------------------------
def truncate_significand(x: torch.Tensor, bits: int) -> torch.Tensor:
    """FP32 x rounded toward zero to `bits` significant bits (implicit bit included)."""
    drop = 24 - bits
    return (x.view(torch.int32) & ~((1 << drop) - 1)).view(torch.float32)


def limited_acc_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    acc_bits: int = HOPPER_ACC_BITS,
    interval: int | None = None,
) -> torch.Tensor:
    """a @ b.T [M, N] (FP32) through an accumulator of `acc_bits` significant bits, truncated after
    every MMA_K-wide step, flushed into FP32 every `interval` elements of K (None: never)."""
    _check(a_fp8, a_scale, b_fp8, b_scale)
    if interval is not None and interval % MMA_K:
        raise ValueError(f"interval: must be a multiple of the MMA step {MMA_K}, got {interval}")
    M, N = a_fp8.shape[0], b_fp8.shape[0]
    # Per-MMA-step products with their block scales applied (scales are constant inside a step).
    steps = torch.bmm(_k_blocks(a_fp8, MMA_K), _k_blocks(b_fp8, MMA_K).transpose(1, 2))  # (Ks, M, N)
    per_block = TILE // MMA_K
    sa = _row_scales(a_scale, M).t().repeat_interleave(per_block, 0)[: len(steps)]  # (Ks, M)
    sb = _row_scales(b_scale, N).t().repeat_interleave(per_block, 0)[: len(steps)]  # (Ks, N)
    steps = steps * sa[:, :, None] * sb[:, None, :]
    total = torch.zeros(M, N)
    acc = torch.zeros(M, N)
    flush_every = None if interval is None else interval // MMA_K
    for i, step in enumerate(steps):
        acc = truncate_significand(acc + step, acc_bits)
        if flush_every is not None and (i + 1) % flush_every == 0:
            total, acc = total + acc, torch.zeros_like(acc)
    return total + acc


def bf16_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T as a GPU BF16 GEMM computes it: BF16 operands, FP32 accumulation, BF16
    output. Emulated in FP32 on CPU, whose BF16 matmuls round partial sums to BF16 (and are slow)."""
    if a.device.type != "cpu":
        return F.linear(a.bfloat16(), b.bfloat16())  # GPU BF16 GEMMs accumulate in FP32 already
    return F.linear(a.bfloat16().float(), b.bfloat16().float()).bfloat16()
