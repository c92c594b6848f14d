"""Properties of the single-device model against references written here."""

import pytest
import torch
import torch.nn.functional as F

from dsv3 import ModelConfig, Transformer
from dsv3.model.cache import LatentCache
from dsv3.model.moe import (
    Gate,
    GroupedExperts,
    MoE,
    balance_loss,
    bucket,
    bucketed,
    pad_rows,
    sort_by_expert,
    unpad_rows,
    update_bias,
)
from dsv3.model.transformer import IGNORE_INDEX


def _model(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg).eval()
    for moe in model.moe_layers():  # non-trivial routing biases
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


# ---- MLA: absorbed == naive ----------------------------------------------------------------------
@pytest.mark.parametrize("q_lora", [None, 32])
def test_absorbed_equals_naive_prefill(tiny, q_lora):
    model = _model(tiny.replace(q_lora_rank=q_lora))
    ids = torch.randint(0, tiny.vocab_size, (2, 33))
    with torch.no_grad():
        naive = model(ids, absorb=False)
        absorbed = model(ids, absorb=True)
    assert (naive - absorbed).abs().max() <= 1e-5


def test_decode_on_latent_cache_equals_full_forward(tiny):
    model = _model(tiny.replace(max_seq_len=512, original_seq_len=64, rope_factor=4.0))  # YaRN on
    B, T0, T = 3, 7, 20
    ids = torch.randint(0, tiny.vocab_size, (B, T))
    cache = LatentCache(model.config, B, T)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :T0], cache=cache, absorb=False)]  # prefill: naive path writes the cache
        for t in range(T0, T):
            pos = torch.full((B, 1), t)
            steps.append(model(ids[:, t : t + 1], positions=pos, cache=cache))  # absorbed decode
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_chunked_naive_prefill_on_cache_equals_full_forward(tiny):
    model = _model(tiny)
    ids = torch.randint(0, tiny.vocab_size, (2, 24))
    cache = LatentCache(tiny, 2, 24)
    with torch.no_grad():
        full = model(ids)
        chunks = [
            model(ids[:, s:e], positions=torch.arange(s, e).expand(2, -1), cache=cache, absorb=False)
            for s, e in [(0, 10), (10, 19), (19, 24)]
        ]
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-5


def test_cache_bytes_per_token(tiny):
    cache = LatentCache(tiny, 1, 8, dtype=torch.bfloat16)
    layers = tiny.n_layers + tiny.n_mtp_layers
    assert cache.bytes_per_token == layers * (tiny.kv_lora_rank + tiny.qk_rope_head_dim) * 2


# ---- routing ------------------------------------------------------------------------------------
def _record_routing(model: Transformer):
    records = []
    hooks = [
        m.gate.register_forward_hook(lambda mod, inp, out: records.append(out[1])) for m in model.moe_layers()
    ]
    return records, hooks


def test_routing_and_logits_are_causal(tiny):
    model = _model(tiny)
    ids = torch.randint(0, tiny.vocab_size, (1, 30))
    changed = ids.clone()
    j = 17
    changed[0, j] = (ids[0, j] + 1) % tiny.vocab_size
    outs = []
    for x in (ids, changed):
        records, hooks = _record_routing(model)
        with torch.no_grad():
            logits = model(x)
        for h in hooks:
            h.remove()
        outs.append((logits, records))
    (la, ra), (lb, rb) = outs
    assert torch.allclose(la[:, :j], lb[:, :j], atol=1e-6)
    assert not torch.allclose(la[:, j:], lb[:, j:])
    for a, b in zip(ra, rb):  # routing of every earlier token is unchanged
        assert torch.equal(a[:j], b[:j])


def test_bias_changes_selection_not_gate_values(tiny):
    gate = Gate(tiny)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(64, tiny.dim)
    w0, idx0, s0 = gate(x)
    gate.e_score_correction_bias[5] = 10.0  # expert 5 now wins every selection
    w1, idx1, s1 = gate(x)
    assert (idx1 == 5).any(dim=1).all() and not (idx0 == 5).any(dim=1).all()
    assert torch.equal(s0, s1)  # affinities do not see the bias
    expected = s1.gather(1, idx1)
    expected = expected / expected.sum(dim=1, keepdim=True) * tiny.route_scale
    assert torch.allclose(w1, expected, atol=1e-6)  # gate values come from s, not s + b


def test_gate_values_sum_to_route_scale_and_groups_are_limited(tiny):
    cfg = tiny.replace(n_routed_experts=16, n_expert_groups=8, n_limited_groups=3, n_activated_experts=4)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=1.0)
    gate.e_score_correction_bias.normal_(0, 0.3)
    w, idx, _ = gate(torch.randn(500, cfg.dim))
    assert torch.allclose(w.sum(dim=1), torch.full((500,), cfg.route_scale), atol=1e-5)
    per_token = torch.tensor([torch.unique(row // 2).numel() for row in idx])  # 2 experts per group
    assert per_token.max() <= cfg.n_limited_groups
    assert per_token.max() == cfg.n_limited_groups  # the limit is reached, so it is binding


def test_group_masking_uses_top2_group_score(tiny):
    cfg = tiny.replace(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=2)
    gate = Gate(cfg)
    gate.weight.data.zero_()  # s = 0.5 everywhere: selection decided by the bias alone
    # group 0 = experts {0,1}: one very high expert; group 1 = {2,3}: two fairly high experts.
    gate.e_score_correction_bias.copy_(torch.tensor([0.9, -0.5, 0.3, 0.3, 0, 0, 0, 0]))
    _, idx, _ = gate(torch.randn(3, cfg.dim))
    # top-2 sums: group0 = 1.4 + 0.0 = 1.4; group1 = 0.8 + 0.8 = 1.6 -> group1 kept (a max would keep group0)
    assert sorted(idx[0].tolist()) == [2, 3]


def test_softmax_gate_is_not_normalised(tiny):
    cfg = tiny.replace(score_func="softmax", route_scale=1.0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    w, idx, s = gate(torch.randn(10, cfg.dim))
    assert torch.allclose(s.sum(dim=1), torch.ones(10), atol=1e-6)
    assert torch.allclose(w, s.gather(1, idx))


def test_gate_bias_stays_fp32(tiny):
    model = Transformer(tiny)
    moe = model.moe_layers()[0]
    moe.gate.e_score_correction_bias.fill_(0.1234567)
    model.to(torch.bfloat16)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.e_score_correction_bias[0].item() == pytest.approx(0.1234567, abs=1e-8)
    assert moe.gate.weight.dtype == torch.bfloat16


# ---- experts ------------------------------------------------------------------------------------
def _experts_loop_reference(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n]
        outs.append((F.silu(xe @ experts.w1[e]) * (xe @ experts.w3[e])) @ experts.w2[e])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[5, 0, 9, 1, 0, 13], [37, 0, 16, 130, 1, 19]], ids=["few", "padded"])
def test_grouped_experts_equal_loop_reference(dtype, counts):
    """Empty experts included; in BF16 the larger counts go through pad_rows."""
    E, D, inter = 6, 32, 16
    experts = GroupedExperts(E, D, inter).to(dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), D, dtype=dtype, requires_grad=True)
    grad = torch.randn(x.shape[0], D, dtype=dtype)
    y = experts(x, counts)
    (gx,) = torch.autograd.grad(y, x, grad, retain_graph=True)
    gw = torch.autograd.grad(y, list(experts.parameters()), grad)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _experts_loop_reference(experts, x_ref, counts)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad, retain_graph=True)
    gw_ref = torch.autograd.grad(y_ref, list(experts.parameters()), grad)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(y, y_ref, atol=tol, rtol=tol)
    assert torch.allclose(gx, gx_ref, atol=tol, rtol=tol)
    for a, b in zip(gw, gw_ref):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


def test_pad_rows_buckets_bf16_rows_and_keeps_them():
    x = torch.randn(70, 8, dtype=torch.bfloat16)
    counts = torch.tensor([0, 15, 16, 17, 22])  # sum 70
    padded, padded_counts, rows = pad_rows(x, counts)
    assert padded_counts.tolist() == [0, 15, 16, 17, 22]  # below 32: steps of 1 (16 sizes per octave)
    counts = torch.tensor([0, 3, 33, 34])
    padded, padded_counts, rows = pad_rows(x, counts)
    assert padded_counts.tolist() == [0, 3, 34, 34]  # 32-63: steps of 2
    assert torch.equal(unpad_rows(padded, rows), x)
    real = torch.zeros(padded.shape[0], dtype=torch.bool).index_fill_(0, rows, True)
    assert not padded[~real].any()  # the added rows are zeros
    assert int(real.sum()) == 70 and padded.shape[0] == 71
    # the sizes a GEMM sees: a few hundred up to 64k rows, none more than 1/16 larger than needed
    m = torch.arange(1, 1 << 16)
    sizes = bucketed(m)
    assert bool((sizes >= m).all()) and bool((sizes * 16 <= m * 17).all())
    assert len(sizes.unique()) == 15 + 16 * 12 + 1  # 1-15, 16 per octave to 2^16
    assert sizes.tolist() == [bucket(int(c)) for c in m]  # the decode path's Python twin
    # where the kernels do not compile per shape (FP32 on CPUs), nothing is padded
    x32 = x.float()
    same, same_counts, none = pad_rows(x32, counts)
    assert same is x32 and same_counts is counts and none is None


def test_moe_routed_equals_per_token_reference(tiny):
    moe = MoE(tiny)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 9, tiny.dim)
    y = moe(x)
    w, idx, _ = moe.gate(x.view(-1, tiny.dim))
    ref = moe.shared_experts(x.view(-1, tiny.dim))
    for n in range(idx.shape[0]):  # token by token, expert by expert
        for k in range(idx.shape[1]):
            e = idx[n, k]
            xe = x.view(-1, tiny.dim)[n]
            ref[n] += w[n, k] * (
                (F.silu(xe @ moe.experts.w1[e]) * (xe @ moe.experts.w3[e])) @ moe.experts.w2[e]
            )
    assert torch.allclose(y.view(-1, tiny.dim), ref, atol=1e-5)
    assert torch.equal(moe.last_counts, torch.bincount(idx.flatten(), minlength=tiny.n_routed_experts))


def test_sort_by_expert_groups_slots():
    idx = torch.tensor([[2, 0], [1, 2], [0, 2]])
    order, counts = sort_by_expert(idx, 4)
    assert counts.tolist() == [2, 1, 3, 0]
    assert idx.flatten()[order].tolist() == [0, 0, 1, 2, 2, 2]


# ---- balancing ----------------------------------------------------------------------------------
def test_bias_update_sign_rule():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([5, 1, 3, 3]), gamma=0.01)
    assert torch.allclose(bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_model_bias_update_from_known_routing(tiny):
    model = Transformer(tiny).eval()
    for moe in model.moe_layers():
        moe.gate.weight.data.zero_()  # every affinity 0.5: the bias alone decides
        moe.gate.e_score_correction_bias.copy_(torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0]))
    with torch.no_grad():
        model.loss(torch.randint(0, tiny.vocab_size, (2, 9)))
    main_moe = model.moe_layers()[0]
    assert main_moe.last_counts.tolist() == [16, 16, 0, 0, 0, 0, 0, 0]  # 2 x 8 tokens, top-2
    model.update_expert_bias(gamma=0.001)
    expected = torch.tensor([1.0 - 0.001, 1.0 - 0.001] + [0.001] * 6)
    for moe in model.moe_layers():
        assert torch.allclose(moe.gate.e_score_correction_bias, expected)


def test_balance_loss_matches_formula():
    B, T, E, K = 2, 5, 6, 2
    scores = torch.rand(B * T, E)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * T)])
    got = balance_loss(scores, idx, B, K)
    want = 0.0
    for b in range(B):
        s = scores[b * T : (b + 1) * T]
        ids = idx[b * T : (b + 1) * T]
        for i in range(E):
            f = E / (K * T) * sum(int(i in row.tolist()) for row in ids)
            p = (s[:, i] / s.sum(dim=1)).mean()
            want += f * p / B
    assert got.item() == pytest.approx(float(want), rel=1e-5)


# ---- MTP and the loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_module_k_predicts_token_t_plus_k_plus_1(tiny, depth):
    cfg = tiny.replace(n_mtp_layers=depth)
    model = _model(cfg)
    T = 12
    tokens = torch.randint(0, cfg.vocab_size, (2, T + 1))  # packed: inputs t_0..t_{T-1}, labels t_1..t_T
    out = model.loss(tokens)
    with torch.no_grad():
        h = model.hidden_states(tokens[:, :T])
        for k in range(1, depth + 1):
            # module k at position i reads t_{i+k}, predicts t_{i+k+1}; only i <= T-1-k has a target
            n = T - k
            h = model.mtp_hidden(k, h, torch.cat([tokens[:, k : T + 1], tokens.new_zeros(2, k - 1)], dim=1))
            logits = model.mtp_logits(k, h)[:, :n]
            want = F.cross_entropy(
                logits.reshape(-1, cfg.vocab_size), tokens[:, k + 1 : k + 1 + n].reshape(-1)
            )
            assert out.mtp_per_depth[k - 1].item() == pytest.approx(want.item(), rel=1e-5)


def test_loss_combines_parts_and_ignores_missing_labels(tiny):
    model = Transformer(tiny).train()
    ids = torch.randint(0, tiny.vocab_size, (2, 10))
    labels = torch.randint(0, tiny.vocab_size, (2, 10))
    labels[:, :4] = IGNORE_INDEX
    out = model.loss(ids, labels, mtp_lambda=0.3, balance_alpha=0.01)
    assert out.total.item() == pytest.approx((out.main + 0.3 * out.mtp + 0.01 * out.balance).item(), rel=1e-6)
    n_moe = len(model.moe_layers())
    assert 0.9 * n_moe < out.balance.item() < 3 * n_moe  # each layer's loss is ~1 when balanced
    with torch.no_grad():
        logits = model(ids)
    want = F.cross_entropy(logits[:, 4:].reshape(-1, tiny.vocab_size), labels[:, 4:].reshape(-1))
    assert out.main.item() == pytest.approx(want.item(), rel=1e-5)
    out.total.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "gate.weight" in n)


def test_param_counts_match_modules():
    for name in ("tiny", "small"):
        cfg = ModelConfig.from_preset(name)
        counts = cfg.param_counts()
        model = Transformer(cfg)
        assert counts["total_with_mtp"] == model.num_params()
        assert counts["mtp"] == sum(p.numel() for p in model.mtp.parameters())


def test_671b_parameter_count_matches_paper():
    c = ModelConfig.from_preset("671b").param_counts()
    assert 670e9 < c["total"] < 672e9  # 671B total
    assert 36.5e9 < c["activated"] < 38e9  # ~37B activated per token
    assert 684e9 < c["total"] + c["mtp_in_checkpoint"] < 686e9  # the released 685B with the MTP module
