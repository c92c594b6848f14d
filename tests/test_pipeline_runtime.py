"""The pipeline runtime on gloo processes against the single-process model (DESIGN §5 acceptance).

Every rank builds the same model (same seed), runs one pipelined step, computes the single-process
reference (mean loss over the same micro-batches, backward) on its own copy, and compares the
gradients of the Parameters it holds. Each launch is bounded: pytest-timeout, the launcher's
deadline (it kills stragglers) and the process-group timeout.
"""

import copy
import os
import time

import pytest
import torch

from dsv3 import ModelConfig
from dsv3.model.transformer import Transformer
from dsv3.parallel.launch import RanksFailed, run_ranks
from dsv3.parallel.pipeline import PipelineRunner
from dsv3.parallel.pipeline.plan import formula_activations, peak_activations
from dsv3.parallel.pipeline.schedule import ScheduleError

pytestmark = pytest.mark.dist
LAMBDA, ALPHA, SEQ = 0.3, 0.01, 12  # large alpha: a lost balance-loss gradient would show


def _build(n_layers: int) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    ref = Transformer(ModelConfig.from_preset("tiny", n_layers=n_layers))
    return ref, copy.deepcopy(ref)


def _reference_step(ref: Transformer, batch: torch.Tensor, chunks: int) -> float:
    outs = [ref.loss(mb, mtp_lambda=LAMBDA, balance_alpha=ALPHA) for mb in batch.chunk(chunks)]
    loss = sum(o.total for o in outs) / chunks
    loss.backward()
    return float(loss.detach())


def _parity_worker(rank: int, world: int, name: str, chunks: int, n_layers: int, steps: int, latency: float):
    ref, model = _build(n_layers)
    runner = PipelineRunner(model, name, chunks, mtp_lambda=LAMBDA, balance_alpha=ALPHA, latency=latency)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref.named_parameters())
    gen = torch.Generator().manual_seed(1)
    result = {"loss_err": [], "grad_err": [], "peak": [], "norm_err": 0.0, "counts_ok": True}
    for step in range(steps):
        batch = torch.randint(0, ref.config.vocab_size, (chunks, SEQ + 1), generator=gen)
        if step == 0:  # forward-only evaluation: the loss without gradients (and without balance loss)
            with torch.no_grad():
                want_eval = sum(float(ref.loss(mb, mtp_lambda=LAMBDA).total) for mb in batch.chunk(chunks))
            result["eval_err"] = abs(runner.evaluate(batch).total - want_eval / chunks)
            assert all(p.grad is None for p in runner.parameters())
        out = runner.step(batch)
        want = _reference_step(ref, batch, chunks)
        result["loss_err"].append(abs(out.total - want))
        result["grad_err"].append(
            max((p.grad - ref_params[names[id(p)]].grad).abs().max().item() for p in runner.parameters())
        )
        result["peak"].append(runner.peak_inflight)
        assert not any(p.grad.requires_grad for p in runner.parameters()), "a gradient carries a graph"
        ref_counts = {n: m.last_counts for n, m in ref.named_modules() if hasattr(m, "last_counts")}
        if step == 0:  # counts: the reference summed over micro-batches (its own forward per chunk)
            per_mb = {n: torch.zeros_like(c) for n, c in ref_counts.items()}
            for mb in batch.chunk(chunks):
                with torch.no_grad():
                    ref.loss(mb)
                for n, m in ref.named_modules():
                    if n in per_mb:
                        per_mb[n] += m.last_counts
            result["counts_ok"] = all(torch.equal(c, per_mb[n]) for n, c in runner.expert_counts.items())
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
            result["norm_err"] = abs(runner.clip_grad_norm(float("inf")) - float(ref_norm))
        # one identical SGD step everywhere: the copies of a stage must stay equal
        with torch.no_grad():
            for p in runner.parameters():
                p -= 0.5 * p.grad
                p.grad = None
            for p in ref.parameters():
                p -= 0.5 * p.grad
                p.grad = None
    result["sim_peak"] = peak_activations(runner.schedule)[rank]
    result["table"] = formula_activations(name, runner.schedule.num_stages)
    return result


CASES = [  # (schedule, processes, micro-batches, layers, steps, latency)
    ("1f1b", 2, 2, 3, 1, 0.0),
    ("1f1b", 4, 6, 4, 1, 0.0),
    ("zb1p", 2, 3, 3, 1, 0.005),  # with the latency emulation (clock messages) on
    ("zb1p", 4, 4, 4, 1, 0.0),
    ("dualpipe", 2, 6, 3, 1, 0.0),
    ("dualpipe", 4, 8, 4, 2, 0.0),  # two steps with an update: the two copies of a stage stay equal
    ("dualpipev", 2, 4, 4, 2, 0.0),  # 4 stages folded on 2 processes
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name,world,chunks,n_layers,steps,latency", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_pipelined_step_equals_single_process(name, world, chunks, n_layers, steps, latency):
    results = run_ranks(
        _parity_worker, world, name, chunks, n_layers, steps, latency, timeout=20, deadline=50
    )
    for rank, r in enumerate(results):
        assert max(r["loss_err"]) < 1e-5, (rank, r["loss_err"])
        assert max(r["grad_err"]) < 1e-5, (rank, r["grad_err"])
        assert r["norm_err"] < 1e-5 and r["counts_ok"] and r["eval_err"] < 1e-5, rank
        # activation memory measured in the runtime = the simulator's count for this rank
        assert set(r["peak"]) == {r["sim_peak"]}, (rank, r["peak"], r["sim_peak"])
    peaks = [r["peak"][0] for r in results]
    assert max(peaks) == results[0]["table"]  # DESIGN §5's activation column (PP, or PP+1)


def _dying_worker(rank: int, world: int) -> None:
    _, model = _build(3)
    runner = PipelineRunner(model, "1f1b", 2)
    if rank == 1:
        os._exit(3)  # the last stage dies before answering rank 0's activations
    runner.step(torch.randint(0, 512, (2, SEQ + 1)))


@pytest.mark.timeout(60)
def test_a_dead_rank_makes_the_others_fail_fast():
    start = time.monotonic()
    with pytest.raises(RanksFailed) as err:
        run_ranks(_dying_worker, 2, timeout=20, deadline=50)
    assert time.monotonic() - start < 45
    assert "--- rank 0" in str(err.value) and "--- rank 1 (exit 3)" in str(err.value)


def _setting_worker(rank: int, world: int, name: str, chunks) -> str:
    _, model = _build(4)
    try:
        PipelineRunner(model, name, chunks if isinstance(chunks, int) else chunks[rank])
    except (ScheduleError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "accepted"


@pytest.mark.timeout(60)
def test_invalid_settings_are_refused_with_a_clear_message():
    odd = run_ranks(_setting_worker, 3, "dualpipe", 6, timeout=20, deadline=50)
    assert all("pp: dualpipe needs an even pp" in r and "pp=3" in r for r in odd)
    few = run_ranks(_setting_worker, 2, "dualpipev", 3, timeout=20, deadline=50)
    assert all("chunks: dualpipev needs chunks >= 2 x its 2 devices = 4, got chunks=3" in r for r in few)
    mixed = run_ranks(_setting_worker, 2, "1f1b", (2, 4), timeout=20, deadline=50)
    assert all("ranks disagree" in r for r in mixed)
