"""The schedule simulator against DESIGN §5: bubbles, activation memory, parameters, the CLI.

Bubble = the largest idle time of any rank within the step (makespan - busy). The formulas are exact
(at zero p2p latency) under the conditions of `formula_conditions`, which the cost settings below
satisfy; the settings that break them are shown to break the equality too, so the conditions are
needed and the equality test can fail.
"""

import random

import pytest

from dsv3.parallel.pipeline.cli import pipeline_plan_main
from dsv3.parallel.pipeline.plan import (
    Costs,
    formula_activations,
    formula_bubble,
    formula_conditions,
    peak_activations,
    simulate,
    summarize,
)
from dsv3.parallel.pipeline.schedule import build_schedule
from dsv3.parallel.pipeline.timeline import text_timeline

SETTINGS = {  # (pp, chunks): minimums, uneven chunk counts, and the paper's PP = 16
    "1f1b": [(2, 2), (4, 4), (4, 9), (8, 8), (8, 21), (16, 32)],
    "zb1p": [(2, 2), (4, 4), (4, 9), (8, 8), (8, 21), (16, 32)],
    "dualpipe": [(2, 4), (4, 8), (4, 10), (6, 12), (8, 20), (8, 22), (16, 32), (16, 40)],
    "dualpipev": [(2, 2), (4, 4), (4, 7), (8, 8), (8, 20), (16, 16), (16, 33)],
}
_rng = random.Random(0)
COSTS = {
    # 1F1B: any costs
    "1f1b": [
        Costs(),
        Costs(2, 3, 1),
        Costs(1, 0.5, 0.1),
        Costs(_rng.uniform(0.1, 3), _rng.uniform(0.1, 3), 0.05),
    ],
    # ZB1P: W <= F and W <= B - W
    "zb1p": [Costs(), Costs(2, 3, 1), Costs(1.5, 4, 0.5), Costs(1, 1, 0.5), Costs(0.7, 2.9, 0.7)],
    # DualPipe(V): F = B - W, W <= F, max(F, B) <= F&B <= F + B
    "dualpipe": [
        Costs(),
        Costs(1, 2, 1, 2),
        Costs(2, 3, 1, 4),
        Costs(1, 1.25, 0.25, 1.6),
        Costs(3, 4, 1, 5.5),
    ],
}
COSTS["dualpipev"] = COSTS["dualpipe"]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_bubble_equals_design_formula(name):
    for pp, chunks in SETTINGS[name]:
        s = build_schedule(name, pp, chunks)
        for costs in COSTS[name]:
            assert formula_conditions(name, costs) is None
            got, want = simulate(s, costs).bubble(), formula_bubble(name, pp, costs)
            assert got == pytest.approx(want, abs=1e-9), (pp, chunks, costs)


@pytest.mark.parametrize(
    "name,costs",
    [
        ("zb1p", Costs(f=0.5, b=2, w=1)),  # W > F: a deferred W no longer fits the gap it fills
        ("zb1p", Costs(f=1, b=1.5, w=1)),  # W > B - W
        ("dualpipe", Costs(f=1, b=4, w=1)),  # the forward cheaper than the input-gradient backward
        ("dualpipe", Costs(f=2, b=2, w=1)),  # ... or dearer
        ("dualpipev", Costs(f=1, b=1.5, w=1)),  # W > F
    ],
)
def test_formula_conditions_are_needed(name, costs):
    assert formula_conditions(name, costs) is not None
    pp, chunks = 8, 20
    got = simulate(build_schedule(name, pp, chunks), costs).bubble()
    assert got != pytest.approx(formula_bubble(name, pp, costs))
    if name == "zb1p":  # then the slowest of the three op kinds sets the pace of the drain
        i = costs.b - costs.w
        assert got == pytest.approx((pp - 1) * max(costs.f + i - costs.w, costs.f, i))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_ranks_do_the_ideal_work_and_idle_equally(name):
    pp, chunks = SETTINGS[name][-2]
    costs = Costs(1.5, 2.5, 1)  # F&B = F + B: an overlapped pair does the work of its two halves
    sim = simulate(build_schedule(name, pp, chunks), costs)
    per_rank = chunks * pp // sim.schedule.num_ranks  # (micro-batch, stage) pairs held by a rank
    for r in range(sim.schedule.num_ranks):
        assert sim.busy(r) == pytest.approx(per_rank * (costs.f + costs.b))
        assert sim.bubble(r) == pytest.approx(sim.bubble())
    assert sim.makespan == pytest.approx(per_rank * (costs.f + costs.b) + sim.bubble())


@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
def test_overlap_shortens_the_step_and_idles_the_ranks_with_most_pairs(name):
    s = build_schedule(name, 8, 20)
    plain, overlapped = simulate(s, Costs(1, 2, 1, 3)), simulate(s, Costs(1, 2, 1, 2.2))
    assert overlapped.makespan < plain.makespan
    # a rank with more F&B pairs finishes its own work sooner and so waits longer for the others
    pairs = [sum(op.kind == "F&B" for op in ops) for ops in s.ops]
    for r1 in range(s.num_ranks):
        for r2 in range(s.num_ranks):
            if pairs[r1] > pairs[r2]:
                assert overlapped.bubble(r1) > overlapped.bubble(r2)
    assert overlapped.bubble() == pytest.approx(overlapped.bubble(pairs.index(max(pairs))))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_latency_only_delays(name):
    pp, chunks = SETTINGS[name][2]
    s = build_schedule(name, pp, chunks)
    base = simulate(s).makespan
    assert simulate(s, latency=0.25).makespan >= base
    assert simulate(s, latency=0.25).makespan > base or pp == 2


@pytest.mark.parametrize("name", list(SETTINGS))
def test_peak_in_flight_matches_activation_column(name):
    for pp, chunks in SETTINGS[name]:
        s = build_schedule(name, pp, chunks)
        peaks = peak_activations(s)
        assert max(peaks) == formula_activations(name, pp), (pp, chunks, peaks)
        if name == "1f1b":  # rank r holds the PP - r micro-batches of its warm-up
            assert peaks == [pp - r for r in range(pp)]
        if name == "zb1p":  # ZB-H1: r deferred W's make every rank reach 1F1B's first-rank peak
            assert peaks == [pp] * pp
        if name in ("dualpipe", "dualpipev"):  # balanced: every device peaks at PP + 1
            assert set(peaks) == {pp + 1}


def test_summary_parameters_per_device():
    for name, params in [("1f1b", 1), ("zb1p", 1), ("dualpipe", 2), ("dualpipev", 2)]:
        pp, chunks = SETTINGS[name][1]
        row = summarize(simulate(build_schedule(name, pp, chunks)))
        assert row.params_per_device == params
        assert row.bubble == pytest.approx(row.formula) and row.caveat is None


def test_text_timeline_shows_every_op():
    sim = simulate(build_schedule("dualpipe", 4, 8))
    lines = text_timeline(sim).splitlines()
    assert len(lines) == 4 + 1  # one row per rank and the legend
    for rank, line in enumerate(lines[:4]):
        assert line.count("[") == len(sim.schedule.ops[rank])
        assert "&" in line and "." in line  # overlapped pairs, and the bubble


def test_cli_prints_table_and_draws_png(tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert pipeline_plan_main(["--schedule", "all", "--pp", "4", "--chunks", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in SETTINGS:
        png = tmp_path / f"plan-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        row = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert f"{formula_bubble(name, 4, Costs()):g}" in row.split()
    assert pipeline_plan_main(["--schedule", "zb1p", "--pp", "4", "--chunks", "8", "--w", "1.5"]) == 0
    assert "note (zb1p)" in capsys.readouterr().out


def test_cli_refuses_invalid_settings(capsys):
    assert pipeline_plan_main(["--schedule", "dualpipe", "--pp", "7", "--chunks", "28", "--no-text"]) == 2
    assert "pp: dualpipe needs an even pp" in capsys.readouterr().err
    assert pipeline_plan_main(["--schedule", "dualpipe", "--pp", "8", "--chunks", "10", "--no-text"]) == 2
    assert "chunks=10" in capsys.readouterr().err
