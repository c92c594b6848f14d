"""The one-row decoder's streamed weights (csrc/streamed.h, `RowDecoder(stream=True)`), held to
float64 products and to the row-major loop it replaces: odd shapes (K and N off the 64-column
panels, a strided matrix), FP32 and BF16 weights, 1-6 rows, 1 and 2 threads bit-identical; and the
whole RowDecoder with and without it on the V3 attention geometry. Each on both loop widths (`wide`:
the AVX2 loops everywhere the native kernels build, the AVX-512F ones where the CPU has it; skipped
with the reason elsewhere)."""

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.infer.decode import kernels as cpu_kernels
from dsv3.infer.decode.step import FastDecoder
from dsv3.infer.paged_cache import PagedLatentCache, make_context

K_N = [(1, 1), (7, 63), (64, 64), (300, 65), (512, 200), (33, 1000)]


NO_AVX512 = "the AVX-512F loops need AVX-512F (CPU flags: " + " ".join(cpu_kernels.cpu_flags()) + ")"


@pytest.fixture(
    params=[
        False,
        pytest.param(
            True, marks=pytest.mark.skipif("avx512f" not in cpu_kernels.cpu_flags(), reason=NO_AVX512)
        ),
    ],
    ids=["avx2", "avx512"],
)
def wide(request) -> bool:
    return request.param


def _logits(native, w: torch.Tensor, x: torch.Tensor, stream: bool, wide: bool = False) -> torch.Tensor:
    row = native.RowDecoder(1, 1, 1, stream=stream, wide=wide)
    row.set_head(w)
    assert (row.streamed_bytes() > 0) == stream
    return row.logits(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k,n", K_N)
def test_streamed_products_equal_float64(native, wide, k, n, dtype):
    torch.manual_seed(k * 1000 + n)
    w = torch.randn(k, n).to(dtype)
    for m in (1, 2, 3, 4, 5, 6):
        x = torch.randn(m, k)
        got = _logits(native, w, x, stream=True, wide=wide)
        want = (x.double() @ w.double()).float()
        scale = (x.abs().double() @ w.abs().double()).max().item() + 1e-30
        assert ((got - want).abs().max().item() / scale) <= 1e-6, (k, n, m)
        # the same fma chain as the row-major loop's vector columns: equal to rounding of its tail
        old = _logits(native, w, x, stream=False)
        assert ((got - old).abs().max().item() / scale) <= 1e-6


def test_a_strided_matrix_is_packed_from_its_rows(native, wide):
    """A column slice (row stride > N) is read row by row, not as if contiguous."""
    torch.manual_seed(1)
    big = torch.randn(96, 300)
    w = big[:, 17:217]
    assert w.stride(0) == 300
    x = torch.randn(2, 96)
    got = _logits(native, w, x, stream=True, wide=wide)
    torch.testing.assert_close(got, x @ w.contiguous(), rtol=1e-5, atol=1e-5)


def test_streamed_products_do_not_depend_on_the_thread_count(native, wide):
    torch.manual_seed(2)
    w, x = torch.randn(512, 1000).bfloat16(), torch.randn(3, 512)
    threads = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append(_logits(native, w, x, stream=True, wide=wide))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


def test_logits_errors_are_one_line(native):
    row = native.RowDecoder(1, 1, 1, stream=True)
    with pytest.raises(RuntimeError, match="no head"):
        row.logits(torch.randn(1, 4))
    row.set_head(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match=r"x: expected \[M, 4\]"):
        row.logits(torch.randn(1, 5))


V3_ATTENTION = dict(
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_layers=2, vocab_size=300, n_mtp_layers=0,
)  # fmt: skip


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_row_decoder_streamed_equals_row_major(native, wide, monkeypatch, weights):
    """The whole one-row step (attention with W_UK / W_UV per head, dense and MoE layers, the head)
    on streamed weights against the row-major loop: the same logits to 1e-6 of their scale, the
    same expert counts, T = 1 and 3."""
    cfg = ModelConfig.from_preset("tiny").replace(**V3_ATTENTION)
    torch.manual_seed(3)
    model = Transformer(cfg).eval()
    if weights == "bf16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    monkeypatch.setattr(native, "wide", wide)
    outs = {}
    for stream in (True, False):
        monkeypatch.setattr(native, "stream", stream)
        cache = PagedLatentCache(cfg, num_blocks=16, block_size=4)
        fast = FastDecoder(model, cache, weight_dtype=torch.bfloat16 if weights == "bf16" else None)
        row = fast._row_decoders()[0]
        assert (row.streamed_bytes() > 0) == stream
        table = cache.allocator.allocate(4)
        ids = torch.arange(10)[None] % cfg.vocab_size
        with torch.no_grad():
            pos = torch.arange(5)[None]
            cache.bind(make_context([table], pos, [5], 4))
            model.hidden_states(ids[:, :5], pos, cache, absorb=False)
            got = []
            for p, T in ((5, 1), (6, 3)):
                got.append(fast.logits(fast.forward([ids[0, p : p + T].tolist()], [p], [table])))
                got.append(torch.stack([m.last_counts for m in model.moe_layers()]).float())
        outs[stream] = got
    for a, b in zip(outs[True], outs[False]):
        assert (a - b).abs().max().item() <= 1e-6 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_decoder_experts_on_streamed_copies(native, wide, dtype):
    """`RowDecoder.experts_` (many-row decoding's few-row experts on the one-row decoder's streamed
    copies) against float64 and against the free `experts_` on the row-major experts, 1-9 rows with
    2 experts each (an expert's rows past four take a second pass); D and I off the 64-column panels."""
    torch.manual_seed(4)
    E, D, I, J = 6, 96, 40, 2  # noqa: E741 (the expert hidden size, as in csrc)
    w13, w2 = torch.randn(E, D, 2 * I).to(dtype) / 8, torch.randn(E, I, D).to(dtype) / 6
    row = native.RowDecoder(1, 1, 1, stream=True, wide=wide)
    ffn = dict(w13=w13, w2=w2, bias=torch.zeros(E))
    row.add_ffn(None, None, None, torch.randn(D, E), ffn["bias"], w13, w2, 0, E, J, 1, 1, True, 1.0, 1e-6)
    assert row.streamed_bytes() > 0
    for M in (1, 2, 5, 9):
        xn = torch.randn(M, D)
        ids = [int(e) for _ in range(M) for e in torch.randperm(E)[:J]]
        gates = torch.rand(M * J).tolist()
        got, old = torch.ones(M, D), torch.ones(M, D)
        row.experts_(0, got, xn, ids, gates)
        native.experts_(old, xn, w13, w2, ids, gates)
        want = torch.ones(M, D, dtype=torch.float64)
        for m in range(M):
            for j in range(J):
                e, g = ids[m * J + j], gates[m * J + j]
                t = xn[m].double() @ w13[e].double()
                h = torch.nn.functional.silu(t[:I]) * t[I:]
                want[m] += g * (h @ w2[e].double())
        assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item(), M
        assert (got - old).abs().max().item() <= 1e-6 * old.abs().max().item(), M
    with pytest.raises(RuntimeError, match="layer: 1 is not a MoE layer"):
        row.experts_(1, got, xn, ids, gates)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_decoder_heads_on_streamed_copies(native, wide, dtype):
    """`RowDecoder.heads` (many-row decoding's per-head W_UK / W_UV on the streamed copies) against
    float64 per head, for 1-9 rows from a transposed (strided) query, and its one-line errors."""
    torch.manual_seed(5)
    H, R, P, N, V, D = 3, 70, 4, 20, 12, 16
    w_uk, w_uv = torch.randn(H, N, R).to(dtype), torch.randn(H, R, V).to(dtype)
    row = native.RowDecoder(H, R, P, stream=True, wide=wide)
    pool = torch.zeros(8, R + P)
    w_in, w_q, w_o = torch.randn(D, 8 + R + 2 * P), torch.randn(8, H * (N + P)), torch.randn(H * V, D)
    row.add_attention(w_in, w_q, torch.ones(R), w_o, pool, w_uk, w_uv, 8, 1e-6, 1e-6, 1e-6, None, None, 1.0)
    for M in (1, 4, 9):
        for uv, w in ((False, w_uk), (True, w_uv)):
            x = torch.randn(M, H, w.shape[1]).transpose(0, 1)  # (H, M, K), as step.py passes it
            got = row.heads(0, uv, x)
            want = torch.bmm(x.double(), w.double())
            assert got.shape == (H, M, w.shape[2])
            assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item(), (M, uv)
    with pytest.raises(RuntimeError, match=r"x: expected float32 \[3, M, 20\]"):
        row.heads(0, False, torch.randn(H, 2, 21))
    with pytest.raises(RuntimeError, match="layer: 1 out of range"):
        row.heads(1, False, torch.randn(H, 2, N))
    folded = native.RowDecoder(H, R, P, stream=True, wide=wide)
    folded.add_attention(
        w_in,
        torch.randn(8, H * (R + P)),
        torch.ones(R),
        w_o,
        pool,
        None,
        w_uv,
        8,
        1e-6,
        1e-6,
        1e-6,
        None,
        None,
        1.0,
    )
    with pytest.raises(RuntimeError, match="W_UK is folded"):
        folded.heads(0, False, torch.randn(H, 2, R))


@pytest.mark.skipif("avx512f" in cpu_kernels.cpu_flags(), reason="this CPU has AVX-512F")
def test_the_avx512_loops_are_refused_without_avx512f(native):
    with pytest.raises(RuntimeError, match="wide: this CPU lacks AVX-512F"):
        native.RowDecoder(1, 1, 1, stream=True, wide=True)
