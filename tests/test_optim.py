"""MixedPrecisionAdamW against torch.optim.AdamW; BF16 moments, FP32 masters, state dict round trip."""

import copy

import pytest
import torch

from dsv3.optim import MixedPrecisionAdamW, param_groups

BETAS = (0.9, 0.95)


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g)
    Y = X @ torch.randn(32, 8, generator=g) + 0.1 * torch.randn(256, 8, generator=g)
    return X, Y


def _train(opt_cls, steps: int, dtype=torch.float32, state=None, **kw):
    """Linear regression with a decayed matrix and an undecayed bias; returns (params, losses, opt)."""
    X, Y = _problem()
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter((0.1 * torch.randn(32, 8, generator=g)).to(dtype))
    b = torch.nn.Parameter(torch.zeros(8, dtype=dtype))
    groups = [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]
    opt = opt_cls(groups, lr=1e-2, betas=BETAS, eps=1e-8, **kw)
    if state is not None:
        w.data.copy_(state["w"])
        b.data.copy_(state["b"])
        opt.load_state_dict(state["opt"])
    losses = []
    for _ in range(steps):
        loss = ((X.to(dtype) @ w + b - Y.to(dtype)).float() ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return (w, b), losses, opt


def test_fp32_moments_match_torch_adamw_exactly():
    """The algorithm (decoupled decay, bias correction, eps placement) is torch's AdamW."""
    (w_ref, b_ref), loss_ref, _ = _train(torch.optim.AdamW, 100)
    (w, b), loss, _ = _train(MixedPrecisionAdamW, 100, moment_dtype=torch.float32)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bf16_moments_agree_with_torch_adamw_within_bf16_tolerance(param_dtype):
    (w_ref, _), loss_ref, _ = _train(torch.optim.AdamW, 200)
    (w, _), loss, opt = _train(MixedPrecisionAdamW, 200, dtype=param_dtype)
    rel = ((w.float() - w_ref).norm() / w_ref.norm()).item()
    assert rel < 2**-7  # two BF16 ulps of relative drift after 200 steps
    assert abs(loss[-1] - loss_ref[-1]) / loss_ref[-1] < 1e-2
    assert loss[-1] < 0.5 * loss[0]  # it does train
    state = opt.state[w]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    if param_dtype == torch.float32:
        assert "master" not in state  # an FP32 parameter is its own master
    else:
        assert state["master"].dtype == torch.float32
        assert torch.equal(w.detach(), state["master"].to(torch.bfloat16))  # the compute copy
        # the master keeps the updates a BF16 weight would round away
        assert not torch.equal(state["master"], w.detach().float())


def test_bf16_master_in_state_beats_plain_bf16_training():
    """Why the FP32 master matters: AdamW applied directly to BF16 weights drifts further."""
    (w_ref, _), _, _ = _train(torch.optim.AdamW, 300)
    (w_mp, _), _, _ = _train(MixedPrecisionAdamW, 300, dtype=torch.bfloat16)
    (w_bf, _), _, _ = _train(torch.optim.AdamW, 300, dtype=torch.bfloat16)
    err = lambda w: ((w.float() - w_ref).norm() / w_ref.norm()).item()  # noqa: E731
    assert err(w_mp) < err(w_bf)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_exactly(param_dtype):
    (w_full, b_full), _, _ = _train(MixedPrecisionAdamW, 20, dtype=param_dtype)
    (w, b), _, opt = _train(MixedPrecisionAdamW, 10, dtype=param_dtype)
    saved = {"w": w.detach().clone(), "b": b.detach().clone(), "opt": copy.deepcopy(opt.state_dict())}
    (w2, b2), _, opt2 = _train(MixedPrecisionAdamW, 10, dtype=param_dtype, state=saved)
    assert torch.equal(w2, w_full) and torch.equal(b2, b_full)
    state = opt2.state[w2]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["step"] == 20  # dtypes survive loading
    if param_dtype == torch.bfloat16:
        assert state["master"].dtype == torch.float32
    assert opt2.state_bytes() == opt.state_bytes()


def test_param_groups_decay_matrices_only(tiny):
    from dsv3.model.transformer import Transformer

    model = Transformer(tiny)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    assert any(names[id(p)].endswith("experts.w1") for p in decay["params"])


def test_invalid_hyperparameters_fail():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="betas"):
        MixedPrecisionAdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        MixedPrecisionAdamW(p, lr=-1.0)
