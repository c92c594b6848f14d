"""The one router (`dsv3.model.moe.route`): exact ties go to the lower expert id, in the group choice
and the expert choice, so the model's gate, the decode fast path and the native kernel's C++ copy
pick the same experts. torch.topk leaves ties in any order (for 256 equal scores it returned
experts [1, 3, 0, 2]), which made the C++ routing and the model disagree on tied scores."""

import math

import pytest
import torch
from decode_util import assert_decode_matches_forward

from dsv3 import ModelConfig, Transformer
from dsv3.infer.decode import kernels as cpu_kernels
from dsv3.infer.decode.step import FastDecoder
from dsv3.infer.paged_cache import PagedLatentCache
from dsv3.model.moe import route


def reference(logits, bias, score_func, top_k, n_groups, topk_groups, route_scale):
    """The router written out on Python floats, one token at a time (sorted() is stable)."""
    out_ids, out_gates = [], []
    for row in logits.tolist():
        if score_func == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            m = max(row)
            z = [math.exp(v - m) for v in row]
            s = [v / sum(z) for v in z]
        c = [a + b for a, b in zip(s, bias.tolist())]
        cand = list(range(len(c)))
        if n_groups > 1:
            per = len(c) // n_groups
            score = [sum(sorted(c[g * per : (g + 1) * per])[-2:]) for g in range(n_groups)]
            keep = sorted(range(n_groups), key=lambda g: -score[g])[:topk_groups]
            cand = [e for e in cand if e // per in keep]
        ids = sorted(cand, key=lambda e: -c[e])[:top_k]
        g = [s[e] for e in ids]
        scale = route_scale / sum(g) if score_func == "sigmoid" else route_scale
        out_ids.append(ids)
        out_gates.append([v * scale for v in g])
    return out_ids, out_gates


@pytest.mark.parametrize(
    "score_func, n_groups, topk_groups", [("sigmoid", 4, 2), ("sigmoid", 1, 1), ("softmax", 1, 1)]
)
def test_ties_go_to_the_lower_expert_id(score_func, n_groups, topk_groups):
    E, K = 32, 4
    torch.manual_seed(0)
    logits = torch.randint(-2, 3, (300, E)).float() / 2  # five values: ties everywhere
    logits[0] = 0.0  # every logit tied: only the bias decides
    bias = torch.zeros(E)
    bias[E // 2 :] = 0.25 * torch.randint(0, 2, (E // 2,)).float()  # ties among biased experts too
    weights, ids, scores = route(
        logits,
        bias,
        score_func=score_func,
        top_k=K,
        n_groups=n_groups,
        topk_groups=topk_groups,
        route_scale=2.5,
    )
    want_ids, want_gates = reference(logits, bias, score_func, K, n_groups, topk_groups, 2.5)
    assert ids.tolist() == want_ids
    assert torch.allclose(weights, torch.tensor(want_gates), atol=1e-6)
    # a row of equal logits with no bias: the first groups and, in them, the first experts
    w0, i0, _ = route(
        torch.zeros(1, E),
        torch.zeros(E),
        score_func=score_func,
        top_k=K,
        n_groups=n_groups,
        topk_groups=topk_groups,
    )
    assert i0[0].tolist() == list(range(K))
    assert torch.equal(scores, logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1))


def test_the_gate_is_route_on_its_logits(tiny):
    model = Transformer(tiny)
    gate = model.moe_layers()[0].gate
    gate.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(7, tiny.dim)
    logits = x @ gate.weight.T
    got, want = gate(x), gate.route_logits(logits)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-6)


def _tied_model(cfg: ModelConfig) -> Transformer:
    """Every gate logit 0 and the bias in two levels: each token's routing is decided by ties."""
    model = Transformer(cfg).eval()
    for moe in model.moe_layers():
        moe.gate.weight.data.zero_()
        bias = torch.zeros(cfg.n_routed_experts)
        bias[1::3] = 0.1
        moe.gate.e_score_correction_bias = bias
    return model


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_decode_paths_route_ties_like_the_model(tiny, native):
    """The fast path (the native one-call RowDecoder where it builds, its C++ router included) on a
    model whose routing is all ties equals the model's forward."""
    model = _tied_model(tiny)
    cache = PagedLatentCache(model.config, num_blocks=40, block_size=4)
    fast = FastDecoder(model, cache, fold=True, native=native)
    if native and fast._row_decoders()[0] is None:
        pytest.skip(f"no native RowDecoder here ({cpu_kernels.why_not_native})")
    ids = torch.randint(0, tiny.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    assert_decode_matches_forward(model, cache, fast, ids)
