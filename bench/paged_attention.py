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
    python bench/paged_attention.py --decode CKPT         # whole batched decode, before / after

`--decode CKPT` times the engine's decode steps on a checkpoint (bench/decode.py's `decode_rate`:
output tokens/s of the runner's decode forward and head, prefill and sampling excluded), 64-token
random prompts and 64 new tokens at each batch, "before" (the torch attention: GatheredKeys given
no native attend) and "after" (the native one) alternating within each repeat; the greedy tokens
of the two are compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from dsv3.infer.decode import kernels as cpu_kernels
from dsv3.infer.decode import step as decode_step
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


class TorchAttend(GatheredKeys):
    """GatheredKeys on the torch reference whatever the decoder passes ("before")."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args[:7])


def whole_decode(args) -> None:
    """Batched decode tok/s on a checkpoint, torch vs native attention, alternating."""
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).parent / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from dsv3.infer.llm import LLM

    llm = LLM(args.decode, max_num_seqs=64, max_num_batched_tokens=8192)
    spent = bench.time_calls(llm.engine.runner, ["decode_logits"])["decode_logits"]
    vocab = llm.model.config.vocab_size
    print(
        f"# {args.decode}: {args.prompt_len}-token prompts, {args.new} new tokens, greedy; decode steps only"
    )
    print(f"# medians of {args.repeats} (best); load average at the start of each row and after it")
    print(
        "| batch | threads | before tok/s (torch attention) | after tok/s (native) | speed-up | same tokens | load |"
    )
    print("|---|---|---|---|---|---|---|")
    sides = {"before": TorchAttend, "after": GatheredKeys}
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for B in map(int, args.batches.split(",")):
            prompts = torch.randint(
                0, vocab, (B, args.prompt_len), generator=torch.Generator().manual_seed(B)
            )
            prompts = prompts.tolist()
            load = os.getloadavg()[0]
            rates: dict[str, list[float]] = {s: [] for s in sides}
            outs: dict[str, list] = {}
            bench.time_dsv3(llm, prompts, 2)  # warm-up
            for _ in range(args.repeats):
                for side, cls in sides.items():
                    decode_step.GatheredKeys = cls
                    try:
                        rate, outs[side] = bench.decode_rate(llm, spent, prompts, args.new)
                    finally:
                        decode_step.GatheredKeys = GatheredKeys
                    rates[side].append(rate)
            med = {s: statistics.median(r) for s, r in rates.items()}
            same = "yes" if outs["before"] == outs["after"] else "NO"
            print(
                f"| {B} | {threads} | {med['before']:.1f} ({max(rates['before']):.1f}) | "
                f"{med['after']:.1f} ({max(rates['after']):.1f}) | {med['after'] / med['before']:.2f}x | {same} | "
                f"{load:.1f}-{os.getloadavg()[0]:.1f} |",
                flush=True,
            )


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
    ap.add_argument("--decode", metavar="CKPT", help="time whole batched decode steps on this checkpoint")
    ap.add_argument("--prompt-len", type=int, default=64, help="--decode: prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="--decode: new tokens per row")
    args = ap.parse_args()
    k = cpu_kernels.kernels()
    if not isinstance(k, cpu_kernels.Native):
        raise SystemExit(f"the native kernels do not load here: {cpu_kernels.why_not_native}")
    print(f"# {cpu_kernels.describe_cpu()}")
    if args.decode:
        return whole_decode(args)
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
