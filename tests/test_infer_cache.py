"""The paged latent cache against the full forward and the cache-size formula (DESIGN §3.2)."""

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.infer.paged_cache import BlockAllocator, PagedLatentCache, cache_bytes_per_token, make_context


def _model(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg).eval()
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def test_paged_prefill_then_batched_decode_equals_full_forward(tiny):
    """Rows of different lengths, blocks interleaved in the pool, YaRN on: prefill on the naive path,
    then every row decoded in ONE [B, 1] absorbed forward per step; logits == the full forward."""
    model = _model(tiny.replace(max_seq_len=512, original_seq_len=64, rope_factor=4.0))
    block = 4
    cache = PagedLatentCache(model.config, num_blocks=40, block_size=block)
    prompt_lens, total = [3, 9, 6], 21
    ids = torch.randint(0, tiny.vocab_size, (3, total))
    tables: list[list[int]] = [[], [], []]
    for _ in range(-(-total // block)):  # take blocks round-robin: no row is contiguous
        for t in tables:
            t += cache.allocator.allocate(1)
    got = [[] for _ in range(3)]
    with torch.no_grad():
        for b, n in enumerate(prompt_lens):  # prefill each row on its own, as the engine does
            pos = torch.arange(n)[None]
            cache.bind(make_context([tables[b]], pos, [n], block))
            got[b].append(model(ids[b : b + 1, :n], positions=pos, cache=cache, absorb=False)[0])
        for step in range(total - max(prompt_lens)):
            pos = torch.tensor([[n + step] for n in prompt_lens])  # (B, 1): per-row positions
            tok = ids.gather(1, pos)
            cache.bind(make_context(tables, pos, (pos[:, 0] + 1).tolist(), block))
            logits = model(tok, positions=pos, cache=cache, absorb=True)
            for b in range(3):
                got[b].append(logits[b])
        full = model(ids)
    for b in range(3):
        steps = torch.cat(got[b])
        assert (steps - full[b, : steps.shape[0]]).abs().max() <= 1e-5


def test_padding_is_never_written_and_rollback_hides_stale_slots(tiny):
    cache = PagedLatentCache(tiny, num_blocks=4, block_size=4, n_layers=1)
    kv = torch.randn(1, 3, tiny.kv_lora_rank)
    pe = torch.randn(1, 3, tiny.qk_rope_head_dim)
    pos = torch.tensor([[0, 1, 2]])
    valid = torch.tensor([[True, True, False]])
    cache.bind(make_context([[2]], pos, [2], 4, valid=valid))
    before = cache.data.clone()
    k, p, key_pos = cache.update(0, kv, pe, pos)
    written = (cache.data != before).any(dim=-1)[0, :-1]  # (N,): the block rows, not the spare row
    assert written.nonzero().flatten().tolist() == [8, 9]  # block 2, slots 0 and 1 only
    assert key_pos.tolist() == [[0, 1]]
    assert torch.equal(k[0], kv[0, :2]) and torch.equal(p[0], pe[0, :2])
    # a shorter context length rolls back: the slot is still there but is no key any more
    cache.bind(make_context([[2]], torch.tensor([[0]]), [1], 4))
    _, _, key_pos = cache.update(0, kv[:, :1], pe[:, :1], torch.tensor([[0]]))
    assert key_pos.tolist() == [[0]]


def test_bytes_per_token_equals_formula(tiny):
    for dtype in (torch.float32, torch.bfloat16):
        cache = PagedLatentCache(tiny, num_blocks=2, block_size=8, dtype=dtype)
        per_layer = tiny.kv_lora_rank + tiny.qk_rope_head_dim
        expected = (tiny.n_layers + tiny.n_mtp_layers) * per_layer * (4 if dtype == torch.float32 else 2)
        assert cache.bytes_per_token == expected == cache_bytes_per_token(tiny, dtype)
    from dsv3.infer.engine import Engine, EngineConfig

    model = Transformer(tiny)
    for spec in (False, True):
        engine = Engine(model, EngineConfig(num_blocks=2, speculative=spec))
        layers = tiny.n_layers + spec  # the MTP block's cache exists only when drafting
        assert engine.bytes_per_token == engine.formula_bytes_per_token() == layers * per_layer * 4
    v3 = ModelConfig.from_preset("671b")
    # DESIGN §3.2: 61 x 576 = 35,136 values per token, ~68.6 KiB in BF16
    assert cache_bytes_per_token(v3, torch.bfloat16, with_mtp=False) == 35136 * 2
    assert abs(35136 * 2 / 1024 - 68.6) < 0.05


def test_decode_moe_equals_the_model_moe(tiny):
    """The fast path's small-batch routed experts (gathered weights) against the grouped GEMM."""
    from dsv3.infer.decode.compiled import DecodeMoE, swap_moe
    from dsv3.model.moe import MoE

    model = _model(tiny)
    small, big = torch.randn(2, 5, tiny.dim), torch.randn(8, 9, tiny.dim)  # 20 and 144 token-expert pairs
    moe = model.moe_layers()[0]
    with torch.no_grad():
        refs = moe(small), moe(big)
        swap_moe(model)
        assert isinstance(moe, DecodeMoE) and isinstance(moe, MoE)
        for x, ref in zip((small, big), refs):
            assert (moe(x) - ref).abs().max() <= 1e-5


def test_block_allocator_accounting():
    alloc = BlockAllocator(5)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 2
    with pytest.raises(RuntimeError, match="3 blocks requested, 2 free"):
        alloc.allocate(3)
    alloc.free(a)
    assert alloc.num_free == 5
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free([0])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)
