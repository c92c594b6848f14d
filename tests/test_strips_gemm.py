"""dsv3's many-row AVX2 products (csrc/streamed.h `strips_product`, dsv3.infer.decode.gemm.Strips)
held to plain torch: FP32 rows times FP32 or BF16 weights against float64 products, for row counts
around the register tile's groups (1-6 rows a group, 8 rows as 4 + 4), inputs around the 256-row
blocks, outputs that are not multiples of the 16-column strips, V3's geometry, the residual, the
per-head products on the strided views the decode step passes; each output one chain over k in
order, so a row's result does not depend on the other rows or the thread count (bitwise); one-line
errors on bad inputs; where `many_row_gemm` picks it. The kernel needs AVX2 only, so these run on
every CPU the native kernels build on (decoding uses it where there is no AVX-512F)."""

import pytest
import torch

from dsv3.infer.decode import gemm as gemm_lib
from dsv3.infer.decode.gemm import STRIP_ROWS, Packed, Strips, many_row_gemm

G = torch.Generator().manual_seed(11)
BOUND = 1e-5  # relative to the largest output: FP32 FMA chains of K products against float64 sums


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 5, 6, 7, 8, 13, 16, 33, 70])
@pytest.mark.parametrize("k, n", [(8, 5), (300, 100), (513, 2176), (96, 48)])
def test_mm_is_the_product(native, dtype, rows, k, n):
    x = torch.randn(rows, k, generator=G)
    w = torch.randn(k, n, generator=G).to(dtype)
    packed = native.pack_strips(w)
    assert packed.shape == (1, (n + 15) // 16, k, 16)
    assert packed.dtype == (torch.int16 if dtype == torch.bfloat16 else torch.float32)
    y = native.strips_mm(x, packed, n)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    want = x.double() @ w.double()
    assert _rel(y, want) <= BOUND
    add = torch.randn(rows, n, generator=G)
    assert _rel(native.strips_mm(x, packed, n, add), want + add.double()) <= BOUND


def test_mm_on_one_671b_matrix(native):
    """V3's fused q_a | kv_a projection (7168 -> 1536 + 576), 8 rows, on a strided row view."""
    x = torch.randn(8, 7200, generator=G)[:, :7168]
    w = torch.randn(7168, 2112, generator=G) / 85
    assert _rel(native.strips_mm(x, native.pack_strips(w), 2112), x.double() @ w.double()) <= BOUND


def test_a_row_does_not_depend_on_the_others_or_the_threads(native):
    """Whatever the row groups (1 row alone, 7 as 3 + 4, 40 as 6 x 5 + 5 x 2) and the thread split
    (whole strips), each output is the same FMA chain over k: equal bitwise."""
    x = torch.randn(40, 600, generator=G)
    w = torch.randn(600, 333, generator=G)
    p = native.pack_strips(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.strips_mm(x[:1], p, 333)
        seven = native.strips_mm(x[:7], p, 333)
        forty = native.strips_mm(x, p, 333)
        torch.set_num_threads(2)
        forty2 = native.strips_mm(x, p, 333)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], seven[0]) and torch.equal(seven, forty[:7]) and torch.equal(forty, forty2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16, 33])
def test_bmm_per_head_on_the_decode_views(native, dtype, rows):
    """W_UK per head in V3's geometry ([128, 512], 4 heads) on the strided query view the decode step
    passes, then W_UV ([512, 128]) back."""
    q = torch.randn(rows, 4, 192, generator=G)  # (rows, heads, nope 128 | rope 64)
    w_uk = (torch.randn(4, 128, 512, generator=G) / 11).to(dtype)
    w_uv = (torch.randn(4, 512, 128, generator=G) / 22).to(dtype)
    x = q[..., :128].transpose(0, 1)  # (heads, rows, 128), not contiguous
    lat = native.strips_bmm(x, native.pack_strips(w_uk), 512)
    assert lat.shape == (4, rows, 512)
    assert _rel(lat, torch.stack([x[h].double() @ w_uk[h].double() for h in range(4)])) <= BOUND
    out = native.strips_bmm(lat, native.pack_strips(w_uv), 128)
    assert _rel(out, torch.stack([lat[h].double() @ w_uv[h].double() for h in range(4)])) <= BOUND


def _routed(rows: int, E: int, K: int) -> tuple[list[int], list[float]]:
    """K distinct experts of E per row (expert E - 1 chosen by nobody), and their gate values."""
    ids = [e for _ in range(rows) for e in torch.randperm(E - 1, generator=G)[:K].tolist()]
    return ids, (torch.rand(rows * K, generator=G) + 0.1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 8, 33, 130])
def test_experts_are_the_routed_sum(native, dtype, rows):
    """`Strips.experts_`: out += sum_j gate_j * w2[e] (silu(xn @ w1[e]) * (xn @ w3[e])) on the experts'
    strips, against float64 sums over the routed experts; widths off the 16-column strips and the
    64-column runs the threads split (D 100, hidden 40: w1 | w3 80 columns), an expert nobody chose, one
    chosen by every row (rows 1: each expert's rows a single one; 130: up to ~90 rows an expert)."""
    E, D, hid, K = 6, 100, 40, 3
    xn = torch.randn(rows, D, generator=G)
    w13 = (torch.randn(E, D, 2 * hid, generator=G) / 10).to(dtype)
    w2 = (torch.randn(E, hid, D, generator=G) / 6).to(dtype)
    ids, gates = _routed(rows, E, K)
    out = torch.randn(rows, D, generator=G)
    want = out.double().clone()
    for m in range(rows):
        for e, g in zip(ids[m * K : (m + 1) * K], gates[m * K : (m + 1) * K]):
            t = xn[m].double() @ w13[e].double()
            want[m] += g * (torch.nn.functional.silu(t[:hid]) * t[hid:]) @ w2[e].double()
    g = Strips(native)
    g.experts_(out, xn, w13, w2, ids, gates)
    assert _rel(out, want) <= BOUND
    assert len(g._strips) == 2  # w13's and w2's strips, packed once and kept
    g.experts_(torch.zeros(rows, D), xn, w13, w2, ids, gates)
    assert len(g._strips) == 2


def test_experts_do_not_depend_on_the_threads(native):
    """Each output column of an expert's product is one thread's FMA chain (whole strips per thread):
    the routed sum is the same bitwise with 1 and 2 threads."""
    E, D, hid, K, rows = 8, 256, 96, 2, 40
    xn = torch.randn(rows, D, generator=G)
    w13, w2 = torch.randn(E, D, 2 * hid, generator=G) / 16, torch.randn(E, hid, D, generator=G) / 10
    ids, gates = _routed(rows, E, K)
    g, threads, outs = Strips(native), torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(torch.zeros(rows, D))
            g.experts_(outs[-1], xn, w13, w2, ids, gates)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_bad_inputs_fail_in_one_line(native):
    p = native.pack_strips(torch.randn(64, 40))
    with pytest.raises(RuntimeError, match=r"x: expected \[M, 64\]"):
        native.strips_mm(torch.randn(2, 65), p, 40)
    with pytest.raises(RuntimeError, match="n: 50 columns do not fill 3 strips"):
        native.strips_mm(torch.randn(2, 64), p, 50)
    with pytest.raises(RuntimeError, match="expected pack_strips"):
        native.strips_mm(torch.randn(2, 64), torch.randn(64, 40), 40)
    with pytest.raises(RuntimeError, match="expected one matrix"):
        native.strips_mm(torch.randn(2, 64), native.pack_strips(torch.randn(2, 64, 40)), 40)
    with pytest.raises(RuntimeError, match="bias: shape"):
        native.strips_mm(torch.randn(2, 64), p, 40, torch.randn(3, 40))
    with pytest.raises(RuntimeError, match=r"x: expected float32 \[2, M, 64\]"):
        native.strips_bmm(torch.randn(3, 2, 64), native.pack_strips(torch.randn(2, 64, 40)), 40)
    with pytest.raises(RuntimeError, match="pack_strips: expected float32 or bfloat16"):
        native.pack_strips(torch.randn(8, 8).half())
    w13, w2 = torch.randn(3, 64, 32), torch.randn(3, 16, 64)
    s13, s2 = native.pack_strips(w13), native.pack_strips(w2)
    out, xn = torch.zeros(2, 64), torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="n: 32 columns do not fill 4 strips"):  # the strips swapped
        native.strips_experts_(out, xn, w13, w2, s2, s13, [0, 1], [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"strips: expected w13's and w2's pack_strips"):
        native.strips_experts_(out, xn, w13, w2, s13[:2].contiguous(), s2, [0, 1], [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"ids: expert 3 out of range \[0, 3\)"):
        native.strips_experts_(out, xn, w13, w2, s13, s2, [0, 3], [1.0, 1.0])


def test_strips_keeps_onednn_above_its_rows(native):
    """Up to STRIP_ROWS rows on the strips, more on oneDNN's packed linear (skipped where it does not
    run); each weight packed once per layout and kept, the residual added, `clear` drops both."""
    if gemm_lib.why_not_packed() is not None:
        pytest.skip(gemm_lib.why_not_packed())
    g = Strips(native)
    w = torch.randn(256, 128, generator=G).bfloat16()
    few, many = torch.randn(STRIP_ROWS, 256, generator=G), torch.randn(STRIP_ROWS + 1, 256, generator=G)
    want = few.double() @ w.double()
    assert _rel(g.mm(few, w), want) <= BOUND
    assert len(g._strips) == 1 and not g._packed
    out = torch.randn(STRIP_ROWS, 128, generator=G)
    expect = out.double() + 0.5 * want
    g.addmm_(out, few, w, alpha=0.5)
    assert _rel(out, expect) <= BOUND
    res = torch.randn(STRIP_ROWS, 128, generator=G)
    assert _rel(g.mm(few, w, res), want + res.double()) <= BOUND
    assert len(g._strips) == 1  # the same packed copy
    assert _rel(g.mm(many, w), many.double() @ w.double()) <= BOUND  # oneDNN, FP32 (w widened once)
    assert len(g._packed) == 1
    g.clear()
    assert not g._strips and not g._packed


def test_the_decode_step_runs_many_rows_experts_on_the_strips(native, monkeypatch):
    """Where the many-row GEMMs are Strips, the routed experts of more than KERNEL_ROWS rows (decode
    batches, prefill chunks up to STRIP_EXPERT_ROWS rows) run `Strips.experts_`; DSV3_STRIP_EXPERTS=0
    leaves them on the row-major loop (up to NATIVE_EXPERT_ROWS) and grouped GEMMs."""
    from dsv3 import ModelConfig, Transformer
    from dsv3.infer.decode.limits import NATIVE_EXPERT_ROWS, STRIP_EXPERT_ROWS, expert_rows
    from dsv3.infer.decode.step import FastDecoder
    from dsv3.infer.paged_cache import PagedLatentCache

    assert expert_rows("fp32", False, False, strips=True) == STRIP_EXPERT_ROWS
    assert expert_rows("fp32", False, False) == NATIVE_EXPERT_ROWS["fp32"]
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg).eval()
    cache = PagedLatentCache(cfg, num_blocks=8, block_size=4)
    calls = []
    monkeypatch.setattr(Strips, "experts_", lambda self, *a: calls.append(a[0].shape[0]))
    for env, want in (("1", True), ("0", False)):
        monkeypatch.setenv("DSV3_STRIP_EXPERTS", env)
        fast = FastDecoder(model, cache)
        if not isinstance(fast._aten, Strips):
            pytest.skip(f"the many-row GEMMs here are {fast._aten.name}, not the AVX2 strips")
        assert fast._strips_experts == want
        assert fast._native_expert_rows() == (STRIP_EXPERT_ROWS if want else NATIVE_EXPERT_ROWS["fp32"])
    monkeypatch.setenv("DSV3_STRIP_EXPERTS", "1")
    fast = FastDecoder(model, cache)
    x = torch.randn(7, cfg.dim)
    ffn = next(f for f in fast.weights.ffn if f.moe is not None)
    fast._ffn(x, ffn, [])
    assert calls == [7]


def test_many_row_gemm_picks_strips_without_avx512(monkeypatch):
    """Strips for FP32 GEMMs when the native kernels run the AVX2 width (no AVX-512F); oneDNN's Packed
    with the AVX-512 width, with BF16 GEMMs, with DSV3_STRIPS=0 and without the native kernels."""
    if gemm_lib.why_not_packed() is not None:
        pytest.skip(gemm_lib.why_not_packed())

    class Fake:
        amx, wide = False, False
        pack_strips = strips_mm = strips_bmm = None

    assert isinstance(many_row_gemm(False, False, native=Fake()), Strips)
    assert isinstance(many_row_gemm(True, False, native=Fake()), Strips)  # BF16-stored, FP32 compute
    Fake.wide = True
    assert type(many_row_gemm(False, False, native=Fake())) is Packed
    Fake.wide = False
    if gemm_lib.why_not_packed(True) is None:
        assert type(many_row_gemm(True, True, native=Fake())) is Packed
    assert type(many_row_gemm(False, False)) is Packed
    monkeypatch.setenv("DSV3_STRIPS", "0")
    assert type(many_row_gemm(False, False, native=Fake())) is Packed
