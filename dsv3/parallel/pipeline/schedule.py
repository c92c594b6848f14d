"""Pipeline-parallel schedules as data: per rank, the ordered list of operations to execute.

The model is cut into S stages (stage 0 holds the embedding, stage S-1 the final norm, the head and
the MTP modules). A micro-batch runs forward through the stages in order and backward in reverse.
A schedule says, for every rank, in which order it runs which piece of work; the sends and receives
follow from the data dependencies (`Schedule.dependencies`, `recv_from`, `send_to`), so the same
object drives the event simulator (`dsv3.parallel.pipeline.plan`) and, later, the torch.distributed runtime.

Work items (`Task.kind`):
  F  forward of one micro-batch through one stage
  B  full backward (input and weight gradients together)
  I  input-gradient backward only (the zero-bubble "B"): it unblocks the previous stage at once
  W  weight-gradient backward of an earlier I, deferred to fill a bubble (Qi et al. 2023, arXiv 2401.10241)
An `Op` is one task, or a forward and a backward overlapped as one unit (F&B, DualPipe only).

Schedules (`build_schedule`):
  1f1b       PipeDream-flush / Megatron: rank r warms up with PP-1-r forwards, then alternates one
             forward and one backward, then drains. At most PP-r micro-batches in flight on rank r.
  zb1p       ZB-H1 of the zero-bubble paper: 1F1B order with the backward split into I and W; rank r
             keeps r weight gradients pending, so the backward wave travels at I speed and the
             drain bubbles are filled with W, at the activation memory of 1F1B.
  dualpipe   DeepSeek-V3 §3.2.1, Figure 5: rank r holds stage r and stage PP-1-r (two model copies,
             2x parameters); half the micro-batches enter at rank 0, half at rank PP-1. After the
             warm-up, every step overlaps a forward of one direction with a backward of the other
             (F&B), hiding the all-to-all and PP communication of each behind the other's compute;
             the tail splits backwards into I and W to fill the drain (zero-bubble style).
  dualpipev  the "cut-in-half" DualPipe (DualPipe repository): the PP stages folded into a V on
             PP/2 devices, device d holding stages d and PP-1-d; one direction only, the same
             step structure as DualPipe with the V's turning point in place of its middle.

DualPipe and DualPipeV share one per-rank program (`_dualpipe_program`), written in terms of a
rank's two chunks: chunk 0 is the one micro-batches reach first (DualPipe: the stage of the direction
that enters at this rank's end; DualPipeV: the down leg) and chunk 1 the other. Its eight phases,
with h the rank's distance to the nearest end of the pipe, H = #devices/2 (DualPipe) or #devices
(DualPipeV), and M micro-batches per chunk: (1) 2(H-h-1) forwards of chunk 0; (2) h+1 pairs of
forwards of chunks 0 and 1; (3) H-h-1 times I1, W, F1; (4) M-2H+h+1 times F0&B1 then F1&B0 (the
middle ranks run their first F0 and B1 apart); (5) H-h-1 times B1 then F1&B0; (6) h+1 pairs of
backwards B1, B0, the last h+1 of them split into I and W; (7) H-h-1 times W, I0; (8) h+1 W.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from dsv3.errors import Dsv3Error

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD = "F", "B", "I", "W"


class ScheduleError(Dsv3Error, ValueError):
    """Invalid schedule settings; the message names the argument and its value."""


@dataclass(frozen=True)
class Task:
    kind: str  # F, B, I or W (see the module docstring)
    mb: int  # micro-batch id, 0..chunks-1 (DualPipe: the first half enter at rank 0, the rest at PP-1)
    stage: int  # model stage, 0 = embedding ... S-1 = head and MTP
    direction: int = 0  # 0 enters at rank 0; 1 enters at the last rank (DualPipe only)


@dataclass(frozen=True)
class Op:
    tasks: tuple[Task, ...]  # one task, or (forward, backward) run overlapped

    @property
    def kind(self) -> str:
        return "F&B" if len(self.tasks) == 2 else self.tasks[0].kind

    def __str__(self) -> str:
        return "&".join(f"{t.kind}{t.mb}" for t in self.tasks)


@dataclass(frozen=True)
class Schedule:
    name: str
    num_ranks: int  # devices in the pipeline
    num_stages: int  # model stages (the "PP" of DESIGN §5's table)
    num_microbatches: int
    ops: tuple[tuple[Op, ...], ...]  # ops[rank]: what that rank runs, in order

    @property
    def split_backward(self) -> bool:
        return any(t.kind == WEIGHT_GRAD for rank_ops in self.ops for op in rank_ops for t in op.tasks)

    @property
    def chunks_per_rank(self) -> int:
        """Model stages held by each rank: the parameter memory in units of one stage (1x or 2x)."""
        return 2 if self.name in ("dualpipe", "dualpipev") else 1

    def direction_of(self, mb: int) -> int:
        return int(self.name == "dualpipe" and mb >= self.num_microbatches // 2)

    def rank_of(self, stage: int, direction: int = 0) -> int:
        """The rank that runs `stage` for micro-batches of `direction`."""
        if self.name == "dualpipe":
            return stage if direction == 0 else self.num_stages - 1 - stage
        if self.name == "dualpipev":  # the V: down ranks 0..D-1, then back up D-1..0
            return stage if stage < self.num_ranks else self.num_stages - 1 - stage
        return stage

    def chunk_of(self, stage: int, direction: int = 0) -> int:
        """Index (0 or 1) of the local model chunk that holds `stage` on `rank_of(stage, direction)`."""
        if self.name == "dualpipe":
            return direction
        if self.name == "dualpipev":
            return int(stage >= self.num_ranks)
        return 0

    @cached_property
    def _backward_task(self) -> dict[tuple[int, int], Task]:
        """(mb, stage) -> the task that produces that stage's input gradient (its B or its I)."""
        return {
            (t.mb, t.stage): t
            for rank_ops in self.ops
            for op in rank_ops
            for t in op.tasks
            if t.kind in (BACKWARD, INPUT_GRAD)
        }

    def dependencies(self, task: Task) -> tuple[Task, ...]:
        """The tasks whose results `task` consumes (same rank: saved state; other rank: a message)."""
        mb, s, d = task.mb, task.stage, task.direction
        if task.kind == FORWARD:
            return () if s == 0 else (Task(FORWARD, mb, s - 1, d),)
        if task.kind == WEIGHT_GRAD:
            return (Task(INPUT_GRAD, mb, s, d),)
        own_forward = Task(FORWARD, mb, s, d)  # the activations saved by this stage's forward
        if s == self.num_stages - 1:  # the last stage starts the backward from its own loss
            return (own_forward,)
        return (own_forward, self._backward_task[(mb, s + 1)])

    def upstream(self, task: Task) -> Task | None:
        """The task on the neighbouring stage whose output `task` receives, or None at the ends."""
        if task.kind == WEIGHT_GRAD:
            return None
        deps = self.dependencies(task)
        return deps[-1] if deps and deps[-1].stage != task.stage else None

    def recv_from(self, task: Task) -> int | None:
        """Rank that sends `task` its input (activation for F, output gradient for B/I); None if local."""
        up = self.upstream(task)
        if up is None or self.rank_of(up.stage, up.direction) == self.rank_of(task.stage, task.direction):
            return None
        return self.rank_of(up.stage, up.direction)

    def send_to(self, task: Task) -> int | None:
        """Rank that receives `task`'s output (activation of F, input gradient of B/I); None if none/local."""
        if task.kind == FORWARD and task.stage < self.num_stages - 1:
            nxt = task.stage + 1
        elif task.kind in (BACKWARD, INPUT_GRAD) and task.stage > 0:
            nxt = task.stage - 1
        else:
            return None
        here, there = self.rank_of(task.stage, task.direction), self.rank_of(nxt, task.direction)
        return None if here == there else there


# --- validation ------------------------------------------------------------------------------------


def validate(name: str, pp: int, chunks: int) -> None:
    """Refuse settings a schedule cannot run, naming the argument and its value (DESIGN §5)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {name!r}")
    if not isinstance(pp, int) or pp < 2:
        raise ScheduleError(f"pp: a pipeline needs an integer number of stages >= 2, got pp={pp!r}")
    if not isinstance(chunks, int) or chunks < 1:
        raise ScheduleError(f"chunks: the number of micro-batches must be a positive integer, got {chunks!r}")
    if name in ("1f1b", "zb1p") and chunks < pp:
        raise ScheduleError(
            f"chunks: {name} needs at least pp micro-batches to reach its steady phase, "
            f"got chunks={chunks} < pp={pp}"
        )
    if name in ("dualpipe", "dualpipev") and pp % 2:
        what = (
            "rank r holds stages r and pp-1-r" if name == "dualpipe" else "pp stages fold onto pp/2 devices"
        )
        raise ScheduleError(f"pp: {name} needs an even pp ({what}), got pp={pp}")
    if name == "dualpipe":
        if chunks % 2:
            raise ScheduleError(
                f"chunks: dualpipe feeds half the micro-batches from each end, so chunks must be even, "
                f"got chunks={chunks}"
            )
        if chunks < 2 * pp:
            raise ScheduleError(f"chunks: dualpipe needs chunks >= 2*pp = {2 * pp}, got chunks={chunks}")
    if name == "dualpipev" and chunks < pp:
        raise ScheduleError(
            f"chunks: dualpipev needs chunks >= 2 x its {pp // 2} devices = {pp}, got chunks={chunks}"
        )


# --- per-rank programs -----------------------------------------------------------------------------

# A program is a list of steps; a step is a tuple of (kind, chunk) actions run as one op
# (two actions = F&B, forward first). W has no chunk: it runs the oldest pending weight gradient.
Step = tuple[tuple[str, int], ...]


def _one_f_one_b_program(pp: int, rank: int, chunks: int, split: bool) -> list[Step]:
    warmup = pp - 1 - rank
    prog: list[Step] = [((FORWARD, 0),)] * warmup
    pending = 0  # weight gradients deferred so far (zb1p)
    for i in range(chunks):
        if i + warmup < chunks:
            prog.append(((FORWARD, 0),))
        if not split:
            prog.append(((BACKWARD, 0),))
            continue
        prog.append(((INPUT_GRAD, 0),))
        pending += 1
        # ZB-H1: rank r keeps r weight gradients pending (activation memory (p-r)M_B + r*M_W <= p*M_B)
        # so its input gradients leave early enough that the drain bubbles of the ranks before it close.
        if pending > rank:
            prog.append(((WEIGHT_GRAD, -1),))
            pending -= 1
    prog += [((WEIGHT_GRAD, -1),)] * pending
    return prog


def _dualpipe_program(h: int, half: int, per_chunk: int) -> list[Step]:
    """The eight phases of the module docstring for a rank at distance h from the nearest end."""
    f0, f1, b0, b1, i0, i1, w = (
        (FORWARD, 0),
        (FORWARD, 1),
        (BACKWARD, 0),
        (BACKWARD, 1),
        (INPUT_GRAD, 0),
        (INPUT_GRAD, 1),
        (WEIGHT_GRAD, -1),
    )
    lag, lead = half - h - 1, h + 1  # ranks near the ends warm up longer; middle ranks start overlapping
    prog: list[Step] = [(f0,)] * (2 * lag)
    prog += [(f0,), (f1,)] * lead
    prog += [(i1,), (w,), (f1,)] * lag  # W fills the wait for the next chunk-1 input
    for i in range(per_chunk - 2 * half + h + 1):
        if i == 0 and h == half - 1:  # middle ranks: no partner is ready yet, run them apart
            prog += [(f0,), (b1,)]
        else:
            prog.append((f0, b1))
        prog.append((f1, b0))
    prog += [(b1,), (f1, b0)] * lag
    drain = [b1, b0] * lead  # the second half of the drain backwards leave their W for later
    prog += [((i0 if a == b0 else i1),) if j >= lead else (a,) for j, a in enumerate(drain)]
    prog += [(w,), (i0,)] * lag
    prog += [(w,)] * lead
    return prog


def _materialize(prog: list[Step], place: Callable[[int, int], tuple[int, int, int]]) -> tuple[Op, ...]:
    """Turn a program into ops: the k-th forward (backward) of a chunk takes its k-th micro-batch;
    `place(chunk, k)` gives (mb, stage, direction); W runs the oldest I not yet completed (FIFO)."""
    n_fwd, n_bwd = [0, 0], [0, 0]
    waiting_w: deque[Task] = deque()
    ops = []
    for step in prog:
        tasks = []
        for kind, chunk in step:
            if kind == WEIGHT_GRAD:
                done = waiting_w.popleft()
                tasks.append(Task(WEIGHT_GRAD, done.mb, done.stage, done.direction))
                continue
            counter = n_fwd if kind == FORWARD else n_bwd
            mb, stage, direction = place(chunk, counter[chunk])
            counter[chunk] += 1
            tasks.append(Task(kind, mb, stage, direction))
            if kind == INPUT_GRAD:
                waiting_w.append(tasks[-1])
        ops.append(Op(tuple(tasks)))
    assert not waiting_w, "every deferred weight gradient must be run"
    return tuple(ops)


def build_schedule(name: str, pp: int, chunks: int) -> Schedule:
    """The per-rank op lists of schedule `name` for `pp` stages and `chunks` micro-batches.

    `pp` counts model stages (DESIGN §5's PP): 1f1b, zb1p and dualpipe run on pp ranks, dualpipev
    on pp/2. `chunks` counts micro-batches per training step (dualpipe: half from each end).
    """
    validate(name, pp, chunks)
    if name in ("1f1b", "zb1p"):
        ranks = tuple(
            _materialize(
                _one_f_one_b_program(pp, r, chunks, split=name == "zb1p"),
                lambda chunk, k, r=r: (k, r, 0),
            )
            for r in range(pp)
        )
        return Schedule(name, pp, pp, chunks, ranks)
    if name == "dualpipe":
        half, per_dir = pp // 2, chunks // 2

        def place(r: int, chunk: int, k: int) -> tuple[int, int, int]:
            # chunk 0 carries the direction entering at this rank's end of the pipe
            direction = chunk if r < half else 1 - chunk
            stage = r if direction == 0 else pp - 1 - r
            return direction * per_dir + k, stage, direction

        ranks = tuple(
            _materialize(
                _dualpipe_program(min(r, pp - 1 - r), half, per_dir), lambda c, k, r=r: place(r, c, k)
            )
            for r in range(pp)
        )
        return Schedule(name, pp, pp, chunks, ranks)
    devices = pp // 2  # dualpipev: device d holds stage d (chunk 0) and stage pp-1-d (chunk 1)
    ranks = tuple(
        _materialize(
            _dualpipe_program(d, devices, chunks),
            lambda chunk, k, d=d: (k, d if chunk == 0 else pp - 1 - d, 0),
        )
        for d in range(devices)
    )
    return Schedule(name, devices, pp, chunks, ranks)
