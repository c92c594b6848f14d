"""The profiler-trace reader the planner is checked against DeepSeek's kernel timings with
(`dsv3.planner.trace`, `bench/planner_trace.py`), on small hand-made traces."""

from __future__ import annotations

import gzip
import json

import pytest

from dsv3 import ModelConfig
from dsv3.config import ConfigError
from dsv3.planner import cost
from dsv3.planner.hardware import PRESETS
from dsv3.planner.trace import busy_us, kind, load_kernels, summarise
from dsv3.planner.train import costs_by_kind


def _event(name, ts, dur, tid=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur}


TRACE = {
    "traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 0, "dur": 500},  # host: ignored
        _event("void cutlass::device_kernel<dpsk::grouped_gemm::cuda::fp8_ptp128c::GemmKernel>", 0, 100),
        _event(
            "void cutlass::device_kernel<dpsk::grouped_gemm::cuda::fp8_dptp128c_acc::GemmKernel>", 50, 100, 23
        ),
        _event("void cutlass::device_kernel<flash::FlashAttnBwd<...>>", 200, 40),
        _event("void dpsk::ep::internode::combine<false, 8>(int4*)", 120, 200, 27),
        _event("rotary_kernel", 240, 10),
        _event("Memcpy DtoD", 400, 20, 7, "gpu_memcpy"),
    ]
}


def test_kinds_from_kernel_names():
    assert kind("void cutlass::device_kernel<flash::FlashAttnBwd<x>>") == "attention"  # before "gemm"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert kind("ncclDevKernel_AllGather_RING_LL") == "communication"
    assert kind("void dpsk::ep::internode::dispatch<false, 8, true, 8>") == "communication"
    assert kind("void layer_norm::ln_fwd_kernel<...>") == "other"


def test_summary_counts_overlapping_kernels_once(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(TRACE, f)
    ks = load_kernels(path)
    assert [k.start_us for k in ks] == sorted(k.start_us for k in ks) and len(ks) == 6
    s = summarise(ks)
    assert s.kernel_us["gemm"] == 200 and s.busy_kind_us["gemm"] == 150  # two streams overlap 50 us
    assert s.kernel_us["attention"] == 40 and s.count["other"] == 2  # rotary + the memcpy
    # computation: [0, 150] + [200, 250] + [400, 420]; communication [120, 320]
    assert s.compute_busy_us == 150 + 50 + 20 and s.comm_busy_us == 200
    assert s.span_us == 420 and s.exposed_comm_us == 420 - 220
    assert s.streams == {7: 170.0, 23: 100.0, 27: 200.0}
    assert busy_us([]) == 0.0


def test_bad_traces_fail_with_the_file_named(tmp_path):
    with pytest.raises(ConfigError, match="no such trace file"):
        load_kernels(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not a JSON trace"):
        load_kernels(tmp_path / "bad.json")
    (tmp_path / "cpu.json").write_text(json.dumps({"traceEvents": TRACE["traceEvents"][:1]}))
    with pytest.raises(ConfigError, match=r"cpu\.json: no GPU kernels"):
        load_kernels(tmp_path / "cpu.json")
    (tmp_path / "list.json").write_text(json.dumps({"events": []}))
    with pytest.raises(ConfigError, match="no 'traceEvents' list"):
        load_kernels(tmp_path / "list.json")


def test_costs_by_kind_charge_the_attention_backward_by_the_kernel_kind():
    cfg, hw = ModelConfig.from_preset("671b"), PRESETS["H800"]
    args = (cfg, hw, 4096, cost.causal_pairs(4096), True, 64, False, range(3, 7), False)
    fwd, bwd, _ = costs_by_kind(*args)
    assert bwd["attention_core"] == pytest.approx(2.6 * fwd["attention_core"])
    assert bwd["gemm"] == pytest.approx(2 * fwd["gemm"]) and bwd["elementwise"] == pytest.approx(
        2 * fwd["elementwise"]
    )
    fwd2, bwd2, _ = costs_by_kind(cfg, hw.replace(flash_attention=False), *args[2:])
    assert bwd2["attention_core"] == pytest.approx(2 * fwd2["attention_core"]) and fwd2 == fwd
    # recomputation adds the MLA up-projections' GEMMs and a quarter of the element-wise passes
    _, bwd3, _ = costs_by_kind(*args[:6], True, *args[7:])
    assert bwd3["gemm"] > bwd["gemm"] and bwd3["elementwise"] == pytest.approx(2.25 * fwd["elementwise"])
