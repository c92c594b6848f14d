"""The overlapped forward-backward pair of DualPipe (§3.2.1, Figure 4): F&B ops.

An F&B op runs the forward of one micro-batch and the backward of another (of the other direction
in DualPipe, of the other leg of the V in DualPipeV). Both are cut into phases (`phases.py`:
attention, dispatch, MLP, combine per block) and run alternately, forward first:

    F attention | B combine^T | F dispatch | B mlp^T | F mlp | B dispatch^T | F combine | B attention^T

so every communication phase of one micro-batch (dispatch, combine and their backward, the
all-to-alls of expert parallelism) sits next to a computation phase of the other. The backward
fetches its output gradient only at its first phase, while the forward's attention computes, and
each half sends its result the moment its last phase ends (asynchronous isend).

What overlaps: with expert parallelism in the stage (`PipelineRunner(ep=...)`), the dispatch and
combine phases start their all-to-all (`comm.start_all_to_all`, `async_op=True`) and return; the
micro-batch's next phase waits for it, after the other half's step has run in between (`phases.py`).
In the backward, the phase whose forward waited starts the reverse exchange and the comm phase
before it waits for it, so the gradients' all-to-alls overlap the same way. On gloo (this CPU
build) an exchange runs on gloo's worker threads while this thread computes the other half, so an
all-to-all's time (the injected `Link.latency` of the tests and the benchmark, or a real network's)
is hidden behind the other micro-batch's computation; on NCCL it would run on its own stream (with
DeepEP, on dedicated SMs), and the two halves' kernels would also overlap with each other, which
on a CPU they do not (the two halves' computation runs one after the other on this thread).
The pipeline's point-to-point transfers overlap too: gloo's isend/irecv run on its transport
threads, so a sent activation travels while the other half computes, and receives posted ahead
fill while this rank computes. Without expert parallelism the dispatch and combine are local
permutations and the interleaving only fixes the order.

Every rank of an EP group runs the same pairs in the same phase order (the order depends on the
schedule only, never on timing), so their collectives are issued in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from dsv3.parallel.pipeline.schedule import Task

if TYPE_CHECKING:
    from dsv3.parallel.pipeline.runtime import PipelineRunner


def interleave(streams: list[tuple[Iterator[str], Callable[[], None]]]) -> list[str]:
    """Advance the (steps, on_done) streams one step each in turn; call on_done as each one ends.
    Returns the order in which the phases ran (for tests and traces)."""
    order: list[str] = []
    live = list(range(len(streams)))
    while live:
        for i in list(live):
            steps, on_done = streams[i]
            name = next(steps, None)
            if name is None:
                on_done()
                live.remove(i)
            else:
                order.append(f"{'FB'[i]}:{name}")
    return order


def run_pair(runner: PipelineRunner, fwd: Task, bwd: Task) -> list[str]:
    """Run the F&B op (fwd, bwd) on `runner`, phases interleaved; returns the phase order."""
    f = runner.begin_forward(fwd)
    b, b_steps = runner.begin_backward(bwd)
    return interleave(
        [
            (f.forward_steps(), lambda: runner.end_forward(fwd, f)),
            (b_steps, lambda: runner.end_backward(bwd, b)),
        ]
    )
