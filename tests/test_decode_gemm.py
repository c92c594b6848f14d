"""The many-row GEMMs of the fast decode path (dsv3.infer.decode.gemm) held to plain torch: oneDNN's
packed weights in FP32 (the products of x @ w up to the order of the sums) and BF16 (as ATen's BF16
GEMM), with the residual, in place, per expert with empty experts, on strided views; the packed
copies are made once; the choice falls back to ATen where packing is turned off."""

import pytest
import torch

from dsv3.infer.decode import gemm as gemm_lib
from dsv3.infer.decode.gemm import Aten, Bf16Gemm, Packed, WidenOnce, many_row_gemm

G = torch.Generator().manual_seed(3)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> bool:
    return (got - want).abs().max().item() <= rel * want.abs().max().item()


def test_bf16_gemm_multiplies_bf16_weights_in_bf16():
    x, w, bias = (
        torch.randn(8, 64, generator=G),
        torch.randn(64, 32, generator=G).bfloat16(),
        torch.randn(8, 32),
    )
    k = Bf16Gemm()
    assert torch.equal(k.mm(x, w), (x.bfloat16() @ w).float())
    assert torch.equal(k.mm(x, w, bias), (x.bfloat16() @ w).float() + bias)
    out = bias.clone()
    k.addmm_(out, x, w, 0.5)
    assert torch.allclose(out, bias + 0.5 * (x.bfloat16() @ w).float())
    assert torch.equal(k.mm(x, w.float()), Aten().mm(x, w.float()))  # FP32 weights: ATen's


@pytest.fixture
def packing():
    if why := gemm_lib.why_not_packed():
        pytest.skip(why)


@pytest.mark.parametrize("rows", [5, 16, 64, 300])  # 300: multiplied as 304 rows (a bucketed count)
def test_packed_fp32_is_x_at_w(packing, rows):
    x, w, bias = torch.randn(rows, 96, generator=G), torch.randn(96, 200, generator=G), torch.randn(rows, 200)
    k = Packed()
    want = x.double() @ w.double()
    assert _close(k.mm(x, w).double(), want, 1e-6)
    assert _close(k.mm(x, w, bias).double(), want + bias.double(), 1e-6)  # the residual, fused
    out = bias.clone()
    k.addmm_(out, x, w, 0.5)
    assert _close(out.double(), bias.double() + 0.5 * want, 1e-6)
    view = w[:, 7:150]  # a strided view of a weight (the head's first columns)
    assert _close(k.mm(x, view).double(), want[:, 7:150], 1e-6)
    xs = torch.randn(rows, 120, generator=G)[:, 10:106]  # a strided input (a slice of a fused output)
    assert _close(k.mm(xs, w).double(), xs.double() @ w.double(), 1e-6)
    assert len(k._packed) == 2  # w and its view, each packed once however often used
    k.clear()
    assert not k._packed


def test_packed_widens_bf16_weights_exactly_without_bf16_gemms(packing):
    x, w = torch.randn(12, 64, generator=G), torch.randn(64, 48, generator=G).bfloat16()
    got = Packed(bf16=False).mm(x, w)
    assert got.dtype == torch.float32 and _close(got.double(), x.double() @ w.double(), 1e-6)


@pytest.mark.parametrize("rows", [32, 37])  # 37: multiplied as 38 rows (a bucketed count), one dropped
def test_packed_bf16_is_a_bf16_gemm(rows):
    if why := gemm_lib.why_not_packed(bf16=True):
        pytest.skip(why)
    x, w = torch.randn(rows, 256, generator=G), torch.randn(256, 128, generator=G).bfloat16()
    got = Packed(bf16=True).mm(x, w)
    want = (x.bfloat16() @ w).float()  # ATen's BF16 GEMM: BF16 inputs, FP32 sums, a BF16 result
    assert got.dtype == torch.float32 and _close(got, want, 1e-2)
    assert _close(got.double(), x.double() @ w.double(), 2e-2)


@pytest.mark.parametrize("kind", ["aten", "widened", "bf16", "packed", "packed-bf16"])
@pytest.mark.parametrize("counts", [[3, 0, 6, 1, 0], [3, 0, 37, 1, 70]], ids=["few", "bucketed"])
def test_grouped_is_one_product_per_expert(kind, counts):
    """Experts without rows included; with more than 32 rows an expert's GEMM takes a bucketed row
    count (`bucketed`: 37 -> 38 reads a row of the next expert, 70 -> 72 two rows past the end)."""
    if kind.startswith("packed") and (why := gemm_lib.why_not_packed(bf16=kind == "packed-bf16")):
        pytest.skip(why)
    make = {"aten": Aten, "widened": WidenOnce, "bf16": Bf16Gemm, "packed": Packed,
            "packed-bf16": lambda: Packed(bf16=True)}  # fmt: skip
    k = make[kind]()
    E = len(counts)
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    x, w = torch.randn(sum(counts), 32, generator=G), torch.randn(E, 32, 24, generator=G)
    if kind in ("widened", "bf16", "packed-bf16"):
        w = w.bfloat16()
    got = k.grouped(x, w, starts)
    want = torch.cat([x[starts[e] : starts[e + 1]].double() @ w[e].double() for e in range(E)])
    assert got.shape == (sum(counts), 24) and got.dtype == x.dtype
    assert _close(got.double(), want, 2e-2 if "bf16" in kind else 1e-6)


@pytest.mark.parametrize("kind", ["aten", "widened", "bf16", "packed", "packed-bf16"])
def test_bmm_is_one_product_per_group(kind):
    """MLA's per-head W_UK / W_UV on strided views of the query (as the decode step passes them):
    FP32 products on a kept FP32 copy where BF16 GEMMs do not run (`widened`, `packed`), BF16 ones
    (the rows rounded) with them."""
    if kind.startswith("packed") and (why := gemm_lib.why_not_packed(bf16=kind == "packed-bf16")):
        pytest.skip(why)
    make = {"aten": Aten, "widened": WidenOnce, "bf16": Bf16Gemm, "packed": Packed,
            "packed-bf16": lambda: Packed(bf16=True)}  # fmt: skip
    k = make[kind]()
    q = torch.randn(6, 4, 40, generator=G)  # (rows, heads, nope | rope)
    x, w = q[..., :32].transpose(0, 1), torch.randn(4, 32, 24, generator=G)  # (heads, rows, 32)
    if kind != "aten":
        w = w.bfloat16()
    rounded = x.bfloat16() if kind in ("bf16", "packed-bf16") else x
    got = k.bmm(x, w)
    assert got.shape == (4, 6, 24) and got.dtype == x.dtype
    assert _close(got.double(), rounded.double() @ w.double(), 1e-2 if "bf16" in kind else 1e-6)
    assert torch.equal(k.bmm(x, w), got)  # the kept copy gives the same product


def test_many_row_gemm_choice(monkeypatch):
    monkeypatch.setenv("DSV3_ONEDNN_PACKED", "0")
    assert gemm_lib.why_not_packed() == "DSV3_ONEDNN_PACKED=0"
    assert isinstance(many_row_gemm(True, False), WidenOnce)
    assert isinstance(many_row_gemm(True, True), Bf16Gemm)
    assert type(many_row_gemm(False, False)) is Aten
    monkeypatch.delenv("DSV3_ONEDNN_PACKED")
    if gemm_lib.why_not_packed() is None:
        assert isinstance(many_row_gemm(False, False), Packed)
        assert isinstance(many_row_gemm(True, False, packed=False), WidenOnce)
