"""dsv3.bf16: BF16 GEMMs on FP32 kernels compute what a BF16 GEMM computes (BF16 operands, FP32
accumulation, BF16 result), forward and backward, and swapping them in changes nothing else."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import ModelConfig, Transformer, bf16
from dsv3.fp8 import convert as fp8_convert
from dsv3.fp8.linear import Fp8Linear
from dsv3.model.moe import GroupedExperts

BF = torch.bfloat16


def _bf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).to(BF)


def test_linear_forward_and_backward_are_fp32_accumulations_of_bf16_operands():
    x, w, dy = _bf(3, 5, 96), _bf(40, 96), _bf(3, 5, 40)
    lin = bf16.Bf16Linear.from_linear(nn.Linear(96, 40, bias=False).to(BF))
    lin.weight.data.copy_(w)
    xr = x.clone().requires_grad_()
    y = lin(xr)
    y.backward(dy)
    # reference: FP64 products of the (exact) BF16 values, rounded to BF16 once; FP32 accumulation
    # may differ from FP64 in the last FP32 bits, which can flip a BF16 rounding by one ulp
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    assert y.dtype == BF and lin.weight.grad.dtype == BF and xr.grad.dtype == BF
    ulp = 2.0**-7
    ref = x64 @ w64.t()
    assert ((y.double() - ref).abs() <= ulp * ref.abs() + 1e-30).all()
    ref_dx = dy64 @ w64
    assert ((xr.grad.double() - ref_dx).abs() <= ulp * ref_dx.abs() + 1e-30).all()
    ref_dw = dy64.reshape(-1, 40).t() @ x64.reshape(-1, 96)
    assert ((lin.weight.grad.double() - ref_dw).abs() <= ulp * ref_dw.abs() + 1e-30).all()
    # and exactly what the FP32 kernel gives on the widened operands
    assert torch.equal(y, F.linear(x.float(), w.float()).to(BF))


def test_linear_with_bias_and_fp32_tensors_matches_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(16, 8)
    lin = bf16.Bf16Linear.from_linear(copy.deepcopy(ref))
    x = torch.randn(4, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref(x).square().sum().backward()
    lin(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("counts", [[5, 0, 7, 4], [0, 0, 16, 0], [2, 3, 1, 2]])
def test_grouped_experts_match_per_expert_loop_forward_and_backward(counts):
    torch.manual_seed(0)
    E, D, H = 4, 32, 16
    ref = GroupedExperts(E, D, H)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.2)
    ref = ref.to(BF)
    ours = bf16.Bf16GroupedExperts.from_experts(copy.deepcopy(ref))
    counts = torch.tensor(counts)
    x = _bf(int(counts.sum()), D)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = _bf(x.shape[0], D)

    # reference in FP32 arithmetic on the same BF16 values, one expert at a time
    w1, w3, w2 = (p.detach().float().requires_grad_() for p in (ref.w1, ref.w3, ref.w2))
    xf = x.float().requires_grad_()
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        rows = xf[start : start + c]
        outs.append((F.silu(rows @ w1[e]) * (rows @ w3[e])) @ w2[e])
        start += c
    y_ref = torch.cat(outs)
    y_ref.backward(dy.float())

    y = ours(xo, counts)
    y.backward(dy)
    assert y.dtype == BF and xo.grad.dtype == BF and ours.w1.grad.dtype == BF

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        # BF16 rounding of the intermediate h and of the results: ~2^-8 of the tensor's scale
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max() + 1e-6

    close(y, y_ref)
    close(xo.grad, xf.grad)
    for mine, theirs in ((ours.w1, w1), (ours.w3, w3), (ours.w2, w2)):
        close(mine.grad, theirs.grad)
    # the native BF16 kernels agree to BF16 precision as well
    ref(xr, counts).backward(dy)
    close(y, ref(x, counts))
    close(xo.grad, xr.grad)


def test_convert_swaps_every_gemm_module_and_keeps_parameters_and_keys():
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg).to(BF)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    bf16.convert(model)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not any(type(m) in (nn.Linear, GroupedExperts) for m in model.modules())
    assert isinstance(model.lm_head, bf16.Bf16Linear)
    assert sum(isinstance(m, bf16.Bf16GroupedExperts) for m in model.modules()) == len(model.moe_layers())


def test_convert_leaves_fp8_modules_alone():
    model = fp8_convert(Transformer(ModelConfig.from_preset("tiny")))
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    bf16.convert(model)
    assert fp8 and all(type(dict(model.named_modules())[n]) is Fp8Linear for n in fp8)


def test_converted_bf16_model_matches_the_native_bf16_model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    fp32 = Transformer(cfg)
    native = copy.deepcopy(fp32).to(BF).train()
    ours = bf16.convert(copy.deepcopy(native))
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    l32, ln, lo = (m.loss(ids) for m in (fp32, native, ours))
    for out in (l32, ln, lo):
        out.total.backward()
    # both BF16 versions are within BF16 noise of FP32, and of each other
    assert abs(lo.total.item() - l32.total.item()) < 2e-2 * l32.total.item()
    assert abs(lo.total.item() - ln.total.item()) < 2e-2 * ln.total.item()
    # the whole gradient: BF16 rounding moves a near-tied token to another expert now and then,
    # which changes that expert's gradient wholesale (up to 0.76 of its max on some seeds), so the
    # bound is on the full vector's norm (0.007-0.049 relative to FP32 over 8 seeds, measured)
    g32, gn, go = (
        torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])
        for m in (fp32, native, ours)
    )
    assert (go - g32).norm() <= 0.1 * g32.norm()
    assert (gn - g32).norm() <= 0.1 * g32.norm()
    assert (go - gn).norm() <= 0.02 * g32.norm()  # the same BF16 numerics (0 to 0.004 measured)


def test_needed_is_false_off_cpu():
    assert bf16.needed("meta") is False
    assert bf16.needed("cpu") == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())
