"""The precision policy: exactly the GEMMs of DESIGN §4 are swapped, checkpoints stay loadable, and a
converted model trains like the original."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.fp8 import Fp8GroupedExperts, Fp8Linear, Fp8MLP, convert, fp8_gemm_modules
from dsv3.model.moe import Gate
from dsv3.model.transformer import Transformer


def _model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg)


def test_convert_swaps_exactly_the_fp8_gemms(tiny):
    model = convert(_model(tiny))
    swapped = fp8_gemm_modules(model)
    n_blocks = tiny.n_layers + tiny.n_mtp_layers
    n_moe = tiny.n_moe_layers + tiny.n_mtp_layers
    # 5 MLA projections per block, one dense MLP per dense layer, shared + routed experts per MoE
    # block, and eh_proj per MTP module
    expected = 5 * n_blocks + tiny.n_dense_layers + 2 * n_moe + tiny.n_mtp_layers
    assert len(swapped) == expected
    for name, cfg in swapped.items():
        assert cfg.fp8
        routed = name.endswith(".experts")  # not ".shared_experts"
        assert cfg.cache_e5m6 == name.endswith("o_proj")
        assert cfg.pow2_input == (name.endswith("o_proj") or routed) and cfg.pow2_grad == routed
    # left in high precision: embedding, head, gate, norms (and the attention core, which has no module)
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    assert all(type(m.gate) is Gate for m in model.moe_layers())
    assert isinstance(model.layers[0].mlp, Fp8MLP) and isinstance(
        model.layers[1].mlp.experts, Fp8GroupedExperts
    )
    assert isinstance(model.layers[1].mlp.shared_experts, Fp8MLP)
    assert isinstance(model.mtp[0].eh_proj, Fp8Linear)


def test_convert_without_q_lora_and_twice(tiny):
    model = convert(convert(_model(tiny.replace(q_lora_rank=None))))
    assert isinstance(model.layers[0].self_attn.q_proj, Fp8Linear)
    n_blocks = tiny.n_layers + tiny.n_mtp_layers  # q_proj replaces q_a_proj + q_b_proj in each block
    assert len(fp8_gemm_modules(model)) == len(fp8_gemm_modules(convert(_model(tiny)))) - n_blocks
    with pytest.raises(ValueError, match="recipe"):
        convert(model, "fp4")


def test_state_dict_parameters_and_kv_b_weight_survive_conversion(tiny):
    model = _model(tiny)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kv_b = model.layers[0].self_attn.kv_b_weight().clone()
    convert(model)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # same objects: optimizers stay valid
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(model.layers[0].self_attn.kv_b_weight(), kv_b)
    fresh = convert(Transformer(tiny))
    fresh.load_state_dict(state)  # an unconverted checkpoint loads into a converted model
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def _fixed_routing(model: Transformer) -> Transformer:
    # Near-tied router scores at initialisation flip top-k choices under any perturbation; a large,
    # distinct selection bias fixes which experts each token visits, so gradients can be compared.
    for moe in model.moe_layers():
        bias = moe.gate.e_score_correction_bias
        bias.copy_(torch.linspace(0, 10, bias.numel())[torch.randperm(bias.numel())])
    return model


def test_converted_model_matches_high_precision_loss_and_gradients(tiny):
    models = {
        "ref": _fixed_routing(_model(tiny)),
        "fp8": convert(_fixed_routing(_model(tiny))),
        "bf16": convert(_fixed_routing(_model(tiny)), "bf16"),
    }
    ids = torch.randint(0, tiny.vocab_size, (2, 33))
    losses, grads = {}, {}
    for name, m in models.items():
        out = m.loss(ids)
        out.total.backward()
        losses[name] = out.main.item()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert abs(losses["fp8"] - losses["ref"]) / losses["ref"] < 1e-2
    assert abs(losses["bf16"] - losses["ref"]) / losses["ref"] < 1e-3
    assert grads["fp8"].keys() == grads["ref"].keys()
    for recipe, bound in (("fp8", 0.98), ("bf16", 0.999)):
        for n, g in grads["ref"].items():
            if g.norm() > 0:
                assert F.cosine_similarity(grads[recipe][n].flatten(), g.flatten(), dim=0) > bound, n
