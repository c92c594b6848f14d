"""Fine-grained FP8 quantisation (§3.3.2): E4M3 with one scale per 1x128 tile or 128x128 block.

Why fine-grained: one scale per tensor lets a few outlier channels set the scale for everything,
pushing ordinary values into E4M3's subnormals or to zero. With one scale per 1x128 tile (a token's
128 consecutive channels) or per 128x128 weight block, an outlier only costs precision inside its
own tile. Scales are "online": the current max-abs of the tile, no amax history (DESIGN §4).

    scale = amax / 448                (FP32, the dequantisation multiplier)
    x_fp8 = E4M3(clamp(x / scale, -448, 448))
    x    ~= x_fp8 * scale

- The clamp is not optional: E4M3 has no infinity, and what a cast does on overflow depends on the
  library (PyTorch 2.13 saturates, older versions and ml_dtypes give NaN above 464). `x / scale`
  can land a rounding step above 448, so every cast here is preceded by a clamp.
- An all-zero tile has amax = 0; its scale is floored at FP32's smallest normal so that 0/scale is
  0 and never 0/0. The amax is capped at FP32 max so an infinite input saturates instead of making
  inf/inf. NaN inputs stay NaN (they are a bug upstream and should show).
- Power-of-2 scales (`pow2=True`, "UE8M0"): the scale is rounded UP to 2^ceil(log2 s), so amax/scale
  stays <= 448, and (de)scaling only shifts exponents. Re-tiling such a tensor (1x128 -> 128x1 in
  the backward pass) then adds no rounding error beyond possible underflow (§3.3.3).
- E5M6 (§3.3.3): the custom 12-bit format that caches the input of the linear after attention.
  Emulated by rounding FP32 to 6 mantissa bits with an FP16-like exponent (bias 15, top exponent
  reserved: max 65024, subnormal step 2^-20) and stored as FP16, which holds every E5M6 value
  exactly (so the emulated cache takes 2 bytes per value, a packed one would take 1.5).

Layouts. Tiles run along the last dimension: x [..., K] -> scale [..., ceil(K/128)]. Blocks cover
the last two dimensions: w [..., N, K] -> scale [..., ceil(N/128), ceil(K/128)], the layout of
`weight_scale_inv` in the official FP8 checkpoints. Dimensions need not be multiples of 128: edge
tiles and blocks are partial (padded with zeros for the max, which does not change it).
Shapes: M rows (tokens), N output features, K reduction dim, Kt = ceil(K/128), Nt = ceil(N/128).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsv3 import paper

E4M3 = torch.float8_e4m3fn
E4M3_MAX = paper.E4M3_MAX
TILE = paper.FP8_TILE
E5M6_MAX = (2 - 2**-6) * 2**15  # 65024: largest E5M6 value with the top exponent reserved, as in FP16
_E5M6_MIN_NORMAL = 2.0**-14
_E5M6_SUBNORMAL_STEP = 2.0**-20  # min normal / 2^6
_FP32_TINY = torch.finfo(torch.float32).tiny
_FP32_MAX = torch.finfo(torch.float32).max


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad dimension `dim` of x up to a multiple (a no-op view when it already is one)."""
    extra = _ceil_div(x.shape[dim], multiple) * multiple - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


def round_scale_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales UP to the next power of two (exact: frexp, no log2 rounding)."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    # A mantissa of exactly 0.5 means scale already is 2^(exponent-1); anything above rounds up to 2^exponent.
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(scale), exponent)


def scale_from_amax(amax: torch.Tensor, fmt_max: float = E4M3_MAX, pow2: bool = False) -> torch.Tensor:
    """FP32 dequantisation scales amax / fmt_max, guarded against amax = 0 and amax = inf."""
    scale = amax.float().clamp(max=_FP32_MAX) / fmt_max
    scale = scale.clamp(min=_FP32_TINY)  # all-zero tiles: 0 / tiny = 0, never 0 / 0
    if not pow2:
        return scale
    # Cap at the largest 2^e with fmt_max * 2^e finite: values near FP32 max saturate, never become inf.
    return round_scale_pow2(scale).clamp(max=2.0 ** math.floor(math.log2(_FP32_MAX / fmt_max)))


def _cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(E4M3).float()  # every byte's value (incl. NaN)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Upcast to FP32. E4M3 on CPU goes through a 256-entry table: ~2.5x faster than `.float()` there."""
    if x.dtype != E4M3 or x.device.type != "cpu":
        return x.float()
    codes = x.view(torch.uint8).reshape(-1).int()
    return _E4M3_VALUES.index_select(0, codes).view(x.shape)


# ---- 1x128 tiles along the last dimension (activations, activation gradients) ---------------------------
def quantize_tiles(
    x: torch.Tensor, tile: int = TILE, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_fp8 [..., K] E4M3, scale [..., ceil(K/tile)] FP32), one scale per 1 x tile."""
    K = x.shape[-1]
    xp = _pad_to(x.float(), -1, tile).unflatten(-1, (-1, tile))  # (..., Kt, tile)
    scale = scale_from_amax(xp.abs().amax(dim=-1), pow2=pow2)  # (..., Kt)
    x_fp8 = _unpad(_cast_e4m3(xp / scale[..., None]).flatten(-2), K)
    return x_fp8, scale


def dequantize_tiles(
    x_q: torch.Tensor, scale: torch.Tensor, tile: int = TILE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_tiles`: x_q [..., K] (E4M3, or E5M6 values held in FP16), scale [..., Kt]."""
    K = x_q.shape[-1]
    xp = _pad_to(to_float(x_q), -1, tile).unflatten(-1, (-1, tile))  # (..., Kt, tile)
    return _unpad((xp * scale[..., None].float()).flatten(-2), K).to(dtype)


# ---- 128x128 blocks over the last two dimensions (weights) --------------------------------------------
def _blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """w [..., N, K] -> zero-padded view [..., Nt, block, Kt, block]."""
    wp = _pad_to(_pad_to(w, -1, block), -2, block)
    return wp.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))


def _unblocked(wb: torch.Tensor, N: int, K: int) -> torch.Tensor:
    return _unpad(wb.flatten(-2).flatten(-3, -2), N, K)


def _unpad(x: torch.Tensor, *sizes: int) -> torch.Tensor:
    """Crop the trailing dims of a padded tensor to `sizes`; a copy when cropped, so that a cached
    result does not keep the padded buffer alive."""
    if tuple(x.shape[-len(sizes) :]) == sizes:
        return x
    index = (..., *(slice(0, n) for n in sizes))
    return x[index].contiguous()


def quantize_blocks(
    w: torch.Tensor, block: int = TILE, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (w_fp8 [..., N, K] E4M3, scale [..., ceil(N/block), ceil(K/block)] FP32)."""
    N, K = w.shape[-2:]
    wb = _blocked(w.float(), block)  # (..., Nt, b, Kt, b)
    scale = scale_from_amax(wb.abs().amax(dim=(-3, -1)), pow2=pow2)  # (..., Nt, Kt)
    w_fp8 = _cast_e4m3(wb / scale[..., :, None, :, None])
    return _unblocked(w_fp8, N, K), scale


def dequantize_blocks(
    w_fp8: torch.Tensor, scale: torch.Tensor, block_size: int = TILE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w_fp8 [..., N, K] times its block scales [..., ceil(N/128), ceil(K/128)] -> [..., N, K] in dtype.

    The semantics of the official checkpoints' `weight_scale_inv`: every block_size x block_size block
    is multiplied by its scale; the last row/column of blocks may be partial."""
    N, K = w_fp8.shape[-2:]
    expected = (_ceil_div(N, block_size), _ceil_div(K, block_size))
    if tuple(scale.shape[-2:]) != expected:
        raise ValueError(
            f"scale: shape {tuple(scale.shape)} does not match weight {tuple(w_fp8.shape)} with "
            f"{block_size}x{block_size} blocks (expected [..., {expected[0]}, {expected[1]}])"
        )
    wb = _blocked(to_float(w_fp8), block_size) * scale.float()[..., :, None, :, None]
    return _unblocked(wb, N, K).to(dtype)


# ---- E5M6: the cache format of the input of the linear after attention (§3.3.3) ------------------------
def round_to_e5m6(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E5M6 value (ties to even), saturating at +-65024; returns FP16, exact."""
    x = x.float().clamp(-E5M6_MAX, E5M6_MAX)
    bits = x.view(torch.int32)
    drop = 23 - 6  # FP32 mantissa bits that E5M6 does not have
    lsb = (bits >> drop) & 1
    # Round half to even on the magnitude; a carry out of the mantissa correctly bumps the exponent.
    rounded = ((bits + (1 << (drop - 1)) - 1 + lsb) & ~((1 << drop) - 1)).view(torch.float32)
    # Below the smallest normal the grid is uniform (step 2^-20); torch.round is half-to-even too.
    subnormal = torch.round(x / _E5M6_SUBNORMAL_STEP) * _E5M6_SUBNORMAL_STEP
    return torch.where(x.abs() < _E5M6_MIN_NORMAL, subnormal, rounded).to(torch.float16)


def quantize_tiles_e5m6(x: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (E5M6 values held in FP16 [..., K], power-of-2 scale [..., Kt]).

    The scales are the power-of-2 E4M3 tile scales of the same tensor, so the forward E4M3 operand
    and the cached E5M6 copy share one scale (values <= 448 here, far inside E5M6's range)."""
    K = x.shape[-1]
    xp = _pad_to(x.float(), -1, tile).unflatten(-1, (-1, tile))  # (..., Kt, tile)
    scale = scale_from_amax(xp.abs().amax(dim=-1), pow2=True)  # (..., Kt)
    return _unpad(round_to_e5m6(xp / scale[..., None]).flatten(-2), K), scale
