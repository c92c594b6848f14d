"""The MoE in explicit halves (route -> dispatch -> experts -> combine), the step's expert counts
reduced in one collective, and choices made from one rank's measurement agreed by all ranks."""

import copy

import pytest
import torch
from torch import nn
from word_corpus import write_word_corpus

from dsv3 import ModelConfig
from dsv3.data.dataset import DataConfig, prepare_data
from dsv3.model.moe import MoE, balance_loss
from dsv3.model.transformer import Transformer
from dsv3.parallel.launch import run_ranks
from dsv3.parallel.pipeline.phases import PhasedPass, StagePass
from dsv3.parallel.pipeline.stages import PipelineStage, split_batch, split_layers
from dsv3.train import TrainConfig, Trainer
from dsv3.train.strategy import Strategy


def _moe(cfg: ModelConfig) -> MoE:
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.2)
    return moe.train()


def test_the_halves_compose_to_the_forward_and_return_counts_and_balance_as_data():
    cfg = ModelConfig.from_preset("tiny")
    moe = _moe(cfg)
    twin = copy.deepcopy(moe)
    x = torch.randn(2, 9, cfg.dim)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 9, cfg.dim)
    want = moe(xa)
    (want * g).sum().backward()
    call = twin.route(xb)
    twin.dispatch(call)
    twin.run_experts(call)
    got = twin.combine(call)
    (got * g).sum().backward()
    assert torch.equal(got, want) and torch.equal(xb.grad, xa.grad)
    for (name, p), q in zip(moe.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
    _, idx, scores = moe.gate(x.view(-1, cfg.dim))
    assert torch.equal(call.counts, torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts))
    assert torch.equal(call.balance, balance_loss(scores, idx, 2, cfg.n_activated_experts))
    assert torch.equal(twin.last_counts, call.counts)  # what EPLB statistics read, recorded by route


def test_the_loss_carries_every_layers_counts():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).train()
    out = model.loss(torch.randint(0, 512, (2, 17)))
    layers = model.moe_layers()
    assert out.counts.shape == (len(layers), model.config.n_routed_experts)
    assert torch.equal(out.counts, torch.stack([m.last_counts for m in layers]))
    assert int(out.counts[0].sum()) == 2 * 16 * model.config.n_activated_experts


def test_pipeline_phases_run_the_moes_own_halves():
    """No copy of the MoE forward in the phases: a replaced half is what the phased pass runs."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", n_layers=2))
    ref = copy.deepcopy(model)
    layout = split_layers(2, len(model.mtp), 1)
    calls = []
    for m in model.moe_layers():
        m.run_experts = lambda call, m=m: (calls.append(m), MoE.run_experts(m, call))[1]
    batch = torch.randint(0, 512, (2, 17))
    mb = split_batch(batch, None, 1)[0]
    p = PhasedPass(PipelineStage(model, 0, layout, 0.3, 0.01), None, mb)
    q = StagePass(PipelineStage(ref, 0, layout, 0.3, 0.01), None, mb)
    for passes in (p, q):
        list(passes.forward_steps())
        list(passes.backward_steps(lambda: None, 1.0))
    assert len(calls) == len(model.moe_layers())  # main and MTP blocks, once each
    torch.testing.assert_close(p.parts, q.parts, rtol=1e-6, atol=1e-6)  # FP32, summed in another order
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


class _CountingStrategy(Strategy):
    """The one-process strategy, recording every reduce_sum (what a process group would run)."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.sums.append((t.dtype, tuple(t.shape)))
        return t


def test_a_step_reduces_the_counts_of_all_layers_in_one_collective(tmp_path):
    data = write_word_corpus(tmp_path / "corpus")
    dataset = prepare_data(
        DataConfig(
            data=str(data), vocab_size=300, val_fraction=0.1, cache=str(tmp_path / "c"), progress=False
        )
    )
    cfg = TrainConfig(
        preset="tiny", steps=1, out=str(tmp_path / "run"), data=str(data), seq_len=32, micro_batch=2,
        batch_start=4, batch_end=4, precision="fp32", tensorboard=False, val_fraction=0.1,
    )  # fmt: skip
    strategy = _CountingStrategy()
    trainer = Trainer(cfg, dataset=dataset, show_progress=False, strategy=strategy)
    before = [m.gate.e_score_correction_bias.clone() for m in trainer.model.moe_layers()]
    trainer.train_step()  # two micro-batches
    layers = len(trainer.model.moe_layers())
    counts = [s for s in strategy.sums if s[0] == torch.long]
    assert counts == [(torch.long, (layers, trainer.model_cfg.n_routed_experts))]
    assert int(trainer.last_counts.sum()) == 4 * 32 * trainer.model_cfg.n_activated_experts * layers
    after = [m.gate.e_score_correction_bias for m in trainer.model.moe_layers()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # the bias update still ran


# ---- rank agreement ------------------------------------------------------------------------------------
def _disagreeing_rank(rank: int, world: int) -> dict:
    """Each rank's own measurement says something else: rank 0 slow BF16, rank 1 fast BF16."""
    from dsv3 import ModelConfig, bf16
    from dsv3.train import metrics, precision

    precision.matmul_peak = lambda dtype, *a, **k: 1e9 if dtype == torch.float32 else (1e7, 1e10)[rank]
    bf16.needed = lambda device="cpu": rank == 0
    tiny = ModelConfig.from_preset("tiny")
    return {
        "precision": precision.pick_precision("auto", tiny, 2, 32),
        "requested": precision.pick_precision("fp32", tiny, 2, 32),
        "bf16_needed": metrics.decided_by_rank0(bf16.needed),
    }


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_ranks_take_rank_0s_choice_where_their_measurements_differ():
    results = run_ranks(_disagreeing_rank, 2, timeout=30, deadline=90)
    for res in results:
        assert res["precision"][0] == "fp32" and "slow" in res["precision"][1]  # rank 0's measurement
        assert res["requested"] == ("fp32", "requested")
        assert res["bf16_needed"] is True
