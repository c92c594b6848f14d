"""Event simulation of a pipeline schedule: timelines, bubble and memory (DESIGN §5).

`simulate` executes the per-rank op lists of a `Schedule` the way a runtime would: an op starts
when its rank has finished the previous op and every input it needs has arrived (the output of the
neighbouring stage's task, plus an optional point-to-point latency when that stage lives on another
rank). Both halves of an overlapped F&B finish, and send, when the pair ends.

Costs, in any time unit: F forward of one stage, B full backward, W its weight-gradient part (so an
input-gradient-only backward costs B - W), FB an overlapped forward-backward pair (default F + B,
i.e. the overlap hides communication, not compute).

Bubble. Every rank runs the same work: one F and one backward per (micro-batch, stage) it holds.
The ideal step time is that work with no idle time, and the bubble of a rank is its idle time:

    bubble(rank) = makespan - busy(rank),   busy(rank) = sum of the costs of the rank's ops,

and the schedule's bubble is the largest over ranks. With FB = F + B every rank is equally busy
(chunks/ranks x stages-per-rank x (F + B)), so the bubble is makespan minus the ideal. The formulas of
DESIGN §5, and when the simulation meets them exactly, are in `formula_bubble` and docs/pipeline.md.

Activation memory. A (micro-batch, stage) pair is in flight on its rank from the start of its forward
until its full backward or weight-gradient backward ends (W needs the saved inputs). The peak is
counted in op order, with the forward of an F&B allocating before its backward frees: the unit is
one stage's activations for one micro-batch, DESIGN §5's "activations" column.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dsv3.parallel.pipeline.schedule import (
    BACKWARD,
    FORWARD,
    INPUT_GRAD,
    WEIGHT_GRAD,
    Op,
    Schedule,
    ScheduleError,
    Task,
)


@dataclass(frozen=True)
class Costs:
    f: float = 1.0  # forward of one stage for one micro-batch
    b: float = 2.0  # full backward (input + weight gradients)
    w: float = 1.0  # weight-gradient part of b; the input-gradient backward costs b - w
    fb: float | None = None  # overlapped forward + backward pair; None: f + b (no compute overlap)

    def __post_init__(self) -> None:
        for name in ("f", "b"):
            if not getattr(self, name) > 0:
                raise ScheduleError(f"{name}: op cost must be > 0, got {getattr(self, name)}")
        if not 0 <= self.w < self.b:
            raise ScheduleError(
                f"w: the weight-gradient part must satisfy 0 <= w < b={self.b}, got w={self.w}"
            )
        if self.fb is not None and not self.fb > 0:
            raise ScheduleError(f"fb: op cost must be > 0, got fb={self.fb}")

    @property
    def pair(self) -> float:
        return self.f + self.b if self.fb is None else self.fb

    def of(self, op: Op) -> float:
        kind = op.kind
        return {
            "F&B": self.pair,
            FORWARD: self.f,
            BACKWARD: self.b,
            INPUT_GRAD: self.b - self.w,
            WEIGHT_GRAD: self.w,
        }[kind]


@dataclass(frozen=True)
class Interval:
    start: float
    end: float
    op: Op


@dataclass(frozen=True)
class Simulation:
    schedule: Schedule
    costs: Costs
    timeline: tuple[tuple[Interval, ...], ...]  # timeline[rank]: the rank's ops with their times

    @property
    def makespan(self) -> float:
        return max(iv[-1].end for iv in self.timeline)

    def busy(self, rank: int) -> float:
        return sum(i.end - i.start for i in self.timeline[rank])

    def bubble(self, rank: int | None = None) -> float:
        """Idle time of `rank` within the step; None: the largest over ranks (the schedule's bubble)."""
        if rank is None:
            return max(self.bubble(r) for r in range(self.schedule.num_ranks))
        return self.makespan - self.busy(rank)


def simulate(schedule: Schedule, costs: Costs | None = None, latency: float = 0.0) -> Simulation:
    """Run every rank's op list in order, each op as soon as its rank is free and its inputs arrived."""
    costs = costs or Costs()
    if latency < 0:
        raise ScheduleError(f"latency: must be >= 0, got {latency}")
    finish: dict[Task, float] = {}
    rank_of_task: dict[Task, int] = {}
    clock = [0.0] * schedule.num_ranks
    nxt = [0] * schedule.num_ranks
    timeline: list[list[Interval]] = [[] for _ in range(schedule.num_ranks)]
    waiting: dict[Task, list[int]] = {}  # task not yet run -> ranks blocked on its result
    runnable = deque(range(schedule.num_ranks))
    while runnable:
        r = runnable.popleft()
        ops = schedule.ops[r]
        while nxt[r] < len(ops):
            op = ops[nxt[r]]
            deps = [d for t in op.tasks for d in schedule.dependencies(t)]
            missing = next((d for d in deps if d not in finish), None)
            if missing is not None:  # resume this rank when the missing input is produced
                waiting.setdefault(missing, []).append(r)
                break
            ready = max([clock[r]] + [finish[d] + (latency if rank_of_task[d] != r else 0.0) for d in deps])
            end = ready + costs.of(op)
            for t in op.tasks:
                finish[t], rank_of_task[t] = end, r
                runnable.extend(waiting.pop(t, ()))
            timeline[r].append(Interval(ready, end, op))
            clock[r], nxt[r] = end, nxt[r] + 1
    stuck = [(r, str(ops[nxt[r]])) for r, ops in enumerate(schedule.ops) if nxt[r] < len(ops)]
    if stuck:
        raise RuntimeError(f"{schedule.name}: deadlock, ranks blocked at (rank, op) {stuck}")
    return Simulation(schedule, costs, tuple(tuple(t) for t in timeline))


def peak_activations(schedule: Schedule) -> list[int]:
    """Per rank, the most (micro-batch, stage) activations alive at once (see the module docstring)."""
    peaks = []
    for ops in schedule.ops:
        alive = peak = 0
        for op in ops:
            for t in op.tasks:  # forward first within an F&B: it allocates before the backward frees
                if t.kind == FORWARD:
                    alive += 1
                    peak = max(peak, alive)
                elif t.kind in (BACKWARD, WEIGHT_GRAD):
                    alive -= 1
        peaks.append(peak)
    return peaks


def formula_bubble(name: str, pp: int, costs: Costs) -> float:
    """DESIGN §5 / DeepSeek-V3 Table 2: the bubble of each schedule, PP = number of model stages."""
    f, b, w, fb = costs.f, costs.b, costs.w, costs.pair
    if name == "1f1b":
        return (pp - 1) * (f + b)
    if name == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if name in ("dualpipe", "dualpipev"):
        return (pp / 2 - 1) * (fb + b - 3 * w)
    raise ScheduleError(f"schedule: no bubble formula for {name!r}")


def formula_activations(name: str, pp: int) -> int:
    """DESIGN §5's activation column, in micro-batch activations of one stage."""
    return pp + 1 if name in ("dualpipe", "dualpipev") else pp


def formula_conditions(name: str, costs: Costs) -> str | None:
    """None when the simulated bubble equals `formula_bubble` exactly (zero latency), else why not.

    1F1B holds for any costs. ZB1P needs each W to fit the drain gaps it fills: W <= F and
    W <= B - W. DualPipe and DualPipeV need the forward and the input-gradient backward of a chunk
    to cost the same (F = B - W, the equal cells of Figure 5), W <= F, and max(F, B) <= F&B <= F + B.
    """
    f, b, w, fb, eps = costs.f, costs.b, costs.w, costs.pair, 1e-9
    if name == "zb1p" and not (w <= f + eps and w <= b - w + eps):
        return f"the ZB1P formula needs W <= F and W <= B - W (got F={f}, B={b}, W={w})"
    if name in ("dualpipe", "dualpipev"):
        if abs(f - (b - w)) > eps or w > f + eps:
            return f"the DualPipe formula needs F = B - W and W <= F (got F={f}, B={b}, W={w})"
        if not max(f, b) - eps <= fb <= f + b + eps:
            return f"the DualPipe formula needs max(F, B) <= F&B <= F + B (got F&B={fb})"
    return None


@dataclass(frozen=True)
class Summary:
    name: str
    stages: int
    ranks: int
    chunks: int
    makespan: float
    bubble: float  # simulated: the largest idle time of any rank
    formula: float  # DESIGN §5
    bubble_ratio: float  # bubble / makespan
    params_per_device: int  # in stages of parameters: 1x or 2x
    peak_activations: int  # simulated, largest over ranks
    table_activations: int  # DESIGN §5
    caveat: str | None  # why the formula is not exact for these costs, if it is not


def summarize(sim: Simulation, latency: float = 0.0) -> Summary:
    s = sim.schedule
    caveat = formula_conditions(s.name, sim.costs)
    if latency > 0:
        caveat = "the formulas assume zero p2p latency" + (f"; {caveat}" if caveat else "")
    return Summary(
        name=s.name,
        stages=s.num_stages,
        ranks=s.num_ranks,
        chunks=s.num_microbatches,
        makespan=sim.makespan,
        bubble=sim.bubble(),
        formula=formula_bubble(s.name, s.num_stages, sim.costs),
        bubble_ratio=sim.bubble() / sim.makespan,
        params_per_device=s.chunks_per_rank,
        peak_activations=max(peak_activations(s)),
        table_activations=formula_activations(s.name, s.num_stages),
        caveat=caveat,
    )


def format_summaries(rows: list[Summary]) -> str:
    head = (
        f"{'schedule':<10} {'PP':>3} {'ranks':>5} {'chunks':>6} {'makespan':>9} {'bubble':>8} "
        f"{'formula':>8} {'ratio':>6} {'params':>6} {'act.peak':>8} {'table':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.name:<10} {r.stages:>3} {r.ranks:>5} {r.chunks:>6} {r.makespan:>9.4g} {r.bubble:>8.4g} "
            f"{r.formula:>8.4g} {r.bubble_ratio:>6.1%} {f'{r.params_per_device}x':>6} "
            f"{r.peak_activations:>8} {r.table_activations:>5}"
        )
    lines += [f"note ({r.name}): {r.caveat}" for r in rows if r.caveat]
    return "\n".join(lines)
