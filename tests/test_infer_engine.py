"""The engine against the reference decoder and the full forward: continuous batching, chunked
prefill, admission control, stop conditions, sampling."""

import os

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.infer.engine import Engine, EngineConfig
from dsv3.infer.reference import greedy_generate
from dsv3.infer.sampling import SamplingParams, target_probs

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture
def model(tiny: ModelConfig) -> Transformer:
    m = Transformer(tiny).eval()
    for moe in m.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def _prompts(vocab: int, lengths) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]


def _alone(model, prompt, n) -> list[int]:
    return greedy_generate(model, torch.tensor([prompt]), n)[0].tolist()


def _run(
    engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]], full: bool = False
) -> dict:
    """Add requests at the given step numbers, step until all finish; request id -> output ids
    (or the whole RequestOutput if `full`)."""
    outputs, ids, step = {}, {}, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt, params in arrivals.get(step, []):
            ids[engine.add_request(prompt, params)] = prompt
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out if full else out.token_ids
        step += 1
    return outputs


def test_continuous_batching_equals_each_request_alone(model, tiny):
    prompts = _prompts(tiny.vocab_size, [5, 30, 2, 13, 21])
    # a 6-token budget: the 30-token prompt is prefilled in 5+ chunks while others decode
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=6))
    arrivals = {
        0: [(prompts[0], GREEDY)],
        2: [(prompts[1], GREEDY), (prompts[2], GREEDY)],
        5: [(p, GREEDY) for p in prompts[3:]],
    }
    outs = _run(engine, arrivals)
    for rid, prompt in zip(map(str, range(5)), prompts):
        assert outs[rid] == _alone(model, prompt, GREEDY.max_tokens)
    assert engine.stats.mixed_steps > 0 and engine.stats.max_running >= 3
    assert engine.cache.allocator.num_free == engine.cache.num_blocks  # every block came back


def test_engine_logits_equal_full_forward(model, tiny):
    """The logprobs the engine reports come from its logits: hold them to the full forward."""
    prompts = _prompts(tiny.vocab_size, [7, 11])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    engine = Engine(model, EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=5))
    outs = _run(engine, {0: [(prompts[0], params)], 1: [(prompts[1], params)]}, full=True)
    for rid, prompt in (("0", prompts[0]), ("1", prompts[1])):
        out = outs[rid]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + out.token_ids])).log_softmax(dim=-1)[0]
        assert len(out.logprobs) == len(out.token_ids) == params.max_tokens
        for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            assert abs(entry[tok] - float(logp[len(prompt) - 1 + i, tok])) <= 1e-5


def test_full_cache_makes_requests_wait_not_fail(model, tiny):
    prompts = _prompts(tiny.vocab_size, [9, 14, 6, 11, 8, 12])
    # 12 blocks of 4 tokens: room for about two sequences at once, six arrive together
    engine = Engine(model, EngineConfig(num_blocks=12, block_size=4, max_num_batched_tokens=64))
    outs = _run(engine, {0: [(p, GREEDY) for p in prompts]})
    assert len(outs) == len(prompts)
    for rid, prompt in zip(map(str, range(6)), prompts):
        assert outs[rid] == _alone(model, prompt, GREEDY.max_tokens)
    assert engine.stats.max_running < len(prompts)
    assert engine.stats.max_waiting_while_running > 0
    with pytest.raises(ValueError, match="max_tokens"):  # could never fit, even alone: refused now
        engine.add_request(prompts[0], SamplingParams(max_tokens=60))


def test_stop_conditions(model, tiny):
    prompt = _prompts(tiny.vocab_size, [6])[0]
    ref = _alone(model, prompt, 12)
    stop_tok = ref[4]
    engine = Engine(model, EngineConfig(num_blocks=32, block_size=4))
    outs = _run(
        engine,
        {
            0: [
                (prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop_tok,))),
                (prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
            ]
        },
    )
    assert outs["0"] == ref[: ref.index(stop_tok) + 1]
    assert outs["1"] == ref[:3]
    eos_model_engine = Engine(model, EngineConfig(num_blocks=32, block_size=4))
    eos_model_engine.eos = {ref[2]}  # as if the model's end token were ref[2]
    assert (
        _run(eos_model_engine, {0: [(prompt, SamplingParams(temperature=0, max_tokens=12))]})["0"]
        == ref[: ref.index(ref[2]) + 1]
    )


def test_seeded_sampling_does_not_depend_on_the_batch(model, tiny):
    prompts = _prompts(tiny.vocab_size, [5, 8, 3])
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=8, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    alone = _run(Engine(model, EngineConfig(num_blocks=32, block_size=4)), {0: [(prompts[0], seeded)]})["0"]
    mixed = _run(
        Engine(model, EngineConfig(num_blocks=32, block_size=4)),
        {0: [(prompts[1], other)], 1: [(prompts[0], seeded), (prompts[2], other)]},
    )["1"]
    assert alone == mixed


def test_target_probs_top_k_top_p_match_a_direct_computation():
    torch.manual_seed(3)
    logits = torch.randn(4, 12) * 2
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=0.5, top_k=5, top_p=0.8),
    ]
    got = target_probs(logits, params)
    for row, p in zip(range(4), params):
        probs = (logits[row] / p.temperature).softmax(-1)
        order = probs.argsort(descending=True).tolist()
        kept = order[: p.top_k] if p.top_k else order
        mass, nucleus = probs[kept].sum(), []
        for t in kept:  # smallest prefix whose renormalised mass reaches top_p
            nucleus.append(t)
            if probs[nucleus].sum() / mass >= p.top_p:
                break
        expected = torch.zeros(12)
        expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
        assert torch.allclose(got[row], expected, atol=1e-6)


def test_bad_requests_name_the_field(model):
    engine = Engine(model, EngineConfig(num_blocks=8, block_size=4))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([10**6], GREEDY)
    with pytest.raises(ValueError, match="stop"):
        engine.add_request([1, 2], SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)


@pytest.mark.skipif(
    not os.environ.get("DSV3_TEST_COMPILE"), reason="compiles for minutes; DSV3_TEST_COMPILE=1"
)
def test_compiled_decode_equals_full_forward(model, tiny):
    """The compiled decode forward (MoE swap + torch.compile, cache writes as a custom op; the eager
    fast path off so that it runs) against the full forward: a wrong write order or a copied pool
    shows up as wrong logprobs."""
    prompt = _prompts(tiny.vocab_size, [9])[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    ref = _alone(model, prompt, 8)
    engine = Engine(model, EngineConfig(num_blocks=32, block_size=4, compile=True, fast_decode=False))
    out = _run(engine, {0: [(prompt, params)]}, full=True)["0"]
    with torch.no_grad():
        logp = model(torch.tensor([prompt + out.token_ids])).log_softmax(dim=-1)[0]
    assert out.token_ids == ref
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(entry[tok] - float(logp[len(prompt) - 1 + i, tok])) <= 1e-5


# ---- failures: validated at the door, a failing step fails only its requests ---------------------
def test_logprobs_beyond_the_vocabulary_are_refused_and_leak_nothing(model, tiny):
    """logprobs=10**6 once passed add_request and failed inside every step, leaving its sequence
    running on its blocks until every call failed with "cache too small?"."""
    engine = Engine(model, EngineConfig(num_blocks=12, block_size=4))
    prompt = _prompts(tiny.vocab_size, [9])[0]
    for _ in range(5):
        with pytest.raises(ValueError, match="logprobs"):
            engine.add_request(prompt, SamplingParams(logprobs=10**6))
        while engine.has_unfinished():
            engine.step()
    assert engine.cache.allocator.num_free == engine.cache.num_blocks
    assert list(_run(engine, {0: [(prompt, GREEDY)]}).values()) == [_alone(model, prompt, GREEDY.max_tokens)]
    with pytest.raises(ValueError, match="seed"):
        engine.add_request(prompt, SamplingParams(seed=2**70))


def test_a_batch_with_one_bad_request_admits_none(model, tiny):
    engine = Engine(model, EngineConfig(num_blocks=32, block_size=4))
    good = _prompts(tiny.vocab_size, [5, 7])
    with pytest.raises(ValueError, match=r"prompts\[2\]: prompt"):
        engine.add_requests([*good, [tiny.vocab_size]], [GREEDY] * 3)
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match=r"prompts\[1\]: request_id 'a'"):
        engine.add_requests(good, [GREEDY] * 2, ["a", "a"])
    assert not engine.has_unfinished()


def _poisoned_logprobs(monkeypatch, poison: int) -> None:
    """Make committing the tokens of requests with logprobs == poison raise (a bug in one row)."""
    import dsv3.infer.engine as engine_module

    real = engine_module.logprob_entries

    def entries(logits, tokens, top_n):
        if poison in top_n:
            raise RuntimeError("injected commit failure")
        return real(logits, tokens, top_n)

    monkeypatch.setattr(engine_module, "logprob_entries", entries)


def test_a_failing_request_fails_alone_and_frees_its_blocks(model, tiny, monkeypatch):
    _poisoned_logprobs(monkeypatch, poison=7)
    engine = Engine(model, EngineConfig(num_blocks=32, block_size=4))
    prompts = _prompts(tiny.vocab_size, [5, 9, 7])
    bad = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=7)
    with pytest.warns(UserWarning, match="request.s. 1 failed .RuntimeError: injected"):
        outs = _run(engine, {0: [(prompts[0], GREEDY), (prompts[1], bad), (prompts[2], GREEDY)]}, full=True)
    assert outs["1"].finished and outs["1"].finish_reason == "error"
    assert isinstance(outs["1"].error, RuntimeError)
    for rid in ("0", "2"):
        assert outs[rid].finish_reason == "length"
        assert outs[rid].token_ids == _alone(model, prompts[int(rid)], GREEDY.max_tokens)
    assert engine.cache.allocator.num_free == engine.cache.num_blocks


def test_failing_forwards_free_every_block_and_the_engine_stays_usable(model, tiny, monkeypatch):
    """N steps whose batched decode forward raises: their rows fail, no block stays taken, and the
    next requests give what a fresh engine gives."""
    engine = Engine(model, EngineConfig(num_blocks=16, block_size=4))
    prompts = _prompts(tiny.vocab_size, [6, 8])
    real = engine.runner.decode_logits
    monkeypatch.setattr(engine.runner, "decode_logits", lambda seqs: 1 / 0)
    for _ in range(4):
        with pytest.warns(UserWarning, match="ZeroDivisionError"):
            outs = _run(engine, {0: [(p, GREEDY) for p in prompts]}, full=True)
        assert [o.finish_reason for o in outs.values()] == ["error", "error"]
        assert engine.cache.allocator.num_free == engine.cache.num_blocks and not engine.has_unfinished()
    monkeypatch.setattr(engine.runner, "decode_logits", real)
    after = _run(engine, {0: [(p, GREEDY) for p in prompts]})
    fresh = _run(
        Engine(model, EngineConfig(num_blocks=16, block_size=4)), {0: [(p, GREEDY) for p in prompts]}
    )
    assert list(after.values()) == list(fresh.values())


def test_abort_request_frees_its_blocks(model, tiny):
    engine = Engine(model, EngineConfig(num_blocks=16, block_size=4))
    rid = engine.add_request(_prompts(tiny.vocab_size, [6])[0], GREEDY)
    engine.step()
    assert engine.cache.allocator.num_free < engine.cache.num_blocks
    assert engine.abort_request(rid) and not engine.abort_request(rid)
    assert engine.cache.allocator.num_free == engine.cache.num_blocks and not engine.has_unfinished()


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_warmup_leaves_no_trace(model, tiny, prefix_caching):
    """`Engine.warmup` (what `dsv3 serve` runs before it is ready) runs its throwaway requests, then
    leaves the engine as a new one: the same outputs for the same requests (greedy and unseeded
    sampling: no seed or request id drawn), every block free in the first order, no prefix-cache
    key, hit counter or stats kept; refused while requests are queued."""
    cfg = EngineConfig(num_blocks=40, block_size=4, prefix_caching=prefix_caching, max_num_seqs=8)
    prompts = _prompts(tiny.vocab_size, [9, 6])
    sampled = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    arrivals = {0: [(prompts[0], GREEDY), (prompts[1], sampled)]}
    fresh = Engine(model, cfg)
    want = _run(fresh, arrivals)
    warmed = Engine(model, cfg)
    warmed.warmup()
    alloc = warmed.scheduler.allocator
    assert alloc.num_free == cfg.num_blocks and alloc._free == list(range(cfg.num_blocks - 1, -1, -1))
    assert warmed.stats.steps == 0 and warmed.stats.prefill_tokens == 0
    if prefix_caching:
        assert not alloc.block_of and not alloc.evictable and alloc.queries == alloc.hits == 0
    assert _run(warmed, arrivals) == want  # the same ids ("0", "1") and the same tokens
    warmed.add_request(prompts[0], GREEDY)
    with pytest.raises(RuntimeError, match="warmup: the engine has requests"):
        warmed.warmup()


def test_warmup_fits_a_small_cache_and_a_short_context(model, tiny):
    """The throwaway requests fit whatever the server was given: 3 blocks of 4 tokens (the lone
    prompt cut to 5 tokens), a context of 3 tokens (nothing to warm: it returns at once)."""
    small = Engine(model, EngineConfig(num_blocks=3, block_size=4))
    small.warmup()
    assert small.scheduler.allocator.num_free == 3 and small.stats.steps == 0
    short = Engine(model, EngineConfig(num_blocks=8, block_size=4, max_model_len=3))
    short.warmup()
    assert short.stats.steps == 0
