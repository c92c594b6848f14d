"""Mesh layout, expert placement, node-limited routing bound and settings: no processes needed."""

from __future__ import annotations

import pytest
import torch

from dsv3 import ModelConfig
from dsv3.fp8.quant import dequantize_tiles, quantize_tiles
from dsv3.model.moe import Gate
from dsv3.parallel.expert.dispatch import Placement, nodes_per_token
from dsv3.parallel.mesh import MeshLayout
from dsv3.parallel.strategy import ParallelSettings, build_strategy
from dsv3.train.strategy import Strategy


def _partitions(groups: list[list[int]], world: int) -> bool:
    return sorted(r for g in groups for r in g) == list(range(world))


def test_mesh_groups_partition_the_ranks_ep_innermost():
    m = MeshLayout(world=8, pp=2, dp=2, ep=2, ranks_per_node=2)
    assert m.stage_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert m.ep_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert m.expert_dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert m.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for groups in (m.stage_groups(), m.ep_groups(), m.expert_dp_groups(), m.pp_groups()):
        assert _partitions(groups, 8)
    assert m.coords(6) == (1, 1, 0) and m.node_of(6) == 3


def test_two_hop_groups_split_an_ep_group_into_nodes_and_local_indices():
    m = MeshLayout(world=8, ep=8, ranks_per_node=4)  # 2 nodes x 4 ranks
    assert m.intra_node_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert m.inter_node_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    inside = MeshLayout(world=4, dp=2, ep=2, ranks_per_node=4)  # EP groups inside one node
    assert inside.nodes_per_ep == 1 and inside.intra_node_groups() == [[0, 1], [2, 3]]


def test_mesh_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"pp=1 x dp=1 x ep=2 = 2 ranks, but 4"):
        MeshLayout(world=4, ep=2)
    with pytest.raises(ValueError, match="ranks_per_node=4 does not divide the 6 ranks"):
        MeshLayout(world=6, ep=6, ranks_per_node=4)
    with pytest.raises(ValueError, match="ranks_per_node=4: an expert-parallel group of ep=6"):
        MeshLayout(world=12, dp=2, ep=6, ranks_per_node=4)


def test_placement_maps_expert_groups_onto_nodes():
    p = Placement(n_experts=8, ranks=4, ranks_per_node=1, n_groups=4, n_limited_groups=2)
    assert p.local_experts == 2 and p.groups_on_nodes and p.max_nodes == 2
    assert p.rank_of(torch.tensor([0, 3, 7])).tolist() == [0, 1, 3]
    straddling = Placement(8, 4, 1, n_groups=2, n_limited_groups=1)  # a group of 4 spans 2 nodes
    assert not straddling.groups_on_nodes and straddling.max_nodes == 4
    with pytest.raises(ValueError, match="n_routed_experts=6 is not divisible by parallel.ep=4"):
        Placement(6, 4, 1)


@pytest.mark.parametrize("limited", [2, 4])
def test_group_limited_gate_bounds_nodes_per_token(limited):
    cfg = ModelConfig.from_preset("tiny", n_activated_experts=4, n_limited_groups=limited)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=1.0)
    gate.e_score_correction_bias.normal_(std=0.1)  # the bias decides selection: it must not break the bound
    _, indices, _ = gate(torch.randn(512, cfg.dim))
    placement = Placement(8, 4, 1, cfg.n_expert_groups, cfg.n_limited_groups)
    fan_out = nodes_per_token(indices, placement)
    assert int(fan_out.max()) <= placement.max_nodes
    if limited == 4:
        assert int(fan_out.max()) > 2  # without the limit tokens do spread: the bound above is not vacuous


def test_pow2_fp8_requantisation_is_lossless():
    """Why the second hop of an FP8 two-hop dispatch adds no error."""
    x = torch.randn(64, 300) * torch.logspace(-3, 3, 300)
    once = dequantize_tiles(*quantize_tiles(x, pow2=True))
    twice = dequantize_tiles(*quantize_tiles(once, pow2=True))
    assert torch.equal(once, twice)
    assert not torch.equal(once, x)


def test_settings_and_single_process_fallback():
    with pytest.raises(ValueError, match=r"parallel.ranks: unknown setting"):
        ParallelSettings.from_dict({"ranks": 2})
    assert type(build_strategy(ep=1)) is Strategy  # one process: the plain strategy
    with pytest.raises(ValueError, match=r"parallel.ep=2.*torchrun --nproc-per-node 2"):
        build_strategy(ep=2)


# ---- the global batch on several ranks (item: never silently a different batch) ----------------------
def test_global_batch_never_silently_grows_with_the_world_size():
    from dsv3.config import ConfigError
    from dsv3.train import schedules as S
    from dsv3.train.config import TrainConfig

    cfg = TrainConfig(steps=10, micro_batch=8, batch_start=8, batch_end=8)
    assert S.global_batch(cfg, 0, ranks=1) == 8
    with pytest.raises(ConfigError) as e:  # 2 ranks x micro_batch 8 = 16 > 8: it used to train 16
        S.global_batch(cfg, 0, ranks=2)
    msg = str(e.value)
    assert "batch_start, batch_end" in msg and "micro_batch (8) x 2 data ranks = 16" in msg
    assert "set micro_batch=4" in msg and "\n" not in msg
    assert S.global_batch(cfg.replace(micro_batch=4), 0, ranks=2) == 8


def test_batch_ramp_is_the_same_on_every_world_size_that_fits():
    from dsv3.train import schedules as S
    from dsv3.train.config import TrainConfig

    cfg = TrainConfig(steps=100, micro_batch=2, batch_start=8, batch_end=32, batch_ramp=0.5)
    one = [S.global_batch(cfg, s, ranks=1) for s in range(100)]
    assert one[0] == 8 and one[50] == 32 and one == sorted(one)
    for ranks in (2, 4):  # a 4-rank run resumed on 1 or 2 ranks continues the same ramp
        assert [S.global_batch(cfg, s, ranks=ranks) for s in range(100)] == one
