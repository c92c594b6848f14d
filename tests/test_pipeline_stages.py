"""Pipeline stages, phases and split weight gradients in one process, against the single-device model."""

import copy

import pytest
import torch
from torch import nn

from dsv3 import ModelConfig
from dsv3.model.moe import GroupedExperts
from dsv3.model.transformer import Transformer
from dsv3.parallel.pipeline.overlap import interleave
from dsv3.parallel.pipeline.phases import COMM, COMPUTE, PhasedPass, StagePass
from dsv3.parallel.pipeline.stages import PipelineStage, StageError, split_batch, split_layers
from dsv3.parallel.pipeline.wgrad import WeightGradStore, defer_weight_grads, restore_weight_grads

LAMBDA, ALPHA = 0.3, 0.01  # a large alpha so that a lost balance-loss gradient would show


def _models(n_layers: int = 4) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    ref = Transformer(ModelConfig.from_preset("tiny", n_layers=n_layers))
    return ref, copy.deepcopy(ref)


def _reference(ref: Transformer, batch: torch.Tensor, chunks: int) -> list[float]:
    outs = [ref.loss(mb, mtp_lambda=LAMBDA, balance_alpha=ALPHA) for mb in batch.chunk(chunks)]
    (sum(o.total for o in outs) / chunks).backward()
    keys = ("total", "main", "mtp", "balance")
    return [sum(float(getattr(o, k).detach()) for o in outs) / chunks for k in keys]


def _max_grad_error(ref: nn.Module, model: nn.Module) -> float:
    errs = [(p.grad - q.grad).abs().max().item() for p, q in zip(ref.parameters(), model.parameters())]
    assert all(q.grad is not None for q in model.parameters())
    return max(errs)


def test_split_layers_is_contiguous_balanced_and_refuses_too_many_stages():
    for n_layers, n_mtp, stages in [(4, 1, 2), (4, 1, 5), (61, 1, 16), (7, 0, 3), (3, 2, 4)]:
        layout = split_layers(n_layers, n_mtp, stages)
        flat = [i for r in layout.layers for i in r]
        assert flat == list(range(n_layers)) and layout.num_stages == stages
        units = [len(r) for r in layout.layers]
        units[-1] += n_mtp
        assert min(units) >= 1 and max(units) - min(units) <= 1
    with pytest.raises(StageError, match="num_stages.*6"):
        split_layers(4, 1, 6)


def test_split_batch_refuses_uneven_micro_batches():
    with pytest.raises(StageError, match="input_ids: a batch of 5 .* chunks=2"):
        split_batch(torch.zeros(5, 9, dtype=torch.long), None, 2)


def _run_sequential(model, stages, batch, chunks, pass_cls, store=None, split=False):
    """Every micro-batch forward through all stages, then backward (I + W when split)."""
    parts = torch.zeros(4, dtype=torch.float64)
    for k, mb in enumerate(split_batch(batch, None, chunks)):
        passes, x = [], None
        for stage in stages:
            p = pass_cls(stage, None if x is None else x.detach().requires_grad_(), mb)
            list(p.forward_steps())
            passes.append(p)
            parts += p.parts
            x = p.hidden
        grad = None
        for s in reversed(range(len(stages))):
            if split:
                with store.deferring((k, s)):
                    list(passes[s].backward_steps(lambda g=grad: g, 1 / chunks))
            else:
                list(passes[s].backward_steps(lambda g=grad: g, 1 / chunks))
            grad = passes[s].input_grad
        if split:
            for s in range(len(stages)):
                store.run((k, s))
    return (parts / chunks).tolist()


@pytest.mark.parametrize("num_stages", [2, 3, 5])
@pytest.mark.parametrize("pass_cls", [StagePass, PhasedPass])
def test_stages_in_sequence_equal_the_model(num_stages, pass_cls):
    ref, model = _models()
    batch = torch.randint(0, ref.config.vocab_size, (4, 17))
    want = _reference(ref, batch, chunks=2)
    layout = split_layers(4, 1, num_stages)
    stages = [PipelineStage(model, s, layout, LAMBDA, ALPHA) for s in range(num_stages)]
    got = _run_sequential(model, stages, batch, 2, pass_cls)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)  # total, main, mtp, balance
    assert _max_grad_error(ref, model) < 1e-5


def test_last_stage_shares_the_embedding_with_the_first():
    ref, model = _models()
    layout = split_layers(4, 1, 3)
    first, last = (
        PipelineStage(model, 0, layout, LAMBDA, ALPHA),
        PipelineStage(model, 2, layout, LAMBDA, ALPHA),
    )
    assert last.embed_tokens.weight is first.embed_tokens.weight is model.embed_tokens.weight
    assert PipelineStage(model, 1, layout, LAMBDA, ALPHA).embed_tokens is None


def test_deferred_linear_and_experts_match_autograd():
    torch.manual_seed(0)
    lin, experts = nn.Linear(16, 8, bias=True), GroupedExperts(4, 8, 4)
    for w in experts.parameters():
        nn.init.normal_(w, std=0.3)
    ref_lin, ref_exp = copy.deepcopy(lin), copy.deepcopy(experts)
    x = torch.randn(2, 5, 16)
    counts = torch.tensor([3, 0, 5, 2])  # an expert with no tokens
    dy = torch.randn(10, 8)

    def run(lin, experts):
        xi = x.clone().requires_grad_()
        out = experts(lin(xi).reshape(10, 8), counts)
        return xi, out

    xi_ref, out_ref = run(ref_lin, ref_exp)
    out_ref.backward(dy)

    store = WeightGradStore()
    assert defer_weight_grads(nn.ModuleList([lin, experts]), store) == 2
    xi, out = run(lin, experts)
    assert torch.equal(out, out_ref)
    with store.deferring("mb0"):
        out.backward(dy)
    torch.testing.assert_close(xi.grad, xi_ref.grad, rtol=0, atol=1e-6)  # input gradient now
    assert all(p.grad is None for p in [*lin.parameters(), *experts.parameters()])  # weights later
    assert store.pending() == ["mb0"]
    store.run("mb0")
    for p, q in zip(
        [*ref_lin.parameters(), *ref_exp.parameters()], [*lin.parameters(), *experts.parameters()]
    ):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6)
        assert not q.grad.requires_grad  # W runs outside autograd: no graph may hang on a gradient
    with pytest.raises(RuntimeError, match="no pending weight gradients for mb0"):
        store.run("mb0")
    restore_weight_grads(lin)
    assert "forward" not in vars(lin)


@pytest.mark.parametrize("pass_cls", [StagePass, PhasedPass])
def test_split_backward_through_stages_equals_the_model(pass_cls):
    ref, model = _models()
    batch = torch.randint(0, ref.config.vocab_size, (2, 17))
    _reference(ref, batch, chunks=2)
    layout = split_layers(4, 1, 2)
    stages = [PipelineStage(model, s, layout, LAMBDA, ALPHA) for s in range(2)]
    store = WeightGradStore()
    assert defer_weight_grads(nn.ModuleList(stages), store) > 0
    _run_sequential(model, stages, batch, 2, pass_cls, store=store, split=True)
    assert store.pending() == []
    assert _max_grad_error(ref, model) < 1e-5


def test_interleaved_pair_puts_each_comm_phase_beside_a_compute_phase():
    """DualPipe's F&B on a middle stage of MoE blocks: the forward of micro-batch 1 and the backward
    of micro-batch 0, phase by phase; gradients must not change."""
    ref, model = _models(n_layers=4)
    batch = torch.randint(0, ref.config.vocab_size, (2, 17))
    _reference(ref, batch, chunks=2)
    layout = split_layers(4, 1, 3)  # stage 1: the MoE blocks 1 and 2
    stages = [PipelineStage(model, s, layout, LAMBDA, ALPHA) for s in range(3)]
    mbs = split_batch(batch, None, 2)

    def forward(s, k, x):
        p = PhasedPass(stages[s], None if x is None else x.detach().requires_grad_(), mbs[k])
        list(p.forward_steps())
        return p

    f = {(0, 0): forward(0, 0, None), (0, 1): forward(0, 1, None)}
    f[(1, 0)] = forward(1, 0, f[(0, 0)].hidden)
    f[(2, 0)] = forward(2, 0, f[(1, 0)].hidden)
    list(f[(2, 0)].backward_steps(lambda: None, 0.5))

    f[(1, 1)] = PhasedPass(stages[1], f[(0, 1)].hidden.detach().requires_grad_(), mbs[1])
    done = []
    order = interleave(
        [
            (f[(1, 1)].forward_steps(), lambda: done.append("F")),
            (f[(1, 0)].backward_steps(lambda: f[(2, 0)].input_grad, 0.5), lambda: done.append("B")),
        ]
    )
    kind = {p.name: p.kind for p in f[(1, 1)].phases}
    assert order[:4] == ["F:attention", "B:combine", "F:dispatch", "B:mlp"] and done == ["F", "B"]
    assert len(order) == 16
    for a, b in zip(order[::2], order[1::2]):
        assert {kind[a[2:]], kind[b[2:]]} == {COMM, COMPUTE}, (a, b)

    list(f[(0, 0)].backward_steps(lambda: f[(1, 0)].input_grad, 0.5))
    f[(2, 1)] = forward(2, 1, f[(1, 1)].hidden)
    list(f[(2, 1)].backward_steps(lambda: None, 0.5))
    list(f[(1, 1)].backward_steps(lambda: f[(2, 1)].input_grad, 0.5))
    list(f[(0, 1)].backward_steps(lambda: f[(1, 1)].input_grad, 0.5))
    assert _max_grad_error(ref, model) < 1e-5
