"""dsv3's AMX GEMMs (csrc/amx_gemm.cpp, dsv3.infer.decode.gemm.AmxPacked) held to plain torch: the
rows rounded to BF16 to nearest even times the BF16 weights, summed in float64, for row counts
around the tile sizes, inputs and outputs that are not multiples of the tiles, V3's geometry, the
grouped experts with empty, one-row and many-row experts, the residual; results independent of the
thread count; one-line errors on bad inputs. Every test skips, saying why, where the CPU or the OS
has no AMX (the AVX2 machines); the choice that falls back to oneDNN is tested everywhere."""

import pytest
import torch

from dsv3.infer.decode import gemm as gemm_lib
from dsv3.infer.decode import kernels as cpu_kernels
from dsv3.infer.decode.gemm import AMX_ROWS, AmxPacked, Packed, many_row_gemm

G = torch.Generator().manual_seed(7)
# relative to the largest output: FP32 sums of K BF16 products against float64 ones (measured <= 4e-7
# for K <= 7168); rounding the rows by truncation instead of to nearest even gives ~4e-3
BOUND = 1e-5


@pytest.fixture(scope="module")
def native():
    k = cpu_kernels.kernels()
    if not isinstance(k, cpu_kernels.Native):
        pytest.skip(f"native kernels unavailable: {cpu_kernels.why_not_native}")
    if not k.amx:
        pytest.skip(f"no AMX in this process (CPU flags: {' '.join(cpu_kernels.cpu_flags()) or 'none read'})")
    return k


def _want(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().double() @ w.double()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("rows", [1, 5, 15, 16, 17, 31, 32, 33, 64, 70])
@pytest.mark.parametrize("k, n", [(8, 5), (300, 100), (512, 2176), (96, 48)])
def test_mm_is_the_bf16_product(native, rows, k, n):
    x = torch.randn(rows, k, generator=G)
    w = torch.randn(k, n, generator=G).bfloat16()
    packed = native.amx_pack(w)
    assert packed.shape == ((n + 15) // 16, (k + 31) // 32, 16, 32)
    y = native.amx_mm(x, packed, n)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert _rel(y, _want(x, w)) <= BOUND
    add = torch.randn(rows, n, generator=G)
    assert _rel(native.amx_mm(x, packed, n, add), _want(x, w) + add.double()) <= BOUND


def test_mm_on_one_671b_matrix(native):
    """V3's kv_a projection (7168 -> 576): the real geometry's widest input, its odd output."""
    x = torch.randn(8, 7168, generator=G)
    w = (torch.randn(7168, 576, generator=G) / 85).bfloat16()
    assert _rel(native.amx_mm(x, native.amx_pack(w), 576), _want(x, w)) <= BOUND


def test_rows_are_rounded_to_nearest_even(native):
    """x = 1 + 2^-8 + 2^-9 x 3/2 lies between the BF16 values 1 and 1 + 2^-7, nearer the second:
    truncation gives 1, rounding to nearest 1 + 2^-7; times w = 1 the product shows which."""
    x = torch.full((1, 32), 1 + 2**-8 + 2**-9 * 1.5)
    w = torch.zeros(32, 16, dtype=torch.bfloat16)
    w[0, 0] = 1
    assert native.amx_mm(x, native.amx_pack(w), 16)[0, 0].item() == 1 + 2**-7


@pytest.mark.parametrize("counts", [[3, 0, 17, 1, 40], [0, 0, 5, 0], [33, 64, 1]])
def test_grouped_is_one_product_per_expert(native, counts):
    E, K, N = len(counts), 96, 40
    w = torch.randn(E, K, N, generator=G).bfloat16()
    x = torch.randn(sum(counts), K, generator=G)
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    y = native.amx_grouped(x, native.amx_pack(w), starts, N)
    want = torch.cat([_want(x[a:b], w[e]) for e, (a, b) in enumerate(zip(starts, starts[1:]))])
    assert _rel(y, want) <= BOUND


def test_results_do_not_depend_on_the_thread_count(native):
    x = torch.randn(40, 512, generator=G)
    w = torch.randn(512, 2176, generator=G).bfloat16()
    we = torch.randn(4, 512, 256, generator=G).bfloat16()
    p, pe, starts = native.amx_pack(w), native.amx_pack(we), [0, 10, 10, 33, 40]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.amx_mm(x, p, 2176), native.amx_grouped(x, pe, starts, 256)
        torch.set_num_threads(2)
        two = native.amx_mm(x, p, 2176), native.amx_grouped(x, pe, starts, 256)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_bad_inputs_fail_in_one_line(native):
    w = native.amx_pack(torch.randn(64, 32).bfloat16())
    with pytest.raises(RuntimeError, match="x has 65 inputs, the packed weight 64"):
        native.amx_mm(torch.randn(2, 65), w, 32)
    with pytest.raises(RuntimeError, match="N=40 does not match"):
        native.amx_mm(torch.randn(2, 64), w, 40)
    with pytest.raises(RuntimeError, match="not a packed weight"):
        native.amx_mm(torch.randn(2, 64), torch.randn(64, 32).bfloat16(), 32)
    with pytest.raises(RuntimeError, match="starts must be E \\+ 1 row boundaries"):
        native.amx_grouped(torch.randn(4, 64), native.amx_pack(torch.randn(2, 64, 32).bfloat16()), [0, 4], 32)


def test_amx_packed_keeps_onednn_above_its_rows(native):
    """Up to AMX_ROWS rows and the grouped experts on the tiles (FP32 outputs); more rows on oneDNN's
    BF16 linear (outputs rounded to BF16); each weight packed once per layout and kept."""
    g = AmxPacked(native)
    w = torch.randn(256, 128, generator=G).bfloat16()
    few, many = torch.randn(AMX_ROWS, 256, generator=G), torch.randn(AMX_ROWS + 1, 256, generator=G)
    assert _rel(g.mm(few, w), _want(few, w)) <= BOUND
    assert len(g._tiles) == 1 and not g._packed
    out = torch.randn(AMX_ROWS, 128, generator=G)
    want = out.double() + 0.5 * _want(few, w)
    g.addmm_(out, few, w, alpha=0.5)
    assert _rel(out, want) <= BOUND
    assert len(g._tiles) == 1  # the same packed copy
    assert _rel(g.mm(many, w), _want(many, w)) <= 1e-2  # oneDNN BF16: the outputs rounded
    assert len(g._packed) == 1
    g.clear()
    assert not g._tiles and not g._packed


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
def test_amx_packed_bmm_is_one_grouped_gemm_per_head(native, rows):
    """W_UK per head in V3's geometry ([128, 512], 4 heads here) on the strided query view the decode
    step passes, and W_UV back ([512, 128]): one grouped call over the heads, each packed once."""
    g = AmxPacked(native)
    q = torch.randn(rows, 4, 192, generator=G)  # (rows, heads, nope 128 | rope 64)
    w_uk = (torch.randn(4, 128, 512, generator=G) / 11).bfloat16()
    w_uv = (torch.randn(4, 512, 128, generator=G) / 22).bfloat16()
    x = q[..., :128].transpose(0, 1)  # (heads, rows, 128)
    lat = g.bmm(x, w_uk)
    assert lat.shape == (4, rows, 512) and lat.dtype == torch.float32
    assert _rel(lat, torch.stack([_want(x[h], w_uk[h]) for h in range(4)])) <= BOUND
    out = g.bmm(lat, w_uv)
    assert _rel(out, torch.stack([_want(lat[h], w_uv[h]) for h in range(4)])) <= BOUND
    assert len(g._tiles) == 2 and not g._packed
    assert g.bmm(x[:, :0], w_uk).shape == (4, 0, 512)


def test_many_row_gemm_picks_amx_only_where_it_runs(monkeypatch):
    """AmxPacked for BF16 GEMMs when the native kernels have AMX here; oneDNN's Packed with
    DSV3_AMX=0, for FP32 GEMMs, and without the native kernels."""
    if gemm_lib.why_not_packed(True) is not None:
        pytest.skip(gemm_lib.why_not_packed(True))

    class Fake:
        amx = True

    assert isinstance(many_row_gemm(True, True, native=Fake()), AmxPacked)
    assert type(many_row_gemm(True, False, native=Fake())) is Packed
    assert type(many_row_gemm(True, True)) is Packed
    monkeypatch.setenv("DSV3_AMX", "0")
    assert type(many_row_gemm(True, True, native=Fake())) is Packed
