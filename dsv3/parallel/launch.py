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

import atexit
import io
import os
import queue
import sys
import tempfile
import threading
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


# what the fork server imports once; dsv3.deploy.launch extends it (the fork server is per process)
PRELOAD = ("torch", "torch.distributed", "torch.fx.experimental.symbolic_shapes", "dsv3")

# ---- the watchdog: a dead launcher or a stopped peer ends a worker promptly -------------------------------
PARENT_DIED_EXIT = 75  # exit code of a worker whose launcher (torchrun's agent) died
PEER_SILENT_EXIT = 76  # exit code of a worker whose watched peer stopped sending heartbeats
HEARTBEAT_INTERVAL = 1.0  # seconds between two heartbeats (and two checks of the parent)
DEFAULT_HEARTBEAT_TIMEOUT = 60.0  # seconds of silence after which a peer counts as stopped


def heartbeat_timeout() -> float:
    """DSV3_HEARTBEAT_TIMEOUT (seconds; 0 turns the heartbeat off), default 60."""
    raw = os.environ.get("DSV3_HEARTBEAT_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_HEARTBEAT_TIMEOUT
    except ValueError:
        from dsv3.config import ConfigError

        raise ConfigError(f"DSV3_HEARTBEAT_TIMEOUT: expected seconds, got {raw!r}") from None
    return max(0.0, value)


class Watchdog:
    """A daemon thread that ends this worker when what it depends on is gone:

    - its parent process (the launcher) died: the worker was re-parented, os.getppid() changed;
    - the peer it watches (the next rank, in a ring) stopped beating: each rank increments its
      counter in the process group's store every HEARTBEAT_INTERVAL; a counter that has not moved
      for `timeout` seconds (by this rank's clock) means a stopped (SIGSTOP), frozen or unreachable
      process. A slow step is not silence: the thread beats while the main thread computes, waits
      in a collective or writes a checkpoint.

    The main thread may be blocked inside a collective that cannot be interrupted, so the thread
    prints one line naming the rank and ends the process (os._exit) with PARENT_DIED_EXIT or
    PEER_SILENT_EXIT; the launcher then stops the others. `on_failure(message)` runs first (the test
    launcher forwards the message). A rank that finishes marks itself done, so a finished peer
    never counts as stopped."""

    def __init__(
        self,
        rank: int,
        world: int,
        store: Any | None = None,
        timeout: float | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.rank, self.world = rank, world
        self.timeout = heartbeat_timeout() if timeout is None else timeout
        self.store = store if self.timeout > 0 and world > 1 else None
        self.peer = (rank + 1) % world
        self.parent = os.getppid()
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv3-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.store is not None:  # the first beat before returning: a peer that stops early is seen
            self.store.add(f"beat/{self.rank}", 1)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Mark this rank done (its peers stop watching it) and end the thread."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.store is not None:
            try:
                self.store.set(f"done/{self.rank}", "1")
            except Exception:  # the store may be gone already (the launcher ended first)
                pass

    def _run(self) -> None:
        seen, since = 0, time.monotonic()
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            if os.getppid() != self.parent:
                self._fail(
                    f"rank {self.rank}: the launcher (pid {self.parent}) died; exiting with code "
                    f"{PARENT_DIED_EXIT} instead of training on as an orphan",
                    PARENT_DIED_EXIT,
                )
            if self.store is None:
                continue
            try:
                self.store.add(f"beat/{self.rank}", 1)
                count = self.store.add(f"beat/{self.peer}", 0)  # reads without waiting
                done = self.store.check([f"done/{self.peer}"])
            except (
                Exception
            ):  # a store that is gone or slow: the parent check and the collective timeout remain
                continue
            now = time.monotonic()
            if count != seen or done or count == 0:  # 0: the peer has not started beating yet
                seen, since = count, now
            elif now - since > self.timeout:
                self._fail(
                    f"rank {self.rank}: rank {self.peer} sent no heartbeat for {now - since:.0f} s (stopped, "
                    f"frozen or unreachable; DSV3_HEARTBEAT_TIMEOUT={self.timeout:g}); exiting with code "
                    f"{PEER_SILENT_EXIT} so that the launcher stops the run",
                    PEER_SILENT_EXIT,
                )

    def _fail(self, message: str, code: int) -> None:
        print(f"dsv3: {message}", file=sys.stderr, flush=True)
        if self.on_failure is not None:
            try:
                self.on_failure(message)
            except Exception:
                pass
        os._exit(code)


def start_watchdog(timeout: float | None = None, on_failure: Callable[[str], None] | None = None) -> Watchdog:
    """The watchdog of this rank of the initialised default process group (its store carries the
    heartbeats); without torch.distributed, the parent check alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from torch.distributed.distributed_c10d import _get_default_store

        store = _own_store(_get_default_store())
        return Watchdog(dist.get_rank(), dist.get_world_size(), store, timeout, on_failure).start()
    return Watchdog(0, 1, None, timeout, on_failure).start()


def _own_store(default: Any) -> Any:
    """The heartbeat keys, in the root of the process group's store. A TCPStore gets a connection of
    its own with a short timeout: a client serialises its operations, so sharing the main thread's
    would stall the heartbeat while that thread waits for a key (and a stopped host would block it
    for the whole process-group timeout)."""
    import torch.distributed as dist

    base = default
    while isinstance(base, dist.PrefixStore):
        base = base.underlying_store
    if isinstance(base, dist.TCPStore):
        try:
            base = dist.TCPStore(base.host, base.port, is_master=False, wait_for_workers=False,
                                 timeout=timedelta(seconds=10))  # fmt: skip
        except Exception:  # keep the shared connection
            pass
    return dist.PrefixStore("dsv3/watchdog/", base)


def _report_and_flush(results: Any, rank: int, message: str, t0: float) -> None:
    # called from the watchdog thread just before os._exit: the queue's feeder thread must deliver first
    results.put((rank, False, None, f"Watchdog: {message}", time.perf_counter() - t0))
    results.close()
    results.join_thread()


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
        # every rank finishes connecting before any runs `fn`: a rank whose `fn` exits at once must not
        # close its sockets while a slower peer is still inside gloo's full-mesh connect
        dist.barrier()
        watchdog = start_watchdog(on_failure=lambda message: _report_and_flush(results, rank, message, t0))
        value = fn(rank, world, *args)
        watchdog.stop()
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
