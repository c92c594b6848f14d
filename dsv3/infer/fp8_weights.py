"""Serve an FP8 checkpoint with its projection weights kept in FP8 (DESIGN §3.7, §4).

The official checkpoints store most projections as E4M3 with one FP32 `weight_scale_inv` per
128x128 block. `load_fp8_model` loads such a checkpoint with each of those `nn.Linear`s replaced by
an `Fp8WeightLinear` holding exactly those bytes (1 byte per weight plus a scale per block), read as
stored and never dequantised, so peak memory is the FP8 model's. It runs y = x W^T through the
block-scaled GEMM of `dsv3.fp8.gemm`, the activation quantised online to E4M3 per 1x128 tile, as
DeepSeek-V3's inference does (activation_scheme: dynamic). On CPU that GEMM is the FP32 reference
of the promoted kernel (dequantise, FP32 matmul); on a GPU a real FP8 kernel plugs in behind the
same call.

Kept in the model's dtype: `kv_b_proj` (the absorbed decode path folds its weight into the query
and the output, so it reads the matrix itself), the routed experts (stored fused; a grouped FP8 GEMM
for inference is future work), gates, norms, embedding and head (never FP8 in V3).

Shapes: M tokens, K in_features, N out_features, Kt = ceil(K/128).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsv3.checkpoint import load_pretrained
from dsv3.fp8.gemm import fp8_gemm
from dsv3.fp8.quant import dequantize_blocks, quantize_tiles
from dsv3.model.transformer import Transformer

KEEP_DEQUANTISED = ("kv_b_proj",)  # read as a matrix by the absorbed MLA path


class Fp8WeightLinear(nn.Module):
    """y = x W^T with W in E4M3 + 128x128 block scales; x quantised per 1x128 tile on the fly."""

    def __init__(self, weight_fp8: torch.Tensor, scale_inv: torch.Tensor) -> None:
        super().__init__()
        if weight_fp8.dtype != torch.float8_e4m3fn:
            raise ValueError(f"weight_fp8: expected float8_e4m3fn, got {weight_fp8.dtype}")
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale_inv", scale_inv.float())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight [N, K] (for code that reads the matrix; costs a full FP32 copy)."""
        return dequantize_blocks(self.weight_fp8, self.weight_scale_inv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        xq, sx = quantize_tiles(x2)  # (M, K) E4M3, (M, Kt)
        y = fp8_gemm(xq, sx, self.weight_fp8, self.weight_scale_inv, out_dtype=x.dtype)  # (M, N)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128 blocks"


def _kept_in_fp8(name: str) -> bool:
    return name.rsplit(".", 1)[-1] not in KEEP_DEQUANTISED


def install_fp8_linears(model: Transformer, raw: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Put an Fp8WeightLinear holding (weight e4m3, weight_scale_inv) at each module name of `raw`."""
    for name, (w, scale) in raw.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8WeightLinear(w, scale))
    return len(raw)


def load_fp8_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> Transformer:
    """Load a checkpoint with its FP8 projections kept in FP8: those weights are read as stored and
    never dequantised (`load_pretrained(keep_fp8=...)`), so peak memory is the FP8 model's; every
    other weight (and all weights of a BF16/FP32 checkpoint) is loaded in `dtype`. verify: as in
    `load_pretrained`."""
    model, raw = load_pretrained(path, dtype=dtype, device=device, keep_fp8=_kept_in_fp8, verify=verify)
    install_fp8_linears(model, raw)
    return model
