"""The numbers behind docs/fp8.md: why each FP8 design choice is there, measured.

    .venv/bin/python -m dsv3.fp8.study          # ~1 min on 2 CPU cores

1. GEMM error against FP64 (DeepGEMM's `1 - 2 sum(xy) / sum(x^2 + y^2)`), shapes incl. K = 4096 and
   M, N, K not multiples of 128.
2. Promotion (§3.3.2): accumulation error of a ~14-bit accumulator with and without promotion to
   FP32 every 128 elements, against the exact product of the same FP8 operands, K = 512 ... 8192.
3. Activation outliers: one scale per tensor vs 1x128 tiles, outlier factors 1 ... 1e5.
4. The linear layer: output, input-gradient and weight-gradient agreement with FP32 for the recipe's
   variants (plain, power-of-2 scales, E5M6 cache, BF16 baseline).
5. The optimizer: BF16 moments vs torch.optim.AdamW on a toy regression.
Every figure comes from a fixed seed; the tests (tests/test_fp8_*.py) assert the properties.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.fp8.gemm import fp8_gemm, limited_acc_gemm
from dsv3.fp8.linear import linear
from dsv3.fp8.operand import GemmConfig
from dsv3.fp8.quant import E4M3, dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def rel_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def gemm_errors() -> list[str]:
    rows = ["| M x N x K | diff, B in 128x128 blocks | diff, B in 1x128 tiles (Wgrad layout) |"]
    rows.append("|---|---|---|")
    for M, N, K in [(128, 128, 4096), (77, 300, 4096), (200, 130, 1000), (256, 384, 512), (1, 5, 129)]:
        torch.manual_seed(0)
        a, b = torch.randn(M, K), torch.randn(N, K)
        ref = a.double() @ b.double().T
        qa, sa = quantize_tiles(a)
        d_blocks = calc_diff(fp8_gemm(qa, sa, *quantize_blocks(b), torch.float32), ref)
        d_tiles = calc_diff(fp8_gemm(qa, sa, *quantize_tiles(b), torch.float32), ref)
        rows.append(f"| {M} x {N} x {K} | {d_blocks:.2e} | {d_tiles:.2e} |")
    return rows


def promotion() -> list[str]:
    rows = [
        "| K | 14-bit acc., no promotion | 14-bit acc., promoted every 128 | FP32 reference (CPU) | "
        "no promotion / promoted | end-to-end rel. error, |N(0,1)| data: no promotion / promoted |",
        "|---|---|---|---|---|---|",
    ]
    for K in (512, 1024, 2048, 4096, 8192):
        torch.manual_seed(0)
        qa, sa = quantize_tiles(torch.randn(64, K))
        qb, sb = quantize_blocks(torch.randn(64, K))
        exact = dequantize_tiles(qa, sa).double() @ dequantize_blocks(qb, sb).double().T
        none = rel_l2(limited_acc_gemm(qa, sa, qb, sb), exact)
        p128 = rel_l2(limited_acc_gemm(qa, sa, qb, sb, interval=128), exact)
        fp32 = rel_l2(fp8_gemm(qa, sa, qb, sb, torch.float32), exact)
        # positive data: the truncation bias adds up instead of cancelling, as in the paper's ~2%
        a, b = torch.randn(64, K).abs(), torch.randn(64, K).abs()
        ref = a.double() @ b.double().T
        pa, psa = quantize_tiles(a)
        pb, psb = quantize_blocks(b)
        e2e_none = rel_l2(limited_acc_gemm(pa, psa, pb, psb), ref)
        e2e_p128 = rel_l2(limited_acc_gemm(pa, psa, pb, psb, interval=128), ref)
        e2e = f"{e2e_none:.2e} / {e2e_p128:.2e}"
        rows.append(f"| {K} | {none:.2e} | {p128:.2e} | {fp32:.2e} | {none / p128:.1f}x | {e2e} |")
    return rows


def outliers() -> list[str]:
    rows = [
        "| outlier factor | pattern | rel. error, 1x128 tiles | rel. error, one scale per tensor | ratio | "
        "flushed to 0: tiles / tensor |",
        "|---|---|---|---|---|---|",
    ]
    M, K = 256, 1024
    for factor in (1.0, 1e2, 1e3, 1e4, 1e5):
        for pattern in ("4 channels, all tokens", "4 channels x 4 tokens"):
            torch.manual_seed(1)
            x = torch.randn(M, K)
            channels = torch.randperm(K)[:4]
            tokens = torch.arange(M) if pattern.endswith("all tokens") else torch.randperm(M)[:4]
            x[tokens[:, None], channels] *= factor
            ordinary = torch.ones(M, K, dtype=torch.bool)
            ordinary[tokens[:, None], channels] = False
            tiled = dequantize_tiles(*quantize_tiles(x))
            scale = x.abs().max() / 448.0
            tensor = (x / scale).clamp(-448, 448).to(E4M3).float() * scale
            e_t, e_s = rel_l2(tiled[ordinary], x[ordinary]), rel_l2(tensor[ordinary], x[ordinary])
            z_t, z_s = ((t[ordinary] == 0).float().mean().item() for t in (tiled, tensor))
            zeros = f"{z_t:.2%} / {z_s:.2%}"
            rows.append(f"| {factor:.0e} | {pattern} | {e_t:.4f} | {e_s:.4f} | {e_s / e_t:.2f}x | {zeros} |")
    return rows


def linear_agreement() -> list[str]:
    rows = [
        "| recipe | cos(y) | cos(dx) | cos(dW) | rel. error dW |",
        "|---|---|---|---|---|",
    ]
    torch.manual_seed(0)
    x = torch.randn(512, 384, requires_grad=True)
    w = (torch.randn(256, 384) * 0.05).requires_grad_()
    dy = torch.randn(512, 256)
    ref = F.linear(x, w)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), dy)
    configs = {
        "FP8, arbitrary scales (default)": GemmConfig(),
        "FP8, pow2 input scales": GemmConfig(pow2_input=True),
        "FP8, pow2 + E5M6 cache (o_proj)": GemmConfig(pow2_input=True, cache_e5m6=True),
        "FP8, pow2 output-grad scales": GemmConfig(pow2_grad=True),
        "BF16 (emulated)": GemmConfig(fp8=False),
    }
    cos = lambda a, b: F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()  # noqa: E731
    for name, cfg in configs.items():
        y = linear(x, w, cfg)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        cosines = f"{cos(y, ref):.5f} | {cos(dx, ref_dx):.5f} | {cos(dw, ref_dw):.5f}"
        rows.append(f"| {name} | {cosines} | {rel_l2(dw, ref_dw):.4f} |")
    return rows


def optimizer_agreement() -> list[str]:
    from dsv3.optim import MixedPrecisionAdamW

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g)
    Y = X @ torch.randn(32, 8, generator=g) + 0.1 * torch.randn(256, 8, generator=g)

    def run(opt_cls, dtype=torch.float32, **kw):
        torch.manual_seed(1)
        w = torch.nn.Parameter((0.1 * torch.randn(32, 8)).to(dtype))
        opt = opt_cls([w], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **kw)
        for _ in range(300):
            loss = ((X.to(dtype) @ w - Y.to(dtype)).float() ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return w.detach().float(), loss.item()

    w_ref, l_ref = run(torch.optim.AdamW)
    rows = ["| optimizer (300 steps) | final loss | weight rel. diff vs torch.optim.AdamW |", "|---|---|---|"]
    fp32_moments = {"moment_dtype": torch.float32}
    for name, opt_cls, dtype, kw in [
        ("torch.optim.AdamW, FP32", torch.optim.AdamW, torch.float32, {}),
        ("MixedPrecisionAdamW, FP32 moments", MixedPrecisionAdamW, torch.float32, fp32_moments),
        ("MixedPrecisionAdamW, BF16 moments, FP32 params", MixedPrecisionAdamW, torch.float32, {}),
        ("MixedPrecisionAdamW, BF16 moments, BF16 params + master", MixedPrecisionAdamW, torch.bfloat16, {}),
        ("torch.optim.AdamW on BF16 params (no master)", torch.optim.AdamW, torch.bfloat16, {}),
    ]:
        w, loss = run(opt_cls, dtype, **kw)
        rows.append(f"| {name} | {loss:.5f} | {rel_l2(w, w_ref):.2e} |")
    return rows


def main() -> None:
    torch.set_num_threads(1)
    for title, fn in [
        ("GEMM error vs FP64 (1x128 activation tiles)", gemm_errors),
        ("Accumulation error vs the exact FP8 product (64 x 64 outputs, N(0,1) data)", promotion),
        ("Quantisation error of the ordinary values next to activation outliers", outliers),
        ("Linear layer vs FP32 (512 x 384 -> 256)", linear_agreement),
        ("Optimizer on a toy regression (lr 1e-2, betas 0.9/0.95, wd 0.1)", optimizer_agreement),
    ]:
        print(f"\n### {title}\n")
        print("\n".join(fn()))


if __name__ == "__main__":
    main()
