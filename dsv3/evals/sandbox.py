"""Run untrusted generated code: a child Python process in a fresh temporary directory, with a wall
clock, CPU-time, address-space and file-size limit (resource.setrlimit), its own session (so the
whole process group is killed on timeout), an empty environment and `python -I` (no user site, no
PYTHON* variables). The directory is the child's cwd, HOME and TMPDIR, and is deleted afterwards.

This bounds accidents (infinite loops, memory hogs, stray files), not a determined attacker: the
child still runs as this user and can reach absolute paths. Use a container for hostile code.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT = 4096  # characters of stdout/stderr kept in a result
FILE_LIMIT = 16 * 2**20  # bytes any file the program writes may reach


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed", "failed", "timeout" or "memory"
    returncode: int | None
    stderr: str
    seconds: float


def _limits(memory_bytes: int, cpu_seconds: int) -> None:
    # runs in the child between fork and exec: only async-signal-safe work
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(source: str, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run `source` as a Python program; passed iff it exits with status 0 within the limits."""
    import time

    with tempfile.TemporaryDirectory(prefix="dsv3-sandbox-") as tmp:
        (Path(tmp) / "program.py").write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        cpu = max(1, math.ceil(timeout_s))
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", "program.py"],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=lambda: _limits(memory_mb * 2**20, cpu),
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            _, err = proc.communicate()
            timed_out = True
        _kill_group(proc.pid)  # children it left behind
        seconds = time.perf_counter() - t0
    stderr = err.decode("utf-8", "replace")[-OUTPUT_LIMIT:]
    rc = proc.returncode
    if timed_out or rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
        status = "timeout"
    elif "MemoryError" in stderr or rc == -signal.SIGSEGV:
        status = "memory"
    else:
        status = "passed" if rc == 0 else "failed"
    return SandboxResult(status == "passed", status, rc, stderr, seconds)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
