"""The overlapped forward-backward pair of DualPipe (§3.2.1, Figure 4): F&B ops.

An F&B op runs the forward of one micro-batch and the backward of another (of the other direction
in DualPipe, of the other leg of the V in DualPipeV). Both are cut into phases (`phases.py`:
attention, dispatch, MLP, combine per block) and run alternately, forward first:

    F attention | B combine^T | F dispatch | B mlp^T | F mlp | B dispatch^T | F combine | B attention^T

so every communication phase of one micro-batch (dispatch, combine and their backward, the
all-to-alls of expert parallelism) sits next to a computation phase of the other. The backward
fetches its output gradient only at its first phase, while the forward's attention computes, and
each half sends its result the moment its last phase ends (asynchronous isend).

What overlaps on this CPU build: the pipeline's point-to-point transfers. gloo's isend/irecv run on
its transport threads, so a sent activation travels while the other half computes, and receives
posted ahead fill while this rank computes. Inside a stage nothing is communicated here (the MoE
is single-device, its dispatch and combine are local permutations), so the phase interleaving
only fixes the order. With expert parallelism the dispatch/combine phases would start their
all-to-all asynchronously (`async_op=True`; gloo runs collectives on worker threads, NCCL on a
separate stream, DeepEP with dedicated SMs) and the next phase of the same micro-batch would wait
for it, after the other micro-batch's compute phase has run in between. On GPUs, the computation
of the two halves also overlaps at the kernel level only through such streams; on CPU the two
halves' compute runs one after the other.
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
