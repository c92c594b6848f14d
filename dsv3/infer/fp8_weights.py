"""Serve an FP8 checkpoint with its projection weights kept in FP8 (DESIGN §3.7, §4).

The official checkpoints store most projections as E4M3 with one FP32 `weight_scale_inv` per
128x128 block. `keep_fp8_linears` swaps each such `nn.Linear` of a loaded model for an
`Fp8WeightLinear` that holds exactly those bytes (1 byte per weight plus a scale per block) and runs
y = x W^T through the block-scaled GEMM of `dsv3.fp8.gemm`, the activation quantised online to
E4M3 per 1x128 tile, as DeepSeek-V3's inference does (activation_scheme: dynamic). On CPU that GEMM
is the FP32 reference of the promoted kernel (dequantise, FP32 matmul); on a GPU a real FP8 kernel
plugs in behind the same call.

Kept in the model's dtype: `kv_b_proj` (the absorbed decode path folds its weight into the query
and the output, so it reads the matrix itself), the routed experts (stored fused; a grouped FP8 GEMM
for inference is future work), gates, norms, embedding and head (never FP8 in V3).

Shapes: M tokens, K in_features, N out_features, Kt = ceil(K/128).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

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


def _hf_key(name: str, n_layers: int) -> str:
    """Our module path -> its checkpoint key prefix (MTP module k is layer n_layers + k)."""
    parts = name.split(".")
    if parts[0] == "mtp":
        rest = parts[3:] if parts[2] == "block" else parts[2:]
        return ".".join(["model", "layers", str(n_layers + int(parts[1])), *rest])
    return "model." + name


def keep_fp8_linears(model: Transformer, path: str | Path) -> int:
    """Swap every nn.Linear whose checkpoint weight is FP8 for an Fp8WeightLinear holding the stored
    bytes. Returns how many were swapped (0 for a BF16/FP32 checkpoint)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            where.update({k: f for k in h.keys()})
    swaps = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in KEEP_DEQUANTISED:
            continue
        key = _hf_key(name, model.config.n_layers) + ".weight"
        if key + "_scale_inv" in where:
            swaps.append((name, key))
    swapped = 0
    for name, key in swaps:
        with safe_open(where[key], framework="pt") as h:
            w = h.get_tensor(key)
        with safe_open(where[key + "_scale_inv"], framework="pt") as h:
            s = h.get_tensor(key + "_scale_inv")
        if w.dtype != torch.float8_e4m3fn:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = next(model.parameters()).device
        setattr(parent, child, Fp8WeightLinear(w.to(device), s.to(device)))
        swapped += 1
    return swapped
