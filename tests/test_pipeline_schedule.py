"""Pipeline schedules as data: every rank's op list is complete, well placed and well ordered.

Properties, not recorded outputs: each (micro-batch, stage) gets one forward and one backward (a full B,
or an I and a W), on the rank that holds that stage; a rank runs a stage's forward before its backward
and an I before its W; every message a rank sends is received by exactly the rank that needs it; an
event simulation with random costs and latency never starts an op before its inputs have arrived.
"""

import random
from collections import Counter

import pytest

from dsv3.parallel.pipeline.plan import Costs, simulate
from dsv3.parallel.pipeline.schedule import SCHEDULES, ScheduleError, build_schedule, validate

# (schedule, pp stages, chunks): the minimum settings, uneven ones, and the paper's PP = 16
CASES = [
    ("1f1b", 2, 2),
    ("1f1b", 4, 7),
    ("1f1b", 8, 20),
    ("zb1p", 2, 2),
    ("zb1p", 4, 7),
    ("zb1p", 8, 20),
    ("dualpipe", 2, 4),
    ("dualpipe", 4, 8),
    ("dualpipe", 6, 14),
    ("dualpipe", 8, 20),
    ("dualpipe", 16, 32),
    ("dualpipev", 2, 2),
    ("dualpipev", 4, 5),
    ("dualpipev", 8, 20),
    ("dualpipev", 16, 17),
]


def _tasks(s):
    return [(rank, i, t) for rank, ops in enumerate(s.ops) for i, op in enumerate(ops) for t in op.tasks]


@pytest.mark.parametrize("name,pp,chunks", CASES)
def test_every_microbatch_gets_one_forward_and_one_backward_per_stage(name, pp, chunks):
    s = build_schedule(name, pp, chunks)
    kinds = Counter((t.mb, t.stage, t.kind) for _, _, t in _tasks(s))
    for mb in range(chunks):
        for stage in range(pp):
            f, b, i, w = (kinds[(mb, stage, k)] for k in "FBIW")
            assert f == 1, (mb, stage)
            assert (b, i, w) in ((1, 0, 0), (0, 1, 1)), (mb, stage, b, i, w)
    assert {(mb, st) for mb, st, _ in kinds} == {(mb, st) for mb in range(chunks) for st in range(pp)}
    if name == "1f1b":
        assert not s.split_backward
    if name == "zb1p":  # every backward is split: the W is what fills the bubbles
        assert all(kinds[(mb, st, "I")] == 1 for mb in range(chunks) for st in range(pp))


@pytest.mark.parametrize("name,pp,chunks", CASES)
def test_tasks_run_on_the_rank_that_holds_their_stage(name, pp, chunks):
    s = build_schedule(name, pp, chunks)
    assert s.num_stages == pp and s.num_ranks == (pp // 2 if name == "dualpipev" else pp)
    held = {r: set() for r in range(s.num_ranks)}
    for rank, _, t in _tasks(s):
        assert t.direction == s.direction_of(t.mb)
        assert s.rank_of(t.stage, t.direction) == rank, (t, rank)
        held[rank].add((t.stage, t.direction))
    for rank, stages in held.items():
        assert len(stages) == s.chunks_per_rank  # parameters per device: 1x or 2x a stage
        if name == "dualpipe":  # rank r holds stage r and stage PP-1-r
            assert stages == {(rank, 0), (pp - 1 - rank, 1)}
        if name == "dualpipev":  # device d holds stage d and stage PP-1-d: the V
            assert stages == {(rank, 0), (pp - 1 - rank, 0)}
    if name == "dualpipe":  # half the micro-batches enter from each end
        assert Counter(s.direction_of(mb) for mb in range(chunks)) == {0: chunks // 2, 1: chunks // 2}
    if name == "dualpipev":  # embedding (stage 0) and head (stage PP-1) share device 0 (DESIGN §5)
        assert s.rank_of(0) == s.rank_of(pp - 1) == 0


@pytest.mark.parametrize("name,pp,chunks", CASES)
def test_rank_order_respects_local_dependencies(name, pp, chunks):
    s = build_schedule(name, pp, chunks)
    for ops in s.ops:
        pos = {t: i for i, op in enumerate(ops) for t in op.tasks}
        seen_f, seen_b = {}, {}
        for t, i in pos.items():
            if t.kind in "BI":
                assert pos[type(t)("F", t.mb, t.stage, t.direction)] < i
            if t.kind == "W":
                assert pos[type(t)("I", t.mb, t.stage, t.direction)] < i
        # a stage takes its micro-batches in order, forward and backward alike (FIFO, like the runtime)
        for op in ops:
            for t in op.tasks:
                seen = seen_f if t.kind == "F" else seen_b if t.kind in "BI" else None
                if seen is not None:
                    assert t.mb > seen.get(t.stage, -1)
                    seen[t.stage] = t.mb


@pytest.mark.parametrize("name,pp,chunks", CASES)
def test_overlapped_pairs_join_the_two_directions(name, pp, chunks):
    s = build_schedule(name, pp, chunks)
    pairs = [op for ops in s.ops for op in ops if op.kind == "F&B"]
    if name not in ("dualpipe", "dualpipev"):
        assert not pairs
        return
    assert pairs  # the steady state is made of F&B
    for op in pairs:
        fwd, bwd = op.tasks
        assert fwd.kind == "F" and bwd.kind == "B"
        # a forward of one direction (chunk) hides the communication of a backward of the other
        assert s.chunk_of(fwd.stage, fwd.direction) != s.chunk_of(bwd.stage, bwd.direction)


@pytest.mark.parametrize("name,pp,chunks", CASES)
def test_every_send_has_a_matching_receive(name, pp, chunks):
    s = build_schedule(name, pp, chunks)
    sent, received = Counter(), Counter()
    for rank, _, t in _tasks(s):
        if (dst := s.send_to(t)) is not None:
            sent[(rank, dst, t.mb, t.kind == "F")] += 1
        if (src := s.recv_from(t)) is not None:
            up = s.upstream(t)
            assert s.rank_of(up.stage, up.direction) == src and s.send_to(up) == rank
            received[(src, rank, t.mb, t.kind == "F")] += 1
    assert sent == received
    # activations and gradients cross each stage boundary once per micro-batch, except the V's turn
    local_turns = 1 if name == "dualpipev" else 0
    assert sum(sent.values()) == 2 * chunks * (pp - 1 - local_turns)


@pytest.mark.parametrize("name,pp,chunks", CASES)
def test_simulated_ops_start_after_their_inputs_arrive(name, pp, chunks):
    rng = random.Random(f"{name}{pp}{chunks}")
    b = rng.uniform(0.5, 3)
    costs = Costs(f=rng.uniform(0.5, 3), b=b, w=rng.uniform(0, 0.9 * b), fb=rng.uniform(0.5, 6))
    latency = rng.uniform(0, 1)
    sim = simulate(build_schedule(name, pp, chunks), costs, latency)
    where = {t: (r, iv) for r, row in enumerate(sim.timeline) for iv in row for t in iv.op.tasks}
    for r, row in enumerate(sim.timeline):
        assert [iv.op for iv in row] == list(sim.schedule.ops[r])  # executed in the schedule's order
        for prev, iv in zip(row, row[1:]):
            assert iv.start >= prev.end - 1e-9  # one op at a time per rank
        for iv in row:
            assert iv.end - iv.start == pytest.approx(costs.of(iv.op))
            for t in iv.op.tasks:
                for d in sim.schedule.dependencies(t):
                    dr, div = where[d]
                    assert iv.start >= div.end + (latency if dr != r else 0) - 1e-9, (t, d)


def test_validation_names_the_argument_and_value():
    bad = {
        ("dualpipe", 7, 28): "pp=7",  # odd PP cannot pair stage r with PP-1-r
        ("dualpipe", 8, 21): "chunks=21",  # odd chunks cannot be split between the two ends
        ("dualpipe", 8, 14): "2*pp = 16",
        ("dualpipev", 7, 28): "pp=7",
        ("dualpipev", 8, 7): "4 devices = 8",
        ("1f1b", 8, 7): "chunks=7 < pp=8",
        ("zb1p", 4, 3): "chunks=3 < pp=4",
        ("1f1b", 1, 4): "pp=1",
        ("zb1p", 4, 0): "0",
        ("gpipe", 4, 8): "'gpipe'",
    }
    for (name, pp, chunks), fragment in bad.items():
        with pytest.raises(ScheduleError, match="^(pp|chunks|schedule): ") as e:
            build_schedule(name, pp, chunks)
        assert fragment in str(e.value), (name, pp, chunks, str(e.value))
    for name in SCHEDULES:  # the documented minimums are accepted
        validate(name, 4, {"dualpipe": 8}.get(name, 4))


def test_cost_validation():
    for kwargs, field in [({"f": 0}, "f"), ({"b": -1}, "b"), ({"w": 2}, "w"), ({"fb": 0}, "fb")]:
        with pytest.raises(ScheduleError, match=f"^{field}: "):
            Costs(**kwargs)
