"""Prefix caching in the paged latent cache: the allocator's reference counts, hash chain and LRU
eviction; outputs identical with and without it (greedy and seeded sampling); a shared 200-token
prefix cuts the prefilled tokens to what the counter predicts."""

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.config import ConfigError
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.paged_cache import PrefixCachingAllocator


def test_allocator_shares_refcounts_and_evicts_lru():
    a = PrefixCachingAllocator(4, "model")
    k1 = a.key(None, [1, 2])
    k2 = a.key(k1, [3, 4])
    assert a.key(None, [1, 2]) == k1 and a.key(None, [3, 4]) != k2  # a chain: the prefix is in the key
    assert PrefixCachingAllocator(4, "other").key(None, [1, 2]) != k1  # and the model
    b = a.allocate(2)
    a.register(b[0], k1)
    a.register(b[1], k2)
    assert a.match([k1, k2, a.key(k2, [5, 6])]) == b
    a.take(b)  # a second sequence shares both
    a.free(b)
    assert a.num_free == 2 and not a.evictable  # still referenced once
    a.free(b)
    assert a.num_free == 4 and list(a.evictable) == b[::-1]  # freed last block first
    a.take([b[1]])
    a.free([b[1]])  # b[1] is now the most recently used
    fresh = a.allocate(3)  # 2 never-used blocks, then the least recently used cached one: b[0]
    assert b[0] in fresh and a.match([k1]) == [] and b[1] not in fresh
    with pytest.raises(RuntimeError, match="double free"):
        a.free([b[0], b[0], b[0]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny")).eval()


def _run(engine: Engine, waves: list[list[tuple[list[int], SamplingParams]]]) -> dict:
    """Each wave is queued once the previous one has finished; returns id -> output."""
    done = {}
    for wave in waves:
        ids = [engine.add_request(p, sp) for p, sp in wave]
        while any(i not in done for i in ids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    return done


def test_outputs_are_identical_with_and_without_the_prefix_cache(model):
    torch.manual_seed(1)
    prefix = torch.randint(5, 500, (37,)).tolist()
    prompts = [prefix + torch.randint(5, 500, (n,)).tolist() for n in (1, 4, 9, 12)]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=3, ignore_eos=True)
    waves = [
        [(prompts[0], greedy)],
        [(p, sp) for p in prompts for sp in (greedy, seeded)],
        [(prompts[0], seeded)],
    ]
    cfg = dict(num_blocks=64, block_size=8, max_num_batched_tokens=64)
    plain = _run(Engine(model, EngineConfig(**cfg)), waves)
    cached_engine = Engine(model, EngineConfig(prefix_caching=True, **cfg))
    cached = _run(cached_engine, waves)
    assert [o.token_ids for o in plain.values()] == [o.token_ids for o in cached.values()]
    assert max(o.num_cached_tokens for o in cached.values()) >= 32  # later waves hit the prefix
    alloc = cached_engine.cache.allocator
    assert alloc.num_free == alloc.num_blocks and alloc.hits > 0  # nothing leaked, cached blocks reusable


def test_a_shared_200_token_prefix_is_prefilled_once(model):
    torch.manual_seed(2)
    bs, prefix = 8, torch.randint(5, 500, (200,)).tolist()
    prompts = [prefix + torch.randint(5, 500, (5,)).tolist() for _ in range(32)]
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine = Engine(model, EngineConfig(num_blocks=160, block_size=bs, prefix_caching=True))
    outs = _run(engine, [[(prompts[0], sp)], [(p, sp) for p in prompts[1:]]])
    # the first prefills all 205 tokens; the others find the prefix's 25 full blocks and prefill 5
    assert engine.stats.prefill_tokens == 205 + 31 * 5
    assert sorted(o.num_cached_tokens for o in outs.values()) == [0] + [200] * 31
    plain = Engine(model, EngineConfig(num_blocks=160, block_size=bs))
    assert [o.token_ids for o in _run(plain, [[(p, sp) for p in prompts[:3]]]).values()] == [
        o.token_ids for o in list(outs.values())[:3]
    ]


def test_eviction_under_a_small_cache_keeps_outputs_and_frees_everything(model):
    torch.manual_seed(4)
    prompts = [torch.randint(5, 500, (30,)).tolist() for _ in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    waves = [[(p, sp)] for p in prompts + prompts[:2]]  # the last two may or may not still be cached
    cfg = dict(num_blocks=12, block_size=8)
    cached_engine = Engine(model, EngineConfig(prefix_caching=True, **cfg))
    got = [o.token_ids for o in _run(cached_engine, waves).values()]
    assert got == [o.token_ids for o in _run(Engine(model, EngineConfig(**cfg)), waves).values()]
    alloc = cached_engine.cache.allocator
    assert alloc.num_free == alloc.num_blocks and len(alloc.block_of) <= alloc.num_blocks


def test_prefix_caching_refuses_speculative_decoding():
    with pytest.raises(ConfigError, match="prefix_caching"):
        EngineConfig(prefix_caching=True, speculative=True)
