"""Run a function on N local gloo processes, bounded in time (tests and benchmarks; torchrun in production).

`spawn(fn, world_size, *args)` starts `world_size` processes (start method "spawn": callers need the
`if __name__ == "__main__":` guard, DESIGN §10), each with one intra-op thread, a gloo process group
rendezvousing through a file (no port to collide with), and a process-group timeout. It returns
[fn(rank, world_size, *args) for each rank]. If any rank raises or dies, or the whole run exceeds
`timeout` seconds, every process left is killed and a RuntimeError says which rank failed and why:
a dead rank makes the others fail fast (gloo reports the closed connection), never hang.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ("torch", "torch.distributed", "torch.fx.experimental.symbolic_shapes", "dsv3.parallel.pipeline")


def _entry(fn, rank: int, world: int, store: str, pg_timeout: float, results, args) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        buf = io.BytesIO()  # by value: a tensor shared through memory would die with this process
        torch.save(fn(rank, world, *args), buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # report everything, including timeouts surfacing as RuntimeError
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 30.0,
) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` gloo processes; their return values by rank."""
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    ctx = mp.get_context("forkserver")
    # The fork server imports these once; every process forks from it with them loaded (a fresh
    # `import torch` costs seconds on this machine, times world_size, per launch).
    ctx.set_forkserver_preload(list(PRELOAD))
    results = ctx.Queue()
    fd, store = tempfile.mkstemp(prefix="dsv3-gloo-")
    os.close(fd)
    os.remove(store)  # the FileStore creates it; a stale file would confuse the rendezvous
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, store, pg_timeout, results, args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    outcome: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcome) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.2)
                outcome[rank] = (ok, torch.load(io.BytesIO(value), weights_only=False) if ok else value)
            except queue.Empty:
                for r, p in enumerate(procs):  # died without reporting (killed, os._exit, segfault)
                    if r not in outcome and p.exitcode is not None:
                        time.sleep(0.2)  # its report may still be in the pipe
                        if results.empty():
                            outcome[r] = (False, f"process exited with code {p.exitcode} without a result")
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(5)
        if os.path.exists(store):
            os.remove(store)
    failed = {r: v for r, (ok, v) in sorted(outcome.items()) if not ok}
    missing = [r for r in range(world_size) if r not in outcome]
    if failed or missing:
        lines = [f"rank {r} failed:\n{v}" for r, v in failed.items()]
        if missing:
            lines.append(f"ranks {missing} did not finish within timeout={timeout}s (killed)")
        raise RuntimeError("spawn: " + "\n".join(lines))
    return [outcome[r][1] for r in range(world_size)]
