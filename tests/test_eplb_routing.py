"""Replica routing == unreplicated MoE; load statistics window, hooks and file; the CLI."""

import json
import re

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.infer.eplb.dynamic import split_tokens
from dsv3.infer.eplb.placement import Placement
from dsv3.infer.eplb.planner import plan
from dsv3.infer.eplb.report import plan_eplb_main
from dsv3.infer.eplb.routing import ReplicatedMoE, replica_of_copies, replicate_model
from dsv3.infer.eplb.stats import ExpertLoadStats, read_loads
from dsv3.model.moe import MoE
from dsv3.model.transformer import Transformer


def tiny_moe(cfg: ModelConfig) -> MoE:
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return moe.eval()


@pytest.mark.parametrize("slots,gpus", [(8, 4), (12, 4), (16, 8)])
def test_replicated_moe_equals_unreplicated(tiny, slots, gpus):
    moe = tiny_moe(tiny)
    x = torch.randn(3, 20, tiny.dim)
    with torch.no_grad():
        ref = moe(x)
        counts = moe.last_counts.clone()
        p = plan(counts[None].double() + torch.rand(1, tiny.n_routed_experts), slots, 1, 1, gpus)
        rep = ReplicatedMoE(moe, p.phy2log[0], p.log2phy[0], p.logcnt[0])
        out = rep(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(moe.last_counts, counts)  # logical counts still reported
    # every replica gets an even share of its expert's tokens (round-robin: within one)
    per_slot = rep.last_slot_counts
    for e in range(tiny.n_routed_experts):
        shares = per_slot[p.log2phy[0, e, : p.logcnt[0, e]]]
        assert shares.sum() == counts[e] and shares.max() - shares.min() <= 1


def test_quota_routing_equals_unreplicated(tiny):
    moe = tiny_moe(tiny)
    x = torch.randn(2, 32, tiny.dim)
    with torch.no_grad():
        ref = moe(x)
        counts = moe.last_counts.clone()
        p = plan(torch.ones(1, tiny.n_routed_experts), 16, 1, 1, 4)
        rep = ReplicatedMoE(moe, p.phy2log[0], p.log2phy[0], p.logcnt[0])
        rep.quota = split_tokens(p.phy2log[0], torch.ones(16, dtype=torch.bool), 4, counts)
        out = rep(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(rep.last_slot_counts, rep.quota)  # each slot got exactly its quota


def test_replica_of_copies_rejects_wrong_quota():
    idx = torch.tensor([[0, 1], [0, 1]])
    p = Placement.from_phy2log(torch.tensor([[0, 1, 0, 1]]), 2, 2)
    with pytest.raises(ValueError, match="quota"):
        replica_of_copies(idx, p.log2phy[0], p.logcnt[0], torch.tensor([1, 1, 1, 0]))


def test_whole_model_with_placement_and_statistics(tiny):
    model = Transformer(tiny).eval()
    ids = torch.randint(0, tiny.vocab_size, (2, 12))
    L = len(model.moe_layers())
    with torch.no_grad():
        ref = model(ids)
    p = plan(torch.rand(L, tiny.n_routed_experts), 12, tiny.n_expert_groups, 2, 4)
    replicate_model(model, p.phy2log, p.log2phy, p.logcnt)
    replicate_model(model, p.phy2log, p.log2phy, p.logcnt)  # idempotent: no double wrapping
    assert sum(isinstance(m, ReplicatedMoE) for m in model.modules()) == L
    stats = ExpertLoadStats(L, tiny.n_routed_experts, window=2)
    stats.attach(model)
    with torch.no_grad():
        for _ in range(3):
            out = model(ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(stats) == 2  # the window keeps the last two forwards
    loads = stats.loads()
    # main-model layers saw 2 * 12 tokens x K experts per forward; the MTP layer did not run
    assert (loads[:-1].sum(1) == 2 * 2 * 12 * tiny.n_activated_experts).all() and loads[-1].sum() == 0


def test_statistics_window_and_file(tmp_path):
    stats = ExpertLoadStats(2, 4, window=3)
    recs = [torch.randint(0, 10, (2, 4)) for _ in range(5)]
    for r in recs:
        stats.push(r)
    assert torch.equal(stats.loads(), sum(recs[-3:]))
    stats.save(tmp_path / "loads.safetensors")
    back = ExpertLoadStats.load(tmp_path / "loads.safetensors")
    assert (back.n_layers, back.n_experts, back.window) == (2, 4, 3)
    assert torch.equal(back.loads(), stats.loads())
    back.push(recs[0])  # the window continues after loading
    assert torch.equal(back.loads(), recs[3] + recs[4] + recs[0])
    (tmp_path / "l.json").write_text(json.dumps({"loads": [[1, 2], [3, 4]]}))
    assert read_loads(tmp_path / "l.json").tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="counts: expected shape"):
        stats.push(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="window"):
        ExpertLoadStats(2, 4, window=0)


def test_cli_prints_balance_and_draws_heatmap(tmp_path, capsys):
    stats = ExpertLoadStats(3, 16, window=1)
    stats.push((torch.arange(1, 17, dtype=torch.float64) ** 1.5).round().long().expand(3, 16))
    stats.save(tmp_path / "w.safetensors")
    png, out = tmp_path / "h.png", tmp_path / "plan.safetensors"
    argv = ["--loads", str(tmp_path / "w.safetensors"), "--replicas", "24", "--groups", "4", "--nodes", "2"]
    assert plan_eplb_main(argv + ["--gpus", "8", "--heatmap", str(png), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    before, after = (float(v) for v in re.findall(r"(?:before|after):\s+mean ([0-9.]+)", text))
    assert after < before and "experts moved" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # incremental from the saved plan with a budget of 0 moves nothing
    assert plan_eplb_main(argv + ["--gpus", "8", "--current", str(out), "--max-moves", "0"]) == 0
    assert "experts moved: 0" in capsys.readouterr().out
    assert plan_eplb_main(argv + ["--gpus", "5"]) == 2
    assert "num_replicas: 24 is not divisible by num_gpus (5)" in capsys.readouterr().err
