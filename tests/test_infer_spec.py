"""MTP speculative decoding: greedy output identical to plain greedy; speculative sampling keeps the
target distribution (statistical tests with fixed seeds)."""

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.infer.engine import Engine, EngineConfig
from dsv3.infer.reference import greedy_generate
from dsv3.infer.sampling import SamplingParams, draw, uniforms
from dsv3.infer.speculative import accept_greedy, accept_sampling


def _drafting_model(cfg: ModelConfig, scale: float) -> Transformer:
    """A random model whose MTP module is a decent draft: blocks scaled down so that the residual
    stream is dominated by the current token's embedding, and eh_proj passing the embedding through.
    Then the main model's prediction at i+1 and the MTP's at i (which reads t_{i+1}) mostly agree,
    so drafts are accepted often but not always and both verification branches run."""
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
                p.mul_(scale)
        for mtp in model.mtp:
            mtp.eh_proj.weight.zero_()
            mtp.eh_proj.weight[:, : cfg.dim] = torch.eye(cfg.dim)
    return model


def _generate(engine: Engine, prompts, params) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[i] for i in ids]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_is_identical_to_greedy(tiny, k):
    model = _drafting_model(tiny, scale=0.3)
    prompts = [torch.randint(0, tiny.vocab_size, (n,)).tolist() for n in (5, 17, 3, 26)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    # a small cache and budget: chunked prefills, mixed steps and preemptions happen on the way
    config = EngineConfig(num_blocks=18, block_size=4, max_num_batched_tokens=12, speculative=True)
    engine = Engine(model, config.__class__(**{**config.__dict__, "num_speculative_tokens": k}))
    outs = _generate(engine, prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out == greedy_generate(model, torch.tensor([prompt]), params.max_tokens)[0].tolist()
    rates = engine.spec_stats.acceptance_rates
    assert 0.2 < rates[0] < 1.0  # drafts were both accepted and rejected
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # reaching position j needs 1..j-1 accepted
    assert engine.stats.mixed_steps > 0


def test_accept_greedy():
    assert accept_greedy([5, 6, 7], [5, 6]) == [5, 6, 7]  # all accepted + bonus
    assert accept_greedy([5, 6, 7], [5, 9]) == [5, 6]  # second rejected: the correction
    assert accept_greedy([5, 6, 7], [4, 6]) == [5]


def _tv_bound(p: torch.Tensor, n: int, z: float = 4.0) -> float:
    """A generous bound on the total-variation distance between p and the empirical distribution of
    n draws from it: its mean plus z standard deviations, both over-estimated (each cell's
    |error| has mean <= sqrt(p(1-p)/n) and the sum has variance <= sum p(1-p)/n)."""
    var = p * (1 - p) / n
    return 0.5 * float(var.sqrt().sum() + z * var.sum().sqrt())


def test_speculative_sampling_rule_preserves_the_target_distribution():
    """Function level: drafts d1 ~ q1, d2 ~ q2(.|d1); targets p1, p2(.|d1), p3(.|d1,d2). The first
    emitted token must follow p1 and, when two are emitted, the second p2(.|first)."""
    V, n = 5, 6000
    g = torch.Generator().manual_seed(7)
    p1 = torch.rand(V, generator=g).softmax(0)
    q1 = (torch.rand(V, generator=g) * 3).softmax(0)
    p2 = (torch.rand(V, V, generator=g) * 2).softmax(-1)  # [d1, V]
    q2 = torch.rand(V, V, generator=g).softmax(-1)
    p3 = torch.rand(V, V, V, generator=g).softmax(-1)
    first, second = torch.zeros(V), torch.zeros(V, V)
    for _ in range(n):
        d1 = int(torch.multinomial(q1, 1, generator=g))
        d2 = int(torch.multinomial(q2[d1], 1, generator=g))
        p = torch.stack([p1, p2[d1], p3[d1, d2]])
        out = accept_sampling(p, torch.stack([q1, q2[d1]]), [d1, d2], g)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[0], out[1]] += 1
    assert 0.5 * (first / n - p1).abs().sum() <= _tv_bound(p1, n)
    for x in range(V):
        m = int(second[x].sum())
        if m > 500:
            assert 0.5 * (second[x] / m - p2[x]).abs().sum() <= _tv_bound(p2[x], m)
    # the test can fail: the draft distribution itself is far outside the bound
    assert 0.5 * (q1 - p1).abs().sum() > 3 * _tv_bound(p1, n)


def _law_of_tokens_2_and_3(model, prompt, n, draft_vocab=None) -> tuple[torch.Tensor, float]:
    """Empirical law of (t2, t3) over n seeded requests (64 cells) and the first-draft acceptance."""
    params = [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=s) for s in range(n)]
    config = EngineConfig(
        num_blocks=2048,
        block_size=4,
        max_num_seqs=512,
        max_num_batched_tokens=2048,
        speculative=True,
        num_speculative_tokens=2,
        draft_vocab=draft_vocab,
    )
    engine = Engine(model, config)
    ids = [engine.add_request(prompt, p) for p in params]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    counts = torch.zeros(8, 8)
    for i in ids:
        counts[done[i][1], done[i][2]] += 1
    return counts.flatten() / n, engine.spec_stats.acceptance_rates[0]


@pytest.mark.parametrize("draft_vocab", [None, 5])
def test_speculative_sampling_end_to_end_matches_the_model(tiny, monkeypatch, draft_vocab):
    """Vocabulary of 8: the joint law of tokens 2 and 3 (both produced by verifying two drafts)
    over many seeded requests, against the exact law computed from the full forward; also with
    drafts restricted to ids < 5 (q is zero above: the output law must not change)."""
    cfg = tiny.replace(vocab_size=8, bos_token_id=0, eos_token_id=1)
    # the model is random, so fixed: drafts are right 72-89% of the time over seeds 0-3 and the bug
    # below is seen at 0.9-2.5x the bound; seed 1 gives 81% and 2.5x (measured)
    torch.manual_seed(1)
    model = _drafting_model(cfg, scale=0.5)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions
    prompt, n = [3, 5, 2, 7], 2000
    with torch.no_grad():  # exact P(t1, t2, t3) by enumeration
        p1 = model(torch.tensor([prompt])).softmax(-1)[0, -1]
        probs = model(torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])).softmax(-1)
        p2 = probs[::8, -2]  # [t1, t2]
        p3 = probs[:, -1].view(8, 8, 8)  # [t1, t2, t3]
    exact = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()  # law of (t2, t3)
    bound = _tv_bound(exact, n)
    emp, acceptance = _law_of_tokens_2_and_3(model, prompt, n, draft_vocab)
    assert 0.5 * (emp - exact).abs().sum() <= bound
    # both verification branches run (drafts limited to ids < 5 miss this model's likeliest tokens more)
    assert (0.1 if draft_vocab else 0.3) < acceptance < 0.95
    if draft_vocab is not None:
        return

    # the test can fail: a classic bug, resampling from p instead of the residual max(0, p - q)
    # after a rejection, is detected
    def resample_from_p(p, q, drafts, gen):
        u = uniforms([gen], len(drafts) + 1)[0]
        for j, d in enumerate(drafts):
            if u[j] * q[j, d] >= p[j, d]:
                return drafts[:j] + [int(draw(p[j][None], uniforms([gen])[0]))]
        return drafts + [int(draw(p[-1:], u[-1:]))]

    monkeypatch.setattr("dsv3.infer.speculative.accept_sampling", resample_from_p)
    wrong, _ = _law_of_tokens_2_and_3(model, prompt, n)
    assert 0.5 * (wrong - exact).abs().sum() > 2 * bound


@pytest.mark.parametrize("fast_decode", [True, False])
def test_draft_vocab_restricts_drafts_and_keeps_greedy_output(tiny, monkeypatch, fast_decode):
    """With draft_vocab, every draft is below the bound, on the fast path and on the model's
    forward alike, and greedy output is still exactly plain greedy decoding."""
    from dsv3.infer import speculative

    model = _drafting_model(tiny, scale=0.3)
    bound = tiny.vocab_size // 4
    drafted: list[int] = []
    real = speculative._draft_tokens

    def record(logits, params, gens):
        tokens, q = real(logits, params, gens)
        drafted.extend(tokens)
        return tokens, q

    monkeypatch.setattr(speculative, "_draft_tokens", record)
    prompts = [torch.randint(0, tiny.vocab_size, (n,)).tolist() for n in (5, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    config = EngineConfig(
        num_blocks=64, block_size=4, speculative=True, draft_vocab=bound, fast_decode=fast_decode
    )
    engine = Engine(model, config)
    assert (engine.runner._fast() is not None) == fast_decode
    outs = _generate(engine, prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out == greedy_generate(model, torch.tensor([prompt]), params.max_tokens)[0].tolist()
    assert drafted and max(drafted) < bound
    unrestricted = Engine(model, EngineConfig(num_blocks=64, block_size=4, speculative=True))
    drafted.clear()
    _generate(unrestricted, prompts, params)
    assert max(drafted) >= bound  # the bound did restrict something


def test_draft_vocab_is_validated():
    with pytest.raises(ValueError, match="draft_vocab"):
        EngineConfig(draft_vocab=0)
