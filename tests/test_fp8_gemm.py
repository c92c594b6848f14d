"""Block-scaled FP8 GEMM: accuracy against FP64 (DeepGEMM's measure), the reference and fast paths
agree, promotion matters at K = 4096, and fine-grained scales resist activation outliers."""

import pytest
import torch

from dsv3.fp8.gemm import bf16_gemm, fp8_gemm, limited_acc_gemm
from dsv3.fp8.quant import E4M3, dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's test metric: 1 - 2 sum(x y) / sum(x^2 + y^2), in FP64."""
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def rel_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


SHAPES = [(128, 128, 4096), (77, 300, 4096), (200, 130, 1000), (1, 5, 129), (256, 384, 512)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("b_layout", ["blocks", "tiles"])
def test_fp8_gemm_error_against_fp64(M, N, K, b_layout):
    a, b = torch.randn(M, K), torch.randn(N, K)
    qa, sa = quantize_tiles(a)
    qb, sb = quantize_blocks(b) if b_layout == "blocks" else quantize_tiles(b)  # Fprop/Dgrad vs Wgrad
    assert sb.shape[0] == (N if b_layout == "tiles" else -(-N // 128))
    ref = a.double() @ b.double().T
    out = fp8_gemm(qa, sa, qb, sb, out_dtype=torch.float32)
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert calc_diff(out, ref) < 1e-3
    assert fp8_gemm(qa, sa, qb, sb).dtype == torch.bfloat16  # the kernel's default output


@pytest.mark.parametrize("M,N,K", [(77, 300, 4096), (200, 130, 1000), (3, 260, 129)])
def test_blocked_reference_and_fast_path_agree_with_exact_block_sum(M, N, K):
    """sum_k (A_k B_k^T) sa_k sb_k, written out in FP64 block by block, is what both backends compute."""
    qa, sa = quantize_tiles(torch.randn(M, K))
    qb, sb = quantize_blocks(torch.randn(N, K))
    exact = torch.zeros(M, N, dtype=torch.float64)
    for k in range(sa.shape[1]):
        cols = slice(128 * k, 128 * (k + 1))
        block = qa[:, cols].double() @ qb[:, cols].double().T  # exact: E4M3 products and sums in FP64
        sb_rows = sb[:, k].double().repeat_interleave(128)[:N]
        exact += block * sa[:, k, None].double() * sb_rows[None, :]
    blocked = fp8_gemm(qa, sa, qb, sb, torch.float32, backend="blocked")
    fast = fp8_gemm(qa, sa, qb, sb, torch.float32, backend="dequant")
    assert rel_l2(blocked, exact) < 1e-6 and rel_l2(fast, exact) < 1e-6
    with pytest.raises(ValueError, match="backend"):
        fp8_gemm(qa, sa, qb, sb, backend="cublas")


def test_scale_shapes_are_checked():
    qa, sa = quantize_tiles(torch.randn(300, 256))
    qb, sb = quantize_blocks(torch.randn(200, 256))
    with pytest.raises(ValueError, match="scale"):
        fp8_gemm(qa, sa[:10], qb, sb)
    with pytest.raises(ValueError, match="K blocks"):
        fp8_gemm(qa, sa[:, :1], qb, sb)


def test_promotion_cuts_accumulation_error_at_k4096():
    """§3.3.2: a ~14-bit accumulator over K = 4096 loses precision; promoting to FP32 every 128
    elements fixes it. Errors are against the exact product of the same FP8 operands, so they measure
    accumulation alone (the quantisation error is common to all three and would hide it)."""
    errors = {}
    for K in (512, 4096):
        qa, sa = quantize_tiles(torch.randn(64, K))
        qb, sb = quantize_blocks(torch.randn(64, K))
        exact = dequantize_tiles(qa, sa).double() @ dequantize_blocks(qb, sb).double().T
        errors[K] = {
            "no_promotion": rel_l2(limited_acc_gemm(qa, sa, qb, sb, interval=None), exact),
            "promote_128": rel_l2(limited_acc_gemm(qa, sa, qb, sb, interval=128), exact),
            "fp32": rel_l2(fp8_gemm(qa, sa, qb, sb, torch.float32), exact),
        }
    e = errors[4096]
    assert e["no_promotion"] >= 10 * e["promote_128"]  # Hopper's accumulator, with vs without promotion
    assert e["promote_128"] >= 100 * e["fp32"]  # the CPU reference is more accurate inside a block
    assert errors[4096]["no_promotion"] > 4 * errors[512]["no_promotion"]  # grows with K ...
    assert errors[4096]["promote_128"] < 1.5 * errors[512]["promote_128"]  # ... unless promoted
    with pytest.raises(ValueError, match="interval"):
        limited_acc_gemm(qa, sa, qb, sb, interval=100)


def _per_tensor_roundtrip(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().max() / 448.0
    return (x / scale).clamp(-448, 448).to(E4M3).float() * scale


def test_tiles_contain_activation_outliers_that_a_tensor_scale_spreads():
    """A few tokens carry a few channels 10^f larger (the "massive activation" pattern). One scale
    per tensor pushes every other value toward E4M3's subnormals; with 1x128 tiles the values of the
    tiles without an outlier are quantised exactly as if there were none. E4M3's range (2^17) absorbs
    1000x with a modest loss; the gap opens beyond, and at 1e5 the per-tensor scale flushes a third
    of the ordinary values to zero."""
    M, K = 256, 1024
    result = {}
    for factor in (1.0, 1e3, 1e5):
        torch.manual_seed(1)
        x = torch.randn(M, K)
        tokens, channels = torch.randperm(M)[:4], torch.randperm(K)[:4]
        x[tokens[:, None], channels] *= factor
        hit = torch.zeros(M, K, dtype=torch.bool)
        hit[tokens[:, None], channels] = True
        ordinary = ~hit.view(M, K // 128, 128).any(-1, keepdim=True).expand(-1, -1, 128).reshape(M, K)
        tiled = dequantize_tiles(*quantize_tiles(x))[ordinary]
        tensor = _per_tensor_roundtrip(x)[ordinary]
        result[factor] = dict(
            tiled=tiled,
            tile=rel_l2(tiled, x[ordinary]),
            tensor=rel_l2(tensor, x[ordinary]),
            tensor_zeros=(tensor == 0).float().mean().item(),
        )
    for f in (1e3, 1e5):
        assert torch.equal(result[f]["tiled"], result[1.0]["tiled"])  # untouched by the outliers
    assert result[1e3]["tensor"] > result[1e3]["tile"] and result[1e3]["tensor_zeros"] > 1e-3
    assert result[1e5]["tensor"] > 5 * result[1e5]["tile"] and result[1e5]["tensor_zeros"] > 0.2


def test_bf16_gemm_emulates_fp32_accumulation():
    a, b = torch.randn(64, 2048), torch.randn(32, 2048)
    exact = a.bfloat16().double() @ b.bfloat16().double().T  # BF16 operands, exact accumulation
    out = bf16_gemm(a, b)
    assert out.dtype == torch.bfloat16
    # only the final rounding to BF16 remains: half a BF16 ulp, 2^-9 relative
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8).all()
    assert rel_l2(out, exact) < 2**-9
