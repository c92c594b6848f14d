"""FP8 quantisation: round-trip error bounds, scale layouts, edge cases, power-of-2 scales, E5M6."""

import math

import pytest
import torch

from dsv3 import paper
from dsv3.fp8.quant import (
    E4M3,
    E5M6_MAX,
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_tiles,
    quantize_tiles_e5m6,
    round_scale_pow2,
    round_to_e5m6,
)

SHAPES = [(4, 128), (3, 200), (130, 77), (257, 384)]


def _expand(scale: torch.Tensor, K: int, dim: int = -1) -> torch.Tensor:
    return scale.repeat_interleave(128, dim=dim).narrow(dim, 0, K)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pow2", [False, True])
def test_tiles_roundtrip_within_e4m3_rounding(shape, pow2):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[0])[:, None]  # rows of very different size
    x_fp8, scale = quantize_tiles(x, pow2=pow2)
    assert x_fp8.dtype == E4M3 and x_fp8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (shape[0], math.ceil(shape[1] / 128))
    err = (dequantize_tiles(x_fp8, scale) - x).abs()
    # half an E4M3 ulp: 2^-4 relative for normals, 2^-10 * scale in the subnormal range
    bound = 2**-4 * x.abs() + 2**-10 * _expand(scale, shape[1])
    assert (err <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_tile_scale_maps_each_tile_max_to_448(shape):
    x = torch.randn(shape)
    x_fp8, scale = quantize_tiles(x)
    K = shape[1]
    for t in range(scale.shape[1]):
        tile = x[:, t * 128 : min(K, (t + 1) * 128)]
        torch.testing.assert_close(scale[:, t], tile.abs().amax(dim=1) / paper.E4M3_MAX)
        assert (x_fp8[:, t * 128 : (t + 1) * 128].float().abs().amax(dim=1) == paper.E4M3_MAX).all()


@pytest.mark.parametrize("shape", [(128, 128), (300, 200), (5, 129)])
def test_blocks_roundtrip_and_layout(shape):
    w = torch.randn(shape)
    w_fp8, scale = quantize_blocks(w)
    N, K = shape
    assert w_fp8.shape == w.shape and scale.shape == (math.ceil(N / 128), math.ceil(K / 128))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            torch.testing.assert_close(scale[i, j], block.abs().max() / paper.E4M3_MAX)
    full_scale = _expand(_expand(scale, K, -1), N, -2)
    err = (dequantize_blocks(w_fp8, scale) - w).abs()
    assert (err <= (2**-4 * w.abs() + 2**-10 * full_scale) * (1 + 1e-6)).all()


def test_dequantize_blocks_matches_explicit_loop_with_partial_edges():
    """The semantics of the official checkpoints' weight_scale_inv, written out block by block."""
    N, K = 300, 200
    w_fp8 = (torch.randn(N, K) * 50).clamp(-448, 448).to(E4M3)
    scale = torch.rand(3, 2) + 0.1
    expected = torch.empty(N, K)
    for i in range(3):
        for j in range(2):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            expected[rows, cols] = w_fp8[rows, cols].float() * scale[i, j]
    torch.testing.assert_close(dequantize_blocks(w_fp8, scale), expected, rtol=0, atol=0)
    assert dequantize_blocks(w_fp8, scale, dtype=torch.bfloat16).dtype == torch.bfloat16
    # batched leading dims (fused experts [E, N, K] with scales [E, Nt, Kt])
    stacked = dequantize_blocks(torch.stack([w_fp8, w_fp8]), torch.stack([scale, 2 * scale]))
    torch.testing.assert_close(stacked[1], 2 * expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="scale"):
        dequantize_blocks(w_fp8, torch.ones(2, 2))


EDGE_CASES = {
    "zeros": torch.zeros(3, 256),
    "all_equal": torch.full((3, 256), -7.25),
    "fp32_subnormals": torch.full((3, 256), 1e-42) * torch.randn(3, 256).sign(),
    "smallest_subnormal_with_zeros": torch.tensor([[1.4e-45, 0.0] * 64]),
    "fp32_max": torch.tensor([[torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, 1.0] * 50]),
    "huge_and_tiny": torch.tensor([[3e38, 1e-30, -1e-40, 0.0] * 40]),
    "infinities": torch.tensor([[float("inf"), float("-inf"), 1.0, 0.0] * 40]),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("pow2", [False, True])
def test_quantization_never_makes_nan_or_inf(case, pow2):
    x = EDGE_CASES[case]
    for q, s in (quantize_tiles(x, pow2=pow2), quantize_blocks(x, pow2=pow2)):
        assert torch.isfinite(q.float()).all() and torch.isfinite(s).all() and (s > 0).all()
    x_fp8, scale = quantize_tiles(x, pow2=pow2)
    y = dequantize_tiles(x_fp8, scale)
    assert torch.isfinite(y).all()
    finite = torch.isfinite(x)
    assert (y[finite].sign() * x[finite].sign() >= 0).all()  # never flips a sign
    if case == "zeros" or (case == "all_equal" and not pow2):
        torch.testing.assert_close(y, x, rtol=0, atol=0)  # 0 and amax itself (-> 448) are exact


@pytest.mark.parametrize("shape", SHAPES)
def test_pow2_scales_are_powers_of_two_and_keep_values_in_range(shape):
    x = torch.randn(shape) * torch.logspace(-20, 20, shape[0])[:, None]
    x_fp8, scale = quantize_tiles(x, pow2=True)
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()  # exactly 2^e
    assert (x.abs() / _expand(scale, shape[1]) <= paper.E4M3_MAX).all()
    # the smallest power of two that does so: rounded up, never down, never further than needed
    tile_amax = torch.stack([t.abs().amax(dim=1) for t in x.split(128, dim=1)], dim=1)
    assert (tile_amax / scale > paper.E4M3_MAX / 2).all()
    assert (x_fp8.float().abs().amax(dim=1) <= paper.E4M3_MAX).all()
    w_fp8, w_scale = quantize_blocks(torch.randn(shape), pow2=True)
    assert (torch.frexp(w_scale)[0] == 0.5).all()


def test_round_scale_pow2_exact_powers_and_neighbours():
    s = torch.tensor([1.0, 0.5, 2.0**-130, 2.0**100, 0.75, 1.0000001, 3.0])
    assert round_scale_pow2(s).tolist() == [1.0, 0.5, 2.0**-130, 2.0**100, 1.0, 2.0, 4.0]


def test_pow2_retiling_is_exact_where_no_underflow():
    """Why the paper uses power-of-2 scales where 1x128 tiles become 128x1 (§3.3.3): re-quantising
    a pow2-scaled E4M3 tensor along the other axis only shifts exponents, so values that stay in the
    normal range of the new tile come back bit-identical; with arbitrary scales most do not."""
    x = torch.randn(256, 256)
    changed = {}
    for pow2 in (True, False):
        once = dequantize_tiles(*quantize_tiles(x, pow2=pow2))  # 1x128 tiles
        q_t, s_t = quantize_tiles(once.t(), pow2=pow2)  # 128x1 tiles of the cached value
        twice = dequantize_tiles(q_t, s_t).t()
        normal = once.abs() >= 2**-6 * _expand(s_t, 256).t()  # not a subnormal after re-tiling
        changed[pow2] = (twice != once)[normal].float().mean().item()
    assert changed[True] == 0.0
    assert changed[False] > 0.3


def _e5m6_grid() -> torch.Tensor:
    """Every non-negative E5M6 value, enumerated from the definition (bias 15, top exponent reserved)."""
    m = torch.arange(64, dtype=torch.float64)
    subnormals = m * 2.0**-20
    normals = [(1 + m / 64) * 2.0**e for e in range(-14, 16)]
    return torch.cat([subnormals, *normals]).unique()


def test_e5m6_rounds_to_nearest_grid_value():
    grid = _e5m6_grid()
    assert grid.max().item() == E5M6_MAX
    x = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-7, 5, (20000,)), grid.float(), -grid.float()])
    y = round_to_e5m6(x).double()
    assert y.dtype == torch.float64 and torch.isin(y.abs(), grid).all()
    # nearest: no grid value is strictly closer than the chosen one
    idx = torch.searchsorted(grid, x.double().abs().clamp(max=E5M6_MAX))
    lo, hi = grid[(idx - 1).clamp(min=0)], grid[idx.clamp(max=len(grid) - 1)]
    best = torch.minimum((x.double().abs() - lo).abs(), (x.double().abs() - hi).abs())
    assert ((y.abs() - x.double().abs().clamp(max=E5M6_MAX)).abs() <= best).all()
    assert round_to_e5m6(torch.tensor([1e9, -1e9])).tolist() == [E5M6_MAX, -E5M6_MAX]


def test_e5m6_cache_is_finer_than_e4m3():
    x = torch.randn(64, 384)
    e5, s5 = quantize_tiles_e5m6(x)
    e4, s4 = quantize_tiles(x, pow2=True)
    assert e5.dtype == torch.float16 and (torch.frexp(s5)[0] == 0.5).all()
    torch.testing.assert_close(s5, s4, rtol=0, atol=0)  # one scale serves both copies
    err5 = (dequantize_tiles(e5, s5) - x).norm() / x.norm()
    err4 = (dequantize_tiles(e4, s4) - x).norm() / x.norm()
    assert err5 < err4 / 6  # 3 more mantissa bits: ~8x finer
