"""Fp8Linear and the fused FP8 SwiGLU: agreement with high-precision references, the exact FP8
recipe in each GEMM, and what is really cached for backward (dtype and bytes)."""

import pytest
import torch
import torch.nn.functional as F

from dsv3.fp8 import GemmConfig, fp8_gemm, linear, swiglu_experts
from dsv3.fp8.linear import Fp8Linear
from dsv3.fp8.quant import E4M3, dequantize_tiles, quantize_blocks, quantize_tiles

CONFIGS = {
    "plain": GemmConfig(),
    "attn_out": GemmConfig(pow2_input=True, cache_e5m6=True),
    "pow2_grad": GemmConfig(pow2_grad=True),
}


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def saved_tensors(fn):
    """Run fn() and return every tensor autograd saved for backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _linear_case(shape=(3, 50, 300), N=200):
    x = torch.randn(shape, requires_grad=True)
    w = (torch.randn(N, shape[-1]) * 0.05).requires_grad_()
    dy = torch.randn(*shape[:-1], N)
    return x, w, dy


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp8_linear_agrees_with_high_precision_linear(name):
    x, w, dy = _linear_case()
    ref = F.linear(x, w)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), dy)
    y = linear(x, w, CONFIGS[name])
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert y.shape == ref.shape and y.dtype == x.dtype and dw.dtype == torch.float32
    for got, want in ((y, ref), (dx, ref_dx), (dw, ref_dw)):
        assert cos(got, want) >= 0.99


def test_fp8_linear_runs_the_fp8_recipe_in_each_gemm():
    """Fprop, Dgrad and Wgrad are exactly the block-scaled GEMMs of the recipe (the reference path)."""
    x, w, dy = _linear_case((64, 300), 200)
    y = linear(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xq, sx = quantize_tiles(x.detach())
    wq, sw = quantize_blocks(w.detach())
    torch.testing.assert_close(y, fp8_gemm(xq, sx, wq, sw).float(), rtol=0, atol=0)
    torch.testing.assert_close(dx, fp8_gemm(*quantize_tiles(dy), wq.t(), sw.t()).float(), rtol=0, atol=0)
    x_cached = dequantize_tiles(xq, sx)  # Wgrad re-tiles the FP8 cache as 128x1 tiles
    dw_ref = fp8_gemm(*quantize_tiles(dy.t()), *quantize_tiles(x_cached.t()), out_dtype=torch.float32)
    torch.testing.assert_close(dw, dw_ref, rtol=0, atol=0)


def test_input_is_cached_in_fp8_not_in_high_precision():
    x, w, _ = _linear_case((256, 384), 128)
    _, saved = saved_tensors(lambda: linear(x, w))
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].dtype == E4M3  # the only copy of x kept is FP8 ...
    assert big[0].untyped_storage().nbytes() == x.numel()  # ... at one byte per value
    scales = [t for t in saved if t.numel() == x.numel() // 128]
    assert len(scales) == 1 and scales[0].dtype == torch.float32  # + one FP32 scale per 128 values
    assert any(t is w for t in saved)  # the parameter itself, re-quantised in backward (no copy)


def test_attention_output_input_is_cached_in_e5m6_with_pow2_scales():
    x, w, dy = _linear_case((256, 384), 128)
    _, saved = saved_tensors(lambda: linear(x, w, CONFIGS["attn_out"]))
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].dtype == torch.float16  # E5M6 values held in FP16 (emulated)
    assert torch.equal(big[0].float(), big[0].float())  # no NaN
    mantissa_bits = (big[0].view(torch.int16) & 0x3FF) & 0xF  # FP16 has 10 mantissa bits; E5M6 keeps 6
    assert (mantissa_bits == 0).all()
    scales = [t for t in saved if t.numel() == x.numel() // 128][0]
    assert (torch.frexp(scales)[0] == 0.5).all()
    # Wgrad re-tiles this cache as 128x1 without a second rounding step, so its weight gradient is
    # more accurate than the default path's (E4M3 cache, arbitrary scales, rounded twice)
    ref_dw = torch.autograd.grad(F.linear(x, w), w, dy)[0]
    errors = {}
    for name in ("attn_out", "plain"):
        dw = torch.autograd.grad(linear(x, w, CONFIGS[name]), w, dy)[0]
        errors[name] = ((dw - ref_dw).norm() / ref_dw.norm()).item()
    assert errors["attn_out"] < 0.95 * errors["plain"]


def test_fp8_linear_module_keeps_nn_linear_interface():
    lin = torch.nn.Linear(300, 200, bias=True)
    fp8 = Fp8Linear.from_linear(lin, GemmConfig())
    assert isinstance(fp8, torch.nn.Linear) and fp8.weight is lin.weight and fp8.bias is lin.bias
    assert list(fp8.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 7, 300)
    assert cos(fp8(x), lin(x)) > 0.999


def _experts_case(counts, D=256, H=160):
    E, M = len(counts), sum(counts)
    x = torch.randn(M, D, requires_grad=True)
    w1, w3 = ((torch.randn(E, D, H) * 0.05).requires_grad_() for _ in range(2))
    w2 = (torch.randn(E, H, D) * 0.05).requires_grad_()
    return x, w1, w3, w2, torch.randn(M, D)


def _experts_ref(x, w1, w3, w2, counts):
    out, start = [], 0
    for i, c in enumerate(counts):
        xe = x[start : start + c]
        out.append((F.silu(xe @ w1[i]) * (xe @ w3[i])) @ w2[i])
        start += c
    return torch.cat(out)


@pytest.mark.parametrize("cfg", [GemmConfig(), GemmConfig(pow2_input=True, pow2_grad=True)])
def test_fp8_experts_agree_with_reference(cfg):
    counts = [100, 0, 37, 200]  # uneven, one expert idle, none a multiple of 128
    x, w1, w3, w2, dy = _experts_case(counts)
    ref = _experts_ref(x, w1, w3, w2, counts)
    ref_grads = torch.autograd.grad(ref, (x, w1, w3, w2), dy)
    y = swiglu_experts(x, w1, w3, w2, counts, cfg)
    grads = torch.autograd.grad(y, (x, w1, w3, w2), dy)
    assert cos(y, ref) >= 0.99
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and cos(got, want) >= 0.99
    assert all((g[1] == 0).all() for g in grads[1:])  # the idle expert gets no gradient


def test_bf16_recipe_experts_match_reference_to_bf16_precision():
    counts = [50, 70]
    x, w1, w3, w2, dy = _experts_case(counts)
    y = swiglu_experts(x, w1, w3, w2, counts, GemmConfig(fp8=False))
    assert cos(y, _experts_ref(x, w1, w3, w2, counts)) > 0.9999


def test_swiglu_caches_fp8_inputs_and_recomputes_its_output():
    counts = [128, 128]
    x, w1, w3, w2, _ = _experts_case(counts)
    _, saved = saved_tensors(lambda: swiglu_experts(x, w1, w3, w2, counts))
    M, D, H = x.shape[0], x.shape[1], w1.shape[-1]
    fp8 = sorted(tuple(t.shape) for t in saved if t.dtype == E4M3)
    assert fp8 == [(M, H), (M, H), (M, D)]  # x, and the SwiGLU inputs g = x W1 and u = x W3
    wide = [t for t in saved if t.dtype != E4M3 and t.numel() >= M * min(D, H) and t.dim() == 2]
    assert not wide  # neither h = silu(g) * u nor any high-precision activation is kept
    assert sum(t.untyped_storage().nbytes() for t in saved if t.dtype == E4M3) == M * (D + 2 * H)


def test_swiglu_experts_checks_counts():
    x, w1, w3, w2, _ = _experts_case([10, 10])
    with pytest.raises(ValueError, match="counts"):
        swiglu_experts(x, w1, w3, w2, [10, 9])
