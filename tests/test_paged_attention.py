"""The native paged attention of batched decode (csrc/paged_attention.cpp through
`GatheredKeys.attend`, dsv3.infer.decode.keys) held to the torch reference (gather, then softmax
over a -inf bias): FP32 within 1e-5 relative at B 1, 5, 64 and T 1, 2, 3 over out-of-order block
tables and rows of different lengths, a BF16 pool within 1e-5 of the reference on its widened
values, identical results at 1 and 2 threads, no per-layer gather, clear errors; and the fast
decoder's batched logits on the kernel equal the model's forward. Each kernel test runs both widths
of the kernel (AVX2's 8 lanes, AVX-512's 16) where the CPU has them; a skipped width says so."""

import functools

import pytest
import torch
from decode_util import prefill_rows

from dsv3 import ModelConfig, Transformer
from dsv3.infer.decode import kernels as cpu_kernels
from dsv3.infer.decode.keys import GatheredKeys
from dsv3.infer.decode.step import FastDecoder
from dsv3.infer.paged_cache import PagedLatentCache


@pytest.fixture(params=["avx2", "avx512"])
def attend(request, native):
    """The native paged attention at one width (skipped where this CPU lacks it)."""
    wide = request.param == "avx512"
    if wide and "avx512f" not in cpu_kernels.cpu_flags():
        pytest.skip("the CPU lacks AVX-512F: the kernel's 16-lane width was not run")
    return functools.partial(native.paged_attend, wide=wide)


GEOMETRIES = {  # H, R, P: v3-mini's attention, and one whose widths are not multiples of 8 or 32
    "v3-mini": (8, 512, 64),
    "odd": (3, 44, 9),
}


def _case(B: int, T: int, geometry: str, block: int, dtype=torch.float32, seed: int = 0):
    """A pool of L = 2 layers, B rows of different lengths (starts 0 .. 3 blocks + 5) whose block
    tables are a shuffled (non-consecutive, out-of-order) draw from the pool, this step's new rows
    and a query [B*T, H, W] (scaled as the decoder's, softmax scale folded in)."""
    g = torch.Generator().manual_seed(seed)
    H, R, P = GEOMETRIES[geometry]
    W = R + P
    starts = torch.randint(0, 3 * block + 6, (B,), generator=g).tolist()
    need = [-(-(s + T) // block) for s in starts]
    order = torch.randperm(sum(need) + 3, generator=g).tolist()  # a few blocks left unused
    tables, at = [], 0
    for n in need:
        tables.append(order[at : at + n])
        at += n
    data = torch.randn(2, (sum(need) + 3) * block + 1, W, generator=g).to(dtype)
    new = torch.randn(2, B * T, W, generator=g).to(dtype)
    q = torch.randn(B * T, H, W, generator=g) * W**-0.5 * 3.0  # peaked enough to test the max
    return data, tables, starts, new, q, (H, R)


def _keys(data, tables, starts, T, block, H, R, new, attend=None) -> GatheredKeys:
    keys = GatheredKeys(data, tables, starts, T, block, H, R, attend)
    keys.new.copy_(new)
    return keys


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("B", [1, 5, 64])
def test_native_attend_equals_torch(attend, B, T):
    """v3-mini's geometry, blocks of 16, and the odd geometry with blocks of 4 (rows spanning
    several out-of-order blocks and kernel chunks of 32 keys), every layer of the pool."""
    for geometry, block in (("v3-mini", 16), ("odd", 4)):
        data, tables, starts, new, q, (H, R) = _case(B, T, geometry, block, seed=B * 10 + T)
        ref = _keys(data, tables, starts, T, block, H, R, new)
        got = _keys(data, tables, starts, T, block, H, R, new, attend)
        for layer in range(2):
            want = ref.attend(layer, q)
            out = got.attend(layer, q)
            assert out.shape == want.shape == (B * T, H, R)
            assert _rel(out, want) <= 1e-5, (geometry, layer)
        assert got._buf is None  # the native path gathered nothing


def test_native_attend_long_rows_and_q_views(attend):
    """Rows of 1 .. 300 keys (past several chunks, a chunk holding only new keys for the first
    token: start 31, T 3), the query a strided view like the decoder's q[..., :W]."""
    H, R, P, block, T = 8, 512, 64, 16, 3
    g = torch.Generator().manual_seed(7)
    starts = [0, 31, 63, 297, 5]
    need = [-(-(s + T) // block) for s in starts]
    order = torch.randperm(sum(need), generator=g).tolist()
    tables = [order[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(need))]
    data = torch.randn(1, sum(need) * block + 1, R + P, generator=g)
    new = torch.randn(1, len(starts) * T, R + P, generator=g)
    wide = torch.randn(len(starts) * T, H, R + 2 * P, generator=g) * 0.1
    q = wide[..., : R + P]  # not contiguous
    want = _keys(data, tables, starts, T, block, H, R, new).attend(0, q)
    got = _keys(data, tables, starts, T, block, H, R, new, attend).attend(0, q)
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("T", [1, 3])
def test_native_attend_on_a_bf16_pool(attend, T):
    """A BF16 pool (and new rows): widened on load, which is exact, so within 1e-5 of the torch
    reference on the pool's FP32 copy. (The engine makes a BF16 cache only for a BF16 model,
    whose fast path runs on torch; the kernel takes it anyway.)"""
    data, tables, starts, new, q, (H, R) = _case(5, T, "v3-mini", 16, torch.bfloat16, seed=3)
    want = _keys(data.float(), tables, starts, T, 16, H, R, new.float()).attend(1, q)
    got = _keys(data, tables, starts, T, 16, H, R, new, attend).attend(1, q)
    assert got.dtype == torch.float32 and _rel(got, want) <= 1e-5


def test_native_attend_does_not_depend_on_the_thread_count(attend):
    data, tables, starts, new, q, (H, R) = _case(5, 2, "v3-mini", 16, seed=5)
    keys = _keys(data, tables, starts, 2, 16, H, R, new, attend)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(keys.attend(0, q))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_native_attend_rejects_bad_inputs(native):
    data, tables, starts, new, q, (H, R) = _case(2, 1, "odd", 4, seed=9)
    f, table = native.paged_attend, torch.tensor([(t + [0] * 8)[:8] for t in tables])
    with pytest.raises(RuntimeError, match="q: expected float32"):
        f(q.double(), data[0], new[0], table, 4, starts, R)
    with pytest.raises(RuntimeError, match="new: expected"):
        f(q, data[0], new[0, :1], table, 4, starts, R)
    with pytest.raises(RuntimeError, match="table: row 0 block 9999 outside the pool"):
        f(q, data[0], new[0], torch.full_like(table, 9999), 4, [4, 4], R)
    with pytest.raises(RuntimeError, match="starts: row 1 at 99"):
        f(q, data[0], new[0], table, 4, [0, 99], R)


def test_fast_decoder_batched_logits_on_the_native_attention(native, monkeypatch):
    """v3-mini's attention geometry, 2 layers: 5 rows of different lengths with out-of-order block
    tables, T = 1 and T = 2 (verification), the batched step's attention on the native kernel
    (called once per layer) and its logits within 1e-5 of the model's forward."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("v3-mini").replace(n_layers=2, vocab_size=512, n_mtp_layers=0)
    model = Transformer(cfg).eval()
    cache = PagedLatentCache(cfg, num_blocks=5 * 4 + 2, block_size=4)
    fast = FastDecoder(model, cache)
    calls = []
    real = native.paged_attend
    monkeypatch.setattr(fast.kernels, "paged_attend", lambda *a: calls.append(1) or real(*a))
    lens = [3, 9, 5, 7, 4]
    tables = [cache.allocator.allocate(4)[::-1] for _ in lens]
    ids = torch.randint(0, cfg.vocab_size, (len(lens), 12))
    with torch.no_grad():
        full = model(ids)
    prefill_rows(model, cache, ids, lens, tables)
    for pos, T in (([n for n in lens], 1), ([n + 1 for n in lens], 2)):
        calls.clear()
        x = fast.forward([ids[b, p : p + T].tolist() for b, p in enumerate(pos)], pos, tables)
        assert len(calls) == cfg.n_layers
        logits = fast.logits(x).view(len(lens), T, -1)
        for b, p in enumerate(pos):
            want = full[b, p : p + T]
            assert (logits[b] - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
