"""Keep the engines that are not being timed quiet, and prove it: the /proc helpers shared by
bench/vs_engines.py and bench/serve_vs_vllm.py (issues 15 and 16, docs/benchmarks.md).

A side-by-side benchmark keeps every engine's process alive across turns. An idle engine need not be
idle on the CPU: vLLM's CPU worker spins its OpenMP threads between requests (68-76% of a core
sampled with `top`), which on a 2-core machine takes a core from the side being timed. So each
turn (`turn`) stops the process trees of the other sides (SIGSTOP, `paused`), resumes them after
(SIGCONT, also when the body raises or is interrupted), and reads the CPU seconds those other sides
used during the turn (utime + stime of /proc/PID/stat, every thread of every process), which the
benchmarks record per row and warn about above a share of the turn's wall time. Linux only; the
standard library only (bench/vs_vllm_worker.py's venv and dsv3's share nothing else).

    with quiet.turn("dsv3", {"vLLM": quiet.tree(worker.pid)}, pause={"vLLM"}) as t:
        run_dsv3()
    t["idle_cpu_s"]  # {"vLLM": 0.0}; t["wall_s"]
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after `(comm)` (field 3 onwards), None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()  # comm may hold spaces and ')'


def tree(root: int) -> list[int]:
    """root and every process descended from it (parent links of /proc/*/stat), root first; [] if
    root is gone."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            parents.setdefault(int(st[1]), []).append(int(d.name))
    if _stat(root) is None:
        return []
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """{pid: user + system CPU seconds so far} of the processes still alive (all their threads)."""
    out = {}
    for pid in pids:
        if (st := _stat(pid)) is not None:
            out[pid] = (int(st[11]) + int(st[12])) / _TICK  # utime, stime: fields 14 and 15
    return out


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _running_threads(pids: Iterable[int]) -> int:
    """How many threads of these processes are not stopped (state other than T, t, zombie, dead)."""
    n = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for task in tasks:
            try:
                text = task.joinpath("stat").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            n += text[text.rindex(")") + 2] not in "TtZXx"
    return n


@contextmanager
def paused(roots: Iterable[int], settle: float = 2.0) -> Iterator[list[int]]:
    """Stops the process tree of every root (SIGSTOP, parents first, walked again until no new
    process appears) for the body and continues them after, whatever the body does; yields the
    stopped pids. SIGSTOP takes effect when a thread is next scheduled, so the body starts only once
    every thread reads as stopped (or after `settle` seconds: the CPU accounting of `turn` shows it)."""
    stopped: list[int] = []
    try:
        for root in roots:
            while new := [pid for pid in tree(root) if pid not in stopped]:  # again: one may have forked
                _signal(new, signal.SIGSTOP)
                stopped.extend(new)
        end = time.monotonic() + settle
        while _running_threads(stopped) and time.monotonic() < end:
            time.sleep(0.001)
        yield stopped
    finally:
        _signal(reversed(stopped), signal.SIGCONT)


def resume(root: int) -> None:
    """SIGCONT to root's whole tree: before terminating a tree that may have been left stopped."""
    _signal(tree(root), signal.SIGCONT)


@contextmanager
def turn(
    timed: str,
    others: dict[str, list[int]],
    pause: Iterable[str] = (),
    warn_share: float = 0.05,
    warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> Iterator[dict]:
    """One timed turn of side `timed`: stops the trees rooted at others[name][0] for the names in
    `pause`, and measures the CPU seconds of all the `others` pids (name -> pids, e.g. tree(pid) or
    [os.getpid()]) over the body. Yields a dict filled on a normal exit with "wall_s",
    "idle_cpu_s" {name: seconds} and "stopped" (how many processes were); warns when their sum
    exceeds warn_share of the wall time."""
    pause = set(pause)
    unknown = pause - set(others)
    if unknown:
        raise ValueError(f"pause: {sorted(unknown)} not among the other sides {sorted(others)}")
    result: dict = {}
    with paused([others[n][0] for n in pause if others[n]]) as stopped:
        before = {n: cpu_seconds(p) for n, p in others.items()}
        t = time.perf_counter()
        yield result
        wall = time.perf_counter() - t
        after = {n: cpu_seconds(p) for n, p in others.items()}
    idle = {n: sum(after[n][pid] - s for pid, s in before[n].items() if pid in after[n]) for n in others}
    result.update(wall_s=wall, idle_cpu_s=idle, stopped=len(stopped))
    if wall > 0 and sum(idle.values()) > warn_share * wall:
        warn(f"WARNING: while {timed} was timed ({wall:.2f} s), the other sides used "
             + ", ".join(f"{n} {s:.2f}" for n, s in idle.items())
             + f" CPU s (> {warn_share:.0%} of the wall time): its figure is contended")  # fmt: skip
