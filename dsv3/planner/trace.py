"""GPU kernel time by kind in a PyTorch-profiler trace, to set beside the cost model.

DeepSeek published profiler traces of their training and inference framework
(github.com/deepseek-ai/profile-data). Its `train.json` is one DualPipe pair of a forward and a
backward chunk of 4 MoE layers each, EP64, TP1, 4K-token sequences, on H800s, with the expert
routing forced to an even balance. `summarise` sorts every GPU kernel of such a trace into GEMMs,
attention cores, communication and the rest (element-wise passes, FP8 casts, norms, routing), and
measures each kind's busy time (kernels that overlap in time counted once) and the trace's span.
`bench/planner_trace.py` puts the cost model's prediction of the same chunk pair beside it.

The trace format is Chrome's (`{"traceEvents": [...]}`, optionally gzipped), as
`torch.profiler.profile(...).export_chrome_trace` writes it: GPU work is the events of category
"kernel", "gpu_memcpy" and "gpu_memset", each with a start `ts` and a `dur` in microseconds and its
CUDA stream as `tid`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dsv3.config import ConfigError

KINDS = ("gemm", "attention", "communication", "other")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# by name, first match wins: DeepEP's kernels live in `...::ep::internode::` / `intranode::`
_PATTERNS = (
    ("communication", ("nccl", "::ep::", "deep_ep", "internode::", "intranode::", "alltoall", "all_to_all")),
    ("attention", ("flash", "fmha", "attn_fwd", "attn_bwd")),
    ("gemm", ("gemm", "xmma", "cublas", "matmul")),
)


@dataclass(frozen=True)
class Kernel:
    name: str
    stream: int
    start_us: float
    dur_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us


def kind(name: str) -> str:
    """The kind of a GPU kernel, from its name (one of `KINDS`)."""
    low = name.lower()
    for k, pats in _PATTERNS:
        if any(p in low for p in pats):
            return k
    return "other"


def load_kernels(path: str | Path) -> list[Kernel]:
    """The GPU events of a Chrome-format profiler trace (.json or .json.gz), by start time."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such trace file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: not a JSON trace ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ConfigError(f"{path}: no 'traceEvents' list (expected a Chrome trace)")
    out = [
        Kernel(str(e.get("name", "")), int(e.get("tid", 0)), float(e["ts"]), float(e["dur"]))
        for e in events
        if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES and "dur" in e
    ]
    if not out:
        raise ConfigError(f"{path}: no GPU kernels (events of category {', '.join(GPU_CATEGORIES)})")
    return sorted(out, key=lambda k: k.start_us)


def busy_us(kernels: Iterable[Kernel]) -> float:
    """Microseconds in which at least one of `kernels` runs (the length of their union)."""
    total, cur_start, cur_end = 0.0, None, None
    for k in sorted(kernels, key=lambda k: k.start_us):
        if cur_end is None or k.start_us > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = k.start_us, k.end_us
        else:
            cur_end = max(cur_end, k.end_us)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


@dataclass(frozen=True)
class TraceSummary:
    kernel_us: dict[str, float]  # sum of kernel durations, by kind
    busy_kind_us: dict[str, float]  # union of each kind's kernels
    compute_busy_us: float  # union of every kernel that is not communication
    span_us: float  # first kernel start to last kernel end
    count: dict[str, int]
    streams: dict[int, float]  # kernel time per CUDA stream

    @property
    def comm_busy_us(self) -> float:
        return self.busy_kind_us["communication"]

    @property
    def exposed_comm_us(self) -> float:
        """Span time in which only communication runs: what overlap failed to hide."""
        return self.span_us - self.compute_busy_us


def summarise(kernels: list[Kernel]) -> TraceSummary:
    by: dict[str, list[Kernel]] = {k: [] for k in KINDS}
    streams: dict[int, float] = {}
    for k in kernels:
        by[kind(k.name)].append(k)
        streams[k.stream] = streams.get(k.stream, 0.0) + k.dur_us
    compute = [k for kk in KINDS if kk != "communication" for k in by[kk]]
    return TraceSummary(
        kernel_us={k: sum(x.dur_us for x in v) for k, v in by.items()},
        busy_kind_us={k: busy_us(v) for k, v in by.items()},
        compute_busy_us=busy_us(compute),
        span_us=max(k.end_us for k in kernels) - min(k.start_us for k in kernels),
        count={k: len(v) for k, v in by.items()},
        streams=dict(sorted(streams.items())),
    )
