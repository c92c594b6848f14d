"""The planner's cost model against the real thing: FLOPs against a FLOP counter on the real model
and against the parameter counts, all-to-all bytes against a real 2-rank gloo EP run's byte
counters, node fan-out against sampled routing, EPLB balance against `dsv3 plan eplb`, profiles."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsv3 import ModelConfig, Transformer, paper
from dsv3.config import ConfigError
from dsv3.planner import cost, loads
from dsv3.planner.hardware import PRESETS, Hardware, resolve_hardware


def _grouped_mm_flops(x_shape, w_shape, *args, **kwargs) -> int:
    # x [M, K] rows sorted by expert, w [E, K, N]: every row meets one expert's [K, N]
    return 2 * x_shape[0] * w_shape[1] * w_shape[2]


@pytest.mark.parametrize("tokens", [16, 48])
def test_forward_flops_equal_a_flop_counter_on_the_real_small_model(tokens):
    cfg = ModelConfig.from_preset("small")
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, tokens))
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with counter, torch.no_grad():
        model(x)
    # the reference model computes the full masked score matrix: T x T pairs per layer
    f = cost.forward_flops(cfg, tokens, cost.causal_pairs(tokens, skip_masked=False))
    assert f["gemm"] + f["head"] + f["attention_core"] == counter.get_total_flops()


@pytest.mark.parametrize("preset", ["small", "671b"])
def test_gemm_flops_are_twice_the_activated_matrix_parameters(preset):
    cfg = ModelConfig.from_preset(preset)
    c = cfg.param_counts()
    norm_weights = c["norms"] + cfg.n_layers * ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank)
    matrices = c["activated"] - c["embedding"] - norm_weights
    f = cost.forward_flops(cfg, 1, 0.0)
    assert f["gemm"] + f["head"] == 2 * matrices
    if preset == "671b":  # §1: 37B activated, so ~74 GFLOPs per token before attention
        assert f["gemm"] + f["head"] == pytest.approx(2 * paper.ACTIVATED_PARAMS_671B, rel=0.03)
    # MTP: its parameters with only K routed experts visited, norms out, plus the shared head
    n, d = cfg.n_mtp_layers, cfg.dim
    skipped = n * (cfg.n_routed_experts - cfg.n_activated_experts) * cost.expert_weights(cfg)
    mtp_norms = n * (5 * d + (cfg.q_lora_rank or 0) + cfg.kv_lora_rank)
    assert cost.mtp_gemm_flops(cfg) == 2 * (c["mtp"] - skipped - mtp_norms) + n * 2 * d * cfg.vocab_size


def test_absorbed_attention_reads_the_latent_not_the_heads():
    cfg = ModelConfig.from_preset("671b")
    naive = cost.attention_core_flops(cfg, 1.0)
    absorbed = cost.attention_core_flops(cfg, 1.0, absorbed=True)
    assert naive == 2 * 128 * (192 + 128)
    assert absorbed == 2 * 128 * (2 * 512 + 64)
    assert cost.causal_pairs(4) == 10 and cost.causal_pairs(4, cached=3) == 22


def test_wire_bytes_are_comm_formats():
    assert cost.wire_bytes(7168, "fp8") == 7168 + 4 * 56
    assert cost.wire_bytes(7168, "bf16") == 2 * 7168
    assert cost.wire_bytes(100, "fp8") == 100 + 4  # one partial tile still has a scale
    with pytest.raises(ValueError, match="wire"):
        cost.wire_bytes(8, "fp4")


# ---- a real 2-rank gloo EP run ---------------------------------------------------------------------------
TOKENS = 40


def _ep_case(rank, world, ranks_per_node, two_hop):
    from torch import nn

    from dsv3.model.moe import MoE
    from dsv3.parallel.expert.moe import ExpertParallel, ExpertParallelMoE
    from dsv3.parallel.mesh import build_mesh

    cfg = ModelConfig.from_preset("tiny")
    mesh = build_mesh(ep=2, ranks_per_node=ranks_per_node)
    ep = ExpertParallel.from_mesh(mesh, cfg, two_hop, "fp8", "bf16")
    torch.manual_seed(0)
    base = MoE(cfg)
    for p in base.parameters():
        nn.init.normal_(p, std=0.1)
    moe = ExpertParallelMoE.from_moe(base, ep)
    x = torch.randn(world, TOKENS, cfg.dim, generator=torch.Generator().manual_seed(1))[rank].requires_grad_()
    moe(x[None])[0].square().sum().backward()
    _, indices, _ = moe.gate(x.detach())
    return {"indices": indices, "sent": dict(ep.stats.sent)}


def ep_worker(rank, world):
    return {
        "one_hop_2nodes": _ep_case(rank, world, 1, False),
        "one_hop_1node": _ep_case(rank, world, 2, False),
        "two_hop_2nodes": _ep_case(rank, world, 1, True),
    }


@pytest.fixture(scope="module")
def ep_run():
    from dsv3.parallel.launch import run_ranks

    return run_ranks(ep_worker, 2, timeout=60, deadline=120)


@pytest.mark.dist
@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["one_hop_2nodes", "one_hop_1node", "two_hop_2nodes"])
def test_all_to_all_bytes_equal_the_gloo_runs_counters(ep_run, case):
    cfg = ModelConfig.from_preset("tiny")
    D, K = cfg.dim, cfg.n_activated_experts
    rpn, two_hop = (2 if case == "one_hop_1node" else 1), case.startswith("two_hop")
    sent_copies, back_copies = cost.measured_copies(
        [r[case]["indices"] for r in ep_run], cfg.n_routed_experts, rpn, two_hop
    )
    for c, back, res in zip(sent_copies, back_copies, ep_run):
        sent = res[case]["sent"]
        t = cost.traffic(c, 1, D, K, "fp8", "bf16", returned=back)  # copies are totals: one "token"
        assert sent.get("dispatch.inter", 0) == t.dispatch_inter
        assert sent.get("dispatch.intra", 0) == t.dispatch_intra
        assert sent.get("combine.inter", 0) == t.combine_inter
        assert sent.get("combine.intra", 0) == t.combine_intra
        # backward: each exchange reversed in BF16 (the dispatch's gradient returns the received
        # rows), two hops with the FP32 gate values' gradient beside each inter-node row
        g = cost.traffic(back, 1, D, K, "bf16", "bf16", returned=c)
        assert sent.get("dispatch_grad.inter", 0) == g.dispatch_inter
        assert sent.get("dispatch_grad.intra", 0) == g.dispatch_intra
        assert sent.get("combine_grad.inter", 0) == g.combine_inter
        assert sent.get("combine_grad.intra", 0) == g.combine_intra
        assert t.total > 0


def _uniform_group_limited(cfg: ModelConfig, n: int, seed: int = 0) -> torch.Tensor:
    """[n, K] expert ids drawn as the gate's constraint allows: M groups, then K of their experts."""
    g = torch.Generator().manual_seed(seed)
    G, M, K, eg = (
        cfg.n_expert_groups,
        cfg.n_limited_groups,
        cfg.n_activated_experts,
        cfg.n_routed_experts // cfg.n_expert_groups,
    )
    groups = torch.rand(n, G, generator=g).argsort(1)[:, :M]  # (n, M)
    pool = (groups[..., None] * eg + torch.arange(eg)).view(n, M * eg)
    pick = torch.rand(n, M * eg, generator=g).argsort(1)[:, :K]
    return pool.gather(1, pick)


@pytest.mark.parametrize("preset,ep,rpn", [("671b", 64, 8), ("671b", 32, 8), ("tiny", 4, 1), ("tiny", 4, 2)])
@pytest.mark.parametrize("two_hop", [False, True])
def test_expected_copies_match_sampled_node_limited_routing(preset, ep, rpn, two_hop):
    cfg = ModelConfig.from_preset(preset)
    n = 4000
    indices = [_uniform_group_limited(cfg, n, seed) for seed in range(ep)]
    measured, _ = cost.measured_copies(indices, cfg.n_routed_experts, rpn, two_hop)
    want = cost.expected_copies(cfg, ep, rpn, two_hop)
    inter = sum(c.inter for c in measured) / (n * ep)
    intra = sum(c.intra for c in measured) / (n * ep)
    assert inter == pytest.approx(want.inter, rel=0.03, abs=0.01)
    assert intra == pytest.approx(want.intra, rel=0.03, abs=0.01)


def test_v3_tokens_reach_few_nodes():
    """8 nodes, M = 4: at most 4 nodes per token, ~3.7 on average under uniform routing."""
    cfg = ModelConfig.from_preset("671b")
    reached = 8 * cost.p_node_reached(cfg, 8)
    assert 3.5 < reached <= 4.0
    unlimited = cfg.replace(n_limited_groups=8)
    assert 8 * cost.p_node_reached(unlimited, 8) > 5.0


# ---- EPLB: the real planner ---------------------------------------------------------------------------
def test_balance_equals_dsv3_plan_eplb_on_the_same_loads(tmp_path):
    from dsv3.infer.eplb.report import plan_eplb_main

    w = loads.make_loads("zipf:1.0", 4, 64, seed=3)
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"loads": (w * 1000).round().long().tolist()}))
    weight = loads.make_loads(str(path), 4, 64)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert plan_eplb_main(["--loads", str(path), "--replicas", "80", "--groups", "8", "--nodes", "2",
                               "--gpus", "16"]) == 0  # fmt: skip
    before = float(re.search(r"before: mean ([0-9.]+)", out.getvalue()).group(1))
    after = float(re.search(r"after:  mean ([0-9.]+)", out.getvalue()).group(1))
    assert round(loads.balance(weight, 16), 4) == before
    assert round(loads.balance(weight, 16, slots=80, groups=8, nodes=2), 4) == after
    assert after < before


def test_load_specs_and_sampling_noise(tmp_path):
    assert loads.balance(loads.make_loads("uniform", 2, 16), 4) == 1.0
    z = loads.make_loads("zipf:1.2", 3, 16)
    assert z.shape == (3, 16) and not torch.equal(z[0], z[1])  # shuffled per layer
    assert loads.sampling_imbalance(10_000, 320) < loads.sampling_imbalance(10, 320)
    with pytest.raises(ConfigError, match="loads"):
        loads.make_loads("zipf:x", 1, 4)
    with pytest.raises(ConfigError, match="loads"):
        loads.make_loads(str(tmp_path / "none.safetensors"), 1, 4)


# ---- profiles -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_profiles_round_trip_and_validate(tmp_path, suffix):
    for hw in PRESETS.values():
        path = hw.save(tmp_path / f"{hw.name}{suffix}")
        assert Hardware.load(path) == hw
    assert resolve_hardware("H800", ["ib_gbps=25", "gemm_eff=0.5"]).ib_gbps == 25.0
    assert PRESETS["H800"].nvlink_gbps / PRESETS["H800"].ib_gbps == pytest.approx(3.2)  # §3.2.2
    bad = tmp_path / f"bad{suffix}"
    bad.write_text(json.dumps({"name": "x", "gemm_eff": 1.5}))
    with pytest.raises(ConfigError, match="gemm_eff"):
        Hardware.load(bad)
    with pytest.raises(ConfigError, match="elt_eff"):
        resolve_hardware("H800", ["elt_eff=0"])
    bad.write_text(json.dumps({"nvlnk_gbps": 1.0}))
    with pytest.raises(ConfigError, match="nvlink_gbps"):
        Hardware.load(bad)
    with pytest.raises(ConfigError, match="hbm_gb"):
        resolve_hardware("H100", ["hbm_gb=abc"])
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_hardware("A100")


def test_roofline_small_batches_are_memory_bound():
    hw = PRESETS["H800"]
    one, many = cost.gemm_time(hw, 1, 7168, 2048, True), cost.gemm_time(hw, 4096, 7168, 2048, True)
    assert one == pytest.approx(7168 * 2048 / hw.hbm_bytes + hw.kernel_us * 1e-6, rel=0.01)
    assert many == pytest.approx(2 * 4096 * 7168 * 2048 / hw.gemm_flops(True) + hw.kernel_us * 1e-6, rel=0.01)


def test_attention_backward_ratio_matches_torch_flop_formulas_and_the_cpu_model():
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    cfg = ModelConfig.from_preset("671b")
    q, v = (1, cfg.n_heads, 64, cfg.qk_head_dim), (1, cfg.n_heads, 64, cfg.v_head_dim)
    flash = sdpa_backward_flop_count(v, q, q, v) / sdpa_flop_count(q, q, v)  # recomputes Q K^T
    assert cost.attention_backward_ratio(cfg) == pytest.approx(flash) == pytest.approx(2.6)
    assert cost.attention_backward_ratio(cfg, flash=False) == 2.0
    # the CPU model's attention (MLA: query and value widths differ) takes ATen's math path, which
    # keeps P: its backward's batched matmuls are 2x the forward's, as the cpu preset says
    small = ModelConfig.from_preset("small")
    assert small.qk_head_dim != small.v_head_dim and not PRESETS["cpu"].flash_attention
    torch.manual_seed(0)
    model = Transformer(small)
    x = torch.randint(0, small.vocab_size, (1, 32))
    fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)  # bmm: attention only
    with fwd:
        out = model(x)
    with bwd:
        (out if torch.is_tensor(out) else out[0]).float().sum().backward()
    bmm = torch.ops.aten.bmm
    f, b = fwd.get_flop_counts()["Global"][bmm], bwd.get_flop_counts()["Global"][bmm]
    assert f > 0 and b / f == cost.attention_backward_ratio(small, flash=False)
