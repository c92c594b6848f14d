"""bench/engine_ab.py: the one-line errors on bad arguments, and a tiny A/B run end to end (both
engines built in one process, every case timed on both sides, the JSON written)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained

_spec = importlib.util.spec_from_file_location(
    "bench_engine_ab", Path(__file__).resolve().parent.parent / "bench" / "engine_ab.py"
)
engine_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_ab)


def test_bad_arguments_exit_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--env: expected NAME=A,B, got 'DSV3_STRIPS=0'"):
        engine_ab.main([str(tmp_path), "--env", "DSV3_STRIPS=0"])
    with pytest.raises(SystemExit, match="no config.json"):
        engine_ab.main([str(tmp_path), "--env", "DSV3_STRIPS=0,1"])


def test_a_tiny_run_times_both_sides(tmp_path, capsys):
    torch.manual_seed(0)
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")).eval(), tmp_path / "ckpt")
    out = tmp_path / "ab.json"
    engine_ab.main(
        [
            str(tmp_path / "ckpt"),
            "--env",
            "DSV3_STRIP_EXPERTS=0,1",
            "--repeats",
            "2",
            "--prefill",
            "2x8",
            "--decode",
            "5",
            "--out",
            str(out),
        ]  # fmt: skip
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["prefill 2x8", "decode batch 5"]
    assert all(len(r["0"]) == len(r["1"]) == 2 and min(r["0"] + r["1"]) > 0 for r in rows)
    assert "DSV3_STRIP_EXPERTS = 0 vs 1" in capsys.readouterr().out
