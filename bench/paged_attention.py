"""Batched decode attention over the paged latent cache, per layer: the torch reference of
`GatheredKeys.attend` (index_select every row's keys through the block tables into one buffer, copy
the new rows in, baddbmm + softmax + bmm) against the native one-pass kernel
(csrc/paged_attention.cpp: keys read through the block tables, online softmax) (DESIGN §3.2, §8).

v3-mini's attention geometry by default (8 heads, kv_lora_rank 512, rope 64), rows whose positions
0 .. S-1 are prompt + generated tokens (default 64 + 64: S = 128, every row the same length as in
a batch that started together), blocks of 16 in shuffled (non-consecutive) order. The two sides
alternate within each repeat; medians (best in brackets) in microseconds per layer call, with the
load average before and after, since the machine may be shared.

    python bench/paged_attention.py                       # B 16, 64; T 1; threads 1, 2
    python bench/paged_attention.py --batches 16,64 --T 1,2 --threads 1,2 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dsv3.infer.decode import kernels as cpu_kernels
from dsv3.infer.decode.keys import GatheredKeys


def setup(B: int, T: int, S: int, H: int, R: int, P: int, block: int, native):
    """Two GatheredKeys (torch, native) over one random pool, and a query [B*T, H, R + P]."""
    W, blocks = R + P, -(-S // block)
    data = torch.randn(1, B * blocks * block + 1, W)
    order = torch.randperm(B * blocks).tolist()
    tables = [order[b * blocks : (b + 1) * blocks] for b in range(B)]
    starts = [S - T] * B
    sides = {
        "torch": GatheredKeys(data, tables, starts, T, block, H, R),
        "native": GatheredKeys(data, tables, starts, T, block, H, R, native),
    }
    sides["torch"].new.normal_()
    sides["native"].new.copy_(sides["torch"].new)  # the same new rows on both sides
    q = torch.randn(B * T, H, W) * W**-0.5
    return sides, q


def median_us(keys: GatheredKeys, q: torch.Tensor, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        keys.attend(0, q)
        out.append((time.perf_counter() - t) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--T", default="1", help="new tokens per row (T > 1: speculative verification)")
    ap.add_argument("--S", type=int, default=128, help="key positions per row (prompt + generated)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--rope", type=int, default=64)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    k = cpu_kernels.kernels()
    if not isinstance(k, cpu_kernels.Native):
        raise SystemExit(f"the native kernels do not load here: {cpu_kernels.why_not_native}")
    print(f"# {cpu_kernels.describe_cpu()}")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"# H {args.heads}, R {args.rank}, P {args.rope}, S {args.S}, block {args.block}; us per layer call"
    )
    print("| B | T | threads | torch (gather + bmm) | native (paged, one pass) | speed-up | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for B in map(int, args.batches.split(",")):
            for T in map(int, args.T.split(",")):
                sides, q = setup(B, T, args.S, args.heads, args.rank, args.rope, args.block, k.paged_attend)
                ref, got = sides["torch"].attend(0, q), sides["native"].attend(0, q)
                diff = ((ref - got).abs().max() / ref.abs().max()).item()
                times: dict[str, list[float]] = {s: [] for s in sides}
                for _ in range(3):  # warm-up
                    for s in sides:
                        sides[s].attend(0, q)
                for _ in range(args.repeats):  # alternate the sides
                    for s in sides:
                        times[s] += median_us(sides[s], q, 3)
                med = {s: statistics.median(v) for s, v in times.items()}
                best = {s: min(v) for s, v in times.items()}
                print(
                    f"| {B} | {T} | {threads} | {med['torch']:.0f} ({best['torch']:.0f}) | "
                    f"{med['native']:.0f} ({best['native']:.0f}) | {med['torch'] / med['native']:.2f}x | "
                    f"{diff:.1e} |"
                )
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
