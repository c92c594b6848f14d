"""Torch thread settings shared by every command: `--threads N` and the oversubscription warning.

OpenMP threads spin-wait on each other; when other busy processes hold the cores, a run with as many
threads as cores can be many times slower than with one (measured: a training step 1.9 s -> 24 s on
2 cores next to another run; 500 prompts 13-58 s with default threads, 1.35 s with one thread).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def positive_threads(text: str) -> int:
    """argparse type of --threads: a positive integer (0 is rejected: omit the option for all cores)."""
    from dsv3.cli import positive_int

    if text.strip() == "0":
        raise argparse.ArgumentTypeError("must be >= 1, got 0 (omit --threads to use every core)")
    return positive_int(text)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=positive_threads, help="torch threads (default: all cores; 1 on a busy machine)"
    )


def oversubscription_warning(threads: int, load: float, cpus: int) -> str | None:
    """A warning when `threads` intra-op threads would share the cores with other busy processes
    (1-minute load average `load` on `cpus` cores): OpenMP threads then spin-wait on each other and a
    step can run 10x slower."""
    if threads <= 1 or load + threads <= cpus + 0.5:
        return None
    return (
        f"load average {load:.1f} on {cpus} cores: {threads} torch threads will compete with other "
        f"busy processes and may run many times slower; consider --threads {max(1, cpus - round(load))} "
        f"(or OMP_NUM_THREADS)"
    )


def configure_threads(prog: str, threads: int | None) -> None:
    """Use `threads` torch threads; without it, warn (on stderr) when the default would oversubscribe
    a busy machine. Under torchrun (WORLD_SIZE > 1) the ranks share the machine by design: no warning."""
    if threads:
        torch.set_num_threads(threads)
        return
    if hasattr(os, "getloadavg") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        warning = oversubscription_warning(torch.get_num_threads(), os.getloadavg()[0], os.cpu_count() or 1)
        if warning:
            print(f"{prog}: warning: {warning}", file=sys.stderr)
