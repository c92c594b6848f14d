"""bench/decode.py's thread-scaling table on a tiny model: it runs, names the CPU's flags, and
reports each thread count's decode rate, the ratio and whether the tokens agree."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "decode.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_671b_layer_keeps_the_v3_attention_and_a_token_s_expert_count():
    c = _bench_module().preset_config("671b-layer")
    assert (c.dim, c.n_heads, c.q_lora_rank, c.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.moe_inter_dim) == (128, 64, 128, 2048)
    assert (c.n_layers, c.n_dense_layers, c.n_activated_experts, c.n_shared_experts) == (1, 0, 8, 1)


def test_thread_scaling_table_on_tiny():
    cmd = [sys.executable, str(BENCH), "--thread-scaling", "--presets", "tiny", "--batches", "1"]
    cmd += ["--new", "4", "--prompt-len", "4", "--repeats", "1", "--scaling-weights", "fp32,bf16"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ), check=True
    ).stdout
    assert out.startswith("CPU: ") and "flags:" in out.splitlines()[0]
    assert "| model | weights | batch | 1 thr tok/s | 2 thr tok/s | 2 / 1 | same tokens | load |" in out
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert [r.split(" | ")[1] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[3].split()[0]) > 0 and float(cells[4].split()[0]) > 0
        assert cells[5].endswith("x") and cells[6] == "yes"
