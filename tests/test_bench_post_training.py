"""bench/post_training.py end to end at a toy size: every stage runs and RESULTS.md holds every table."""

import importlib.util
import random
from pathlib import Path

import pytest


@pytest.mark.slow
def test_post_training_script_at_a_toy_size(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "post_training.py"
    spec = importlib.util.spec_from_file_location("bench_post_training", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the model routes every token to experts while the cache keeps latent keys and values".split()
    rng = random.Random(0)
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(
            " ".join(rng.choice(words) for _ in range(120 + 3 * i)) + ".\n"
        )
    work = tmp_path / "work"
    assert bench.main(["--toy", "--work", str(work), "--data", str(corpus)]) == 0
    results = (work / "RESULTS.md").read_text()
    for heading in (
        "## Retrieval (passkey rows, loss on the key)",
        "## Passkey accuracy by prompt length",
        "## Validation loss by position",
        "## SFT",
        "## Smoke tasks",
        "## Passkey by log-likelihood",
    ):
        assert heading in results
    for row in (
        "| base |",
        "| retrieval |",
        "| extended |",
        "| retrieval_long |",
        "| extended_long |",
        "| sft |",
        "| random baseline |",
        "| after SFT |",
    ):
        assert row in results
    assert all(f"{t} [smoke]" in results for t in ("smoke_code", "smoke_fim", "smoke_cloze", "smoke_mc"))
    assert (work / "long_context" / "passkey.png").exists() and (
        work / "long_context" / "loss_by_position.png"
    ).exists()
    # --reuse: the training stages are not run again, the evaluations are
    assert bench.main(["--toy", "--work", str(work), "--data", str(corpus), "--reuse"]) == 0
    times = (work / "RESULTS.md").read_text().split("## Times")[1]
    assert "| pretrain |" not in times and "| sft |" not in times and "| eval_sft |" in times
