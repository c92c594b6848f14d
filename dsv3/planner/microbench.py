"""The measurements `dsv3 plan calibrate` builds its profile from: timing helpers (fastest of the
repeats, interleaved rounds), the GEMM rate on a model's own shapes, copy bandwidth and the gloo
all-to-all's bandwidth and latency."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import torch

from dsv3.config import ModelConfig

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
"""`wall`: elapsed time; `cpu`: the calling thread's CPU time, which a shared machine's other
processes do not inflate (single-threaded runs only: it misses waits on another rank)."""


def best_time(fn, repeats: int, warmup: int = 1, clock=time.perf_counter) -> float:
    """The fastest of `repeats` timed calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)


# ---- micro-benchmarks --------------------------------------------------------------------------------
def measure_model_gemms(cfg: ModelConfig, tokens: int, repeats: int = 5, clock=time.perf_counter) -> float:
    """FP32 FLOP/s over the GEMMs of one training step of `cfg` at `tokens` tokens: every weight
    matrix's forward product [m, k] x [k, n] and its two backward ones (input and weight gradient),
    m = tokens, or tokens x K / E for a routed expert's; each timed alone, rate = their FLOPs over
    their summed times. A small model's GEMMs (k = 256, the head's n = 8192) run well below a square
    GEMM's rate (here 55-90 against 95 GFLOP/s), and the cost model has one rate for all."""
    from dsv3.model.transformer import Transformer

    with torch.device("meta"):  # the shapes only
        model = Transformer(cfg)
    counts: Counter[tuple[int, int, int]] = Counter()  # (m, k, n) -> GEMMs of that shape
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name:
            continue
        if p.dim() == 3:  # a routed expert stack [E, in, out]
            m = max(1, round(tokens * cfg.n_activated_experts / p.shape[0]))
            counts[(m, p.shape[1], p.shape[2])] += p.shape[0]
        else:  # nn.Linear [out, in]
            counts[(tokens, p.shape[1], p.shape[0])] += 1
    flops = seconds = 0.0
    for (m, k, n), count in counts.items():
        x, w, g = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
        for a, b in ((x, w), (g, w.t()), (x.t(), g)):  # forward, input gradient, weight gradient
            seconds += count * best_time(lambda a=a, b=b: a @ b, repeats, clock=clock)
            flops += count * 2.0 * m * k * n
    return flops / seconds


def measure_copy(mb: int = 64, repeats: int = 5, clock=time.perf_counter) -> float:
    """Bytes/s moved by a copy (read + write) of `mb` MB."""
    x, y = torch.empty(mb * 2**18), torch.randn(mb * 2**18)
    return 2 * x.numel() * 4 / best_time(lambda: x.copy_(y), repeats, clock=clock)


def _gloo_worker(rank: int, world: int, sizes: tuple[int, int], repeats: int) -> list[float]:
    import torch.distributed as dist

    out = []
    for n in sizes:
        x, y = torch.randn(world * n), torch.empty(world * n)

        def run(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            dist.all_to_all_single(y, x)

        dist.barrier()
        out.append(best_time(run, repeats))
    return out


def measure_gloo(repeats: int = 5) -> tuple[float, float]:
    """(bytes/s, seconds per exchange) of a 2-rank all_to_all_single, from a small and a large one."""
    from dsv3.parallel.launch import run_ranks

    small, large = 16, 1 << 18  # FP32 values per peer
    times = max(run_ranks(_gloo_worker, 2, (small, large), repeats, timeout=60, deadline=120))
    # bytes sent to the peer over the extra time of the large exchange (at least a tenth of its
    # time: on a noisy machine the difference can vanish)
    bandwidth = (large - small) * 4 / max(times[1] - times[0], 0.1 * times[1])
    return bandwidth, max(times[0], 1e-6)


def measure_rounds(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each run's fastest time over `rounds` rounds that take every run once, in turn: a slow spell
    of a shared machine then falls on one round of every run instead of on all of one run."""
    best: dict[str, float] = {}
    for _ in range(max(1, rounds)):
        for name, run in runs.items():
            best[name] = min(run(), best.get(name, float("inf")))
    return best
