"""Split backward (I now, W later) for every GEMM module the model may hold: FP8 and BF16-on-FP32
linears, MLPs and grouped experts give, deferred, the gradients of their undeferred backward; an
FP8 model cut into stages with a split backward gives the gradients of its plain backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsv3 import ModelConfig
from dsv3.bf16 import Bf16GroupedExperts, Bf16Linear
from dsv3.fp8.linear import Fp8Linear
from dsv3.fp8.mlp import Fp8GroupedExperts, Fp8MLP
from dsv3.fp8.operand import FP8
from dsv3.fp8.policy import convert
from dsv3.model.layers import MLP
from dsv3.model.moe import GroupedExperts
from dsv3.model.transformer import Transformer
from dsv3.parallel.pipeline.phases import PhasedPass
from dsv3.parallel.pipeline.stages import PipelineStage, split_batch, split_layers
from dsv3.parallel.pipeline.wgrad import WeightGradStore, defer_weight_grads, restore_weight_grads

COUNTS = torch.tensor([3, 0, 21, 2])  # rows per expert, one without tokens, one padded in BF16 (pad_rows)


def _experts(cls):
    torch.manual_seed(0)
    e = GroupedExperts(4, 128, 64)
    for w in e.parameters():
        nn.init.normal_(w, std=0.1)
    return (
        Fp8GroupedExperts.from_experts(e, FP8)
        if cls is Fp8GroupedExperts
        else Bf16GroupedExperts.from_experts(e)
    )


def _linear(cls):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True)
    if cls is Fp8Linear:
        return Fp8Linear.from_linear(lin, FP8)
    return Bf16Linear.from_linear(lin)


def _mlp(_cls):
    torch.manual_seed(0)
    return Fp8MLP.from_mlp(MLP(128, 64), FP8)


def _bf16_experts(_cls):
    torch.manual_seed(0)
    e = GroupedExperts(4, 128, 64)
    for w in e.parameters():
        nn.init.normal_(w, std=0.1)
    return e.to(torch.bfloat16)  # BF16 kernels: its rows are padded to bucketed sizes on CPUs


CASES = [  # (module factory, class, input shape, takes counts)
    (_linear, Fp8Linear, (2, 5, 128), False),
    (_linear, Bf16Linear, (2, 5, 128), False),
    (_mlp, Fp8MLP, (2, 5, 128), False),
    (_experts, Fp8GroupedExperts, (26, 128), True),
    (_experts, Bf16GroupedExperts, (26, 128), True),
    (_bf16_experts, GroupedExperts, (26, 128), True),
]


@pytest.mark.parametrize("make,cls,shape,routed", CASES, ids=[c[1].__name__ for c in CASES])
def test_deferred_weight_gradients_equal_the_undeferred_ones(make, cls, shape, routed):
    module = make(cls)
    assert type(module) is cls
    ref = copy.deepcopy(module)
    dtype = next(module.parameters()).dtype
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run(m):
        xi = x.clone().requires_grad_()
        out = m(xi, COUNTS) if routed else m(xi)
        return xi, out

    xi_ref, out_ref = run(ref)
    dy = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    out_ref.backward(dy)

    store = WeightGradStore()
    assert defer_weight_grads(module, store) >= 1
    xi, out = run(module)
    assert torch.equal(out, out_ref)
    with store.deferring("mb0"):
        out.backward(dy)
    assert torch.equal(xi.grad, xi_ref.grad)  # the input gradient now (I)
    weights = [p for n, p in module.named_parameters() if not n.endswith("bias")]
    assert weights and all(p.grad is None for p in weights)  # the weights' later
    store.run("mb0")  # W
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name
        assert not p.grad.requires_grad
    restore_weight_grads(module)
    assert "forward" not in vars(module)


def test_fp8_stages_with_a_split_backward_equal_the_fp8_model():
    """Attention and MLP linears, shared and routed experts in FP8, through stages phase by phase,
    weight gradients deferred (I, then W) == the FP8 model's own backward."""
    torch.manual_seed(0)
    ref = convert(Transformer(ModelConfig.from_preset("tiny", n_layers=3)))
    model = copy.deepcopy(ref)
    batch = torch.randint(0, ref.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    outs = [ref.loss(mb, mtp_lambda=0.3, balance_alpha=0.01) for mb in batch.chunk(2)]
    (sum(o.total for o in outs) / 2).backward()

    layout = split_layers(3, 1, 2)
    stages = [PipelineStage(model, s, layout, 0.3, 0.01) for s in range(2)]
    store = WeightGradStore()
    changed = defer_weight_grads(nn.ModuleList(stages), store)
    fp8_layers = [m for m in model.modules() if isinstance(m, (Fp8Linear, Fp8MLP, Fp8GroupedExperts))]
    assert fp8_layers and all(getattr(m, "_wgrad_store", None) is store for m in fp8_layers)
    assert changed >= len(fp8_layers)
    for k, mb in enumerate(split_batch(batch, None, 2)):
        first = PhasedPass(stages[0], None, mb)
        list(first.forward_steps())
        last = PhasedPass(stages[1], first.hidden.detach().requires_grad_(), mb)
        list(last.forward_steps())
        with store.deferring((k, 1)):
            list(last.backward_steps(lambda: None, 0.5))
        with store.deferring((k, 0)):
            list(first.backward_steps(lambda last=last: last.input_grad, 0.5))
    assert all(m.experts.w1.grad is None for m in model.modules() if hasattr(m, "experts"))
    for key in store.pending():
        store.run(key)
    errs = [(p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())]
    assert max(errs) < 1e-5
