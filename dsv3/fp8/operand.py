"""GEMM operands in one precision: the building blocks of the FP8 (and emulated BF16) linears.

An `Operand` is what a GEMM reads: E4M3 data with its scales (1x128 tiles for activations and
gradients, 128x128 blocks for weights), or, in the BF16 recipe, BF16 data without scales. The same
autograd code then runs either recipe, so an FP8-vs-BF16 comparison differs in precision only.

    act(x)       x [M, K] -> 1x128 tiles along K (Fprop, Dgrad operands)
    retile(op)   cached [M, K] -> transposed [K, M], tiled along M: the 128x1 tiles of Wgrad
    weight(w)    w [N, K] -> 128x128 blocks; `.t()` is W^T with the same blocks (Dgrad)
    mm(a, b)     a [M, K] @ b [N, K]^T, FP32 accumulation, output rounded to `out_dtype`

Shapes: M rows (tokens), K reduction dim, N output features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from dsv3.fp8.gemm import bf16_gemm, fp8_gemm
from dsv3.fp8.quant import (
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_tiles,
    quantize_tiles_e5m6,
)


@dataclass(frozen=True)
class GemmConfig:
    """How one linear (or one SwiGLU MLP) runs its three GEMMs. Defaults: plain fine-grained FP8."""

    fp8: bool = True  # False: the emulated BF16 GEMM (the baseline recipe)
    pow2_input: bool = False  # power-of-2 scales for the input (o_proj, MoE dispatch; §3.3.3)
    pow2_grad: bool = False  # power-of-2 scales for the output gradient (before the MoE down-proj)
    cache_e5m6: bool = False  # cache the input in E5M6 instead of E4M3 (o_proj's input; §3.3.3)


FP8 = GemmConfig()  # the plain fine-grained FP8 recipe (the default everywhere)


class Operand(NamedTuple):
    data: torch.Tensor  # E4M3, E5M6-in-FP16 (cache only) or BF16
    scale: torch.Tensor | None  # FP32 tile [R, Kt] or block [Rt, Kt] scales; None for BF16
    blocks: bool = False  # scale is per 128x128 block (a weight)

    def dequant(self) -> torch.Tensor:
        if self.scale is None:
            return self.data.float()
        if self.blocks:
            return dequantize_blocks(self.data, self.scale)
        return dequantize_tiles(self.data, self.scale)

    def t(self) -> Operand:
        """The transposed operand; only block scales transpose without re-quantising."""
        if self.scale is not None and not self.blocks:
            raise ValueError("tile-scaled operands cannot be transposed; use retile()")
        return Operand(self.data.t(), None if self.scale is None else self.scale.t(), self.blocks)


def act(x: torch.Tensor, cfg: GemmConfig, pow2: bool = False) -> Operand:
    """x [M, K] -> GEMM operand tiled 1x128 along K."""
    if not cfg.fp8:
        return Operand(x.bfloat16(), None)
    return Operand(*quantize_tiles(x, pow2=pow2))


def cache_act(x: torch.Tensor, cfg: GemmConfig) -> tuple[Operand, Operand]:
    """x [M, K] -> (Fprop operand, copy cached for backward). The cache is the operand itself (FP8,
    1 byte/value), except for the E5M6 inputs, which are stored next to their E4M3 Fprop operand."""
    fwd = act(x, cfg, pow2=cfg.pow2_input or cfg.cache_e5m6)
    if cfg.fp8 and cfg.cache_e5m6:
        return fwd, Operand(*quantize_tiles_e5m6(x))
    return fwd, fwd


def retile(op: Operand, cfg: GemmConfig, pow2: bool = False) -> Operand:
    """A cached [M, K] operand -> [K, M] tiled along M (128x1 tiles of the original), for Wgrad."""
    if not cfg.fp8:
        return Operand(op.data.t(), None)  # BF16 has no tiles: a transpose is exact
    return act(op.dequant().t(), cfg, pow2=pow2)


def weight(w: torch.Tensor, cfg: GemmConfig) -> Operand:
    """w [..., N, K] -> operand with 128x128 block scales (online: quantised at every use)."""
    if not cfg.fp8:
        return Operand(w.bfloat16(), None)
    return Operand(*quantize_blocks(w), blocks=True)


def mm(a: Operand, b: Operand, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T -> [M, N] in out_dtype (accumulated in FP32 either way)."""
    if a.scale is None:
        return bf16_gemm(a.data, b.data).to(out_dtype) if out_dtype != torch.float32 else _bf16_fp32(a, b)
    return fp8_gemm(a.data, a.scale, b.data, b.scale, out_dtype)


def _bf16_fp32(a: Operand, b: Operand) -> torch.Tensor:
    # BF16 operands, FP32 output (the weight gradient of the BF16 recipe)
    return a.data.float() @ b.data.float().t()
