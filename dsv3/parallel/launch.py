"""Run a function on N local processes joined by torch.distributed, for tests and benchmarks.

Production runs use `torchrun` (see docs/parallel.md); this gives each rank the same environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) so a test can start ranks, collect what each
returns, and never hang: the process group gets a collective timeout, the launcher a deadline after
which it kills what is left, and a rank that dies is reported with its exit code. Processes come
from a fork server that has imported torch once (a fresh `import torch` costs seconds here, per
rank and per launch); ranks meet through a file store, so there is no port to collide with. The
function must be importable (module level) and the calling script needs the
`if __name__ == "__main__":` guard (the fork server re-imports it, DESIGN §10).
"""

from __future__ import annotations

import io
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass
class Outcome:
    """What one rank did: its return value, or the error it raised, or how it died."""

    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    exitcode: int | None = None
    seconds: float = 0.0


class RanksFailed(RuntimeError):
    """At least one rank raised, died, or ran past the deadline; the message has each one's story."""


PRELOAD = ("torch", "torch.distributed", "torch.fx.experimental.symbolic_shapes", "dsv3")


def _worker(fn, rank, world, store, results, args, timeout, threads, env) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), **env
    )
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout),
        )
        value = fn(rank, world, *args)
        buf = io.BytesIO()  # by value: shared-memory tensors would vanish with this process
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue(), "", time.perf_counter() - t0))
    except BaseException as e:  # report everything, including PeerFailure, to the launcher
        results.put(
            (
                rank,
                False,
                None,
                f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                time.perf_counter() - t0,
            )
        )
        raise SystemExit(1) from None
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 30.0,
    deadline: float = 120.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
    grace: float | None = None,
) -> list[Outcome]:
    """Run fn(rank, world, *args) on `world` spawned processes; one Outcome per rank.

    `timeout` bounds each collective; `deadline` the whole run; once a rank has failed, the others
    get `grace` seconds (default: timeout + 10) to finish or fail, then they are killed."""
    grace = timeout + 10 if grace is None else grace
    import multiprocessing as mp

    import torch

    if world < 1:
        raise ValueError(f"world: must be >= 1, got {world}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    results = ctx.Queue()
    fd, store = tempfile.mkstemp(prefix="dsv3-gloo-")
    os.close(fd)
    os.remove(store)  # the FileStore creates it; a stale file would confuse the rendezvous
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world, store, results, args, timeout, threads, env or {}))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, Outcome] = {}
    end = time.monotonic() + deadline
    while len(outcomes) < world and time.monotonic() < end:
        try:
            rank, ok, value, error, seconds = results.get(timeout=0.2)
            value = torch.load(io.BytesIO(value), weights_only=False) if ok else None
            outcomes[rank] = Outcome(rank, ok, value, error, seconds=seconds)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
        failed = any(not o.ok for o in outcomes.values()) or any(p.exitcode not in (None, 0) for p in procs)
        if failed:  # like torchrun: once one rank failed, the others get `grace` seconds, then are stopped
            end = min(end, time.monotonic() + grace)
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, min(5.0, end - time.monotonic())))
        if p.is_alive():  # past the deadline: ours to stop
            p.kill()
            p.join(5)
            outcomes.setdefault(
                r, Outcome(r, False, error=f"rank {r}: still running at the deadline; killed")
            )
        outcomes.setdefault(r, Outcome(r, False, error=f"rank {r}: died with exit code {p.exitcode}"))
        outcomes[r].exitcode = p.exitcode
    if os.path.exists(store):
        os.remove(store)
    return [outcomes[r] for r in range(world)]


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, **kw: Any) -> list[Any]:
    """`launch`, then every rank's return value; raises RanksFailed if any rank did not finish."""
    outcomes = launch(fn, world, *args, **kw)
    bad = [o for o in outcomes if not o.ok]
    if bad:
        raise RanksFailed("\n".join(f"--- rank {o.rank} (exit {o.exitcode}): {o.error}" for o in bad))
    return [o.value for o in outcomes]
