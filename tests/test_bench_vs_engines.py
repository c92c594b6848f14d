"""bench/vs_engines.py and bench/serve.py without the external engines: the token comparison names
the first divergence, the table's ratios are dsv3 / other with '-' for a skipped side, vLLM is
skipped with its reason for a geometry its CPU MLA cannot run, and bench/serve.py's `compare` puts
the ratio of medians on the first side's row."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def vs():
    return _load("vs_engines")


def test_agree_counts_identical_sequences_and_names_the_first_divergence(vs):
    assert vs.agree([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == "2/2"
    assert vs.agree([[1, 2, 3], [3, 4, 5]], [[1, 2, 3], [3, 9, 5]]) == "1/2 (first differs at token 1)"


def test_table_gives_dsv3_over_other_and_dashes_for_a_skipped_side(vs):
    row = {"weights": "fp32", "threads": 1, "batch": 16, "load": [1.0, 1.5],
           "prompt_tok_s": {"dsv3": 300.0, "llama.cpp": 600.0}, "decode_tok_s": {"dsv3": 90.0, "llama.cpp": 60.0},
           "same_tokens": {"llama.cpp": "16/16"}}  # fmt: skip
    lines = vs.table([row]).splitlines()
    decode = next(ln for ln in lines if "| decode |" in ln)
    prompt = next(ln for ln in lines if "| prompt |" in ln)
    assert "| 90.0 | 60.0 | - | 1.50x | - | llama.cpp 16/16 | 1.0-1.5 |" in decode
    assert "| 300.0 | 600.0 | - | 0.50x | - |" in prompt


def test_vllm_is_skipped_for_a_geometry_its_cpu_mla_cannot_run(vs, tmp_path):
    from dsv3 import ModelConfig

    reasons = {}
    for preset in ("small", "v3-mini"):
        (tmp_path / "config.json").write_text(json.dumps(ModelConfig.from_preset(preset).to_hf()))
        reasons[preset] = vs.vllm_unsupported(tmp_path)
    assert reasons["v3-mini"] is None
    assert "kv_lora_rank 512" in reasons["small"] and "has 64 and 16" in reasons["small"]


def test_serve_compare_puts_the_ratio_of_medians_on_the_first_sides_row(monkeypatch, capsys):
    serve = _load("serve")
    tps = {"http://a": [100.0, 120.0, 80.0], "http://b": [50.0, 60.0, 40.0]}
    seen: list[tuple[str, int]] = []

    async def fake_run(args):
        seen.append((args.base_url, args.num_prompts))
        t = tps[args.base_url][sum(u == args.base_url for u, _ in seen) - 1]
        return {"output_throughput": t, "ttft": {"median_ms": 1.0}, "tpot": {"median_ms": 2.0}, "failed": 0,
                "requests": []}  # fmt: skip

    monkeypatch.setattr(serve, "run", fake_run)
    p = argparse.ArgumentParser()
    serve.add_load_arguments(p)
    a = p.parse_args(
        ["--concurrency", "4", "--repeats", "3", "--num-prompts", "2", "--prompts-per-concurrency", "2"]
    )
    runs = serve.compare({"dsv3": "http://a", "vLLM": "http://b"}, a)
    assert [u for u, _ in seen] == ["http://a", "http://b"] * 3  # alternating within each repeat
    assert {n for _, n in seen} == {8}  # max(--num-prompts, 2 x concurrency)
    assert len(runs) == 6
    out = capsys.readouterr().out
    assert "| dsv3 | 4 | 100.0 | 1.0 | 2.0 | 2.00x |" in out
    assert "| vLLM | 4 | 50.0 | 1.0 | 2.0 | |" in out


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_measure_stops_the_vllm_worker_tree_while_the_other_sides_are_timed(vs):
    import subprocess
    import time

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    seen: list[tuple[str, str]] = []

    class Side:
        def __init__(self, name):
            self.name = name

        def run(self, prompts, new):
            seen.append((self.name, _state(spin.pid)))
            time.sleep(0.05)
            return 0.01 * new, [[1] * new for _ in prompts]

        def pids(self):
            return vs.quiet.tree(spin.pid)

    try:
        a = argparse.Namespace(new=4, repeats=2)
        row = vs.measure(a, Side("dsv3"), None, Side("vLLM"), "bf16", 1, [[5, 6]], lambda m: None)
    finally:
        vs.quiet.resume(spin.pid)
        spin.kill()
        spin.wait()
    assert {st for n, st in seen if n == "dsv3"} == {"T"}  # stopped for every dsv3 call, warm-up too
    assert "T" not in {st for n, st in seen if n == "vLLM"}
    assert row["idle_cpu_s"]["dsv3"] == {"vLLM": 0.0}
    assert set(row["idle_cpu_s"]["vLLM"]) == {"dsv3"} and row["turn_s"]["dsv3"] > 0.2


def test_serve_compare_wraps_each_run_in_the_turn_and_keeps_what_it_yields(monkeypatch):
    import contextlib

    serve = _load("serve")
    order: list[str] = []

    async def fake_run(args):
        order.append("run")
        return {"output_throughput": 1.0, "ttft": {"median_ms": 1.0}, "tpot": {"median_ms": 1.0}, "failed": 0,
                "requests": []}  # fmt: skip

    @contextlib.contextmanager
    def turn(name):
        order.append(f"in {name}")
        t: dict = {}
        yield t
        t["idle_cpu_s"] = {"other": 0.5}
        order.append(f"out {name}")

    monkeypatch.setattr(serve, "run", fake_run)
    p = argparse.ArgumentParser()
    serve.add_load_arguments(p)
    runs = serve.compare(
        {"dsv3": "http://a", "vLLM": "http://b"}, p.parse_args(["--concurrency", "1"]), turn=turn
    )
    assert order == ["in dsv3", "run", "out dsv3", "in vLLM", "run", "out vLLM"]
    assert [r["idle_cpu_s"] for r in runs] == [{"other": 0.5}] * 2
