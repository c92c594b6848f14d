"""A/B of an engine setting read when the engine is built (an environment variable such as
DSV3_STRIP_EXPERTS or DSV3_STRIPS): the engine's prefill and decode step times on one checkpoint,
both sides built in ONE process and run alternately (the order flipping every repeat), medians and
the median of the paired ratios. On a noisy 2-core VM separate processes minutes apart differed by
up to 1.5x; alternating in one process is what makes a few-percent change visible.

    python bench/engine_ab.py CKPT --env DSV3_STRIP_EXPERTS=0,1 [--threads 1] [--repeats 7]
        [--prefill 1x64,8x64] [--decode 8,16,32,64] [--out F.json]

Prefill: B random prompts of T tokens added at once, the time until all are prefilled (one step
for B x T <= max_num_batched_tokens). Decode: B 32-token prompts prefilled first, then the median
of 12 decode steps of the batch (greedy, eos ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--env", required=True, help="NAME=A,B: the variable and its two values")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prefill", default="1x64,8x64", help="BxT prompts per measurement, comma-separated")
    ap.add_argument("--decode", default="8,16,32,64", help="batch sizes, comma-separated")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    name, _, values = args.env.partition("=")
    sides = values.split(",")
    if not name or len(sides) != 2:
        sys.exit(f"engine_ab: --env: expected NAME=A,B, got {args.env!r}")
    if not (args.ckpt / "config.json").exists():
        sys.exit(f"engine_ab: CKPT {args.ckpt}: no config.json")

    import torch

    from dsv3.infer.decode.kernels import cpu_flags
    from dsv3.infer.llm import LLM
    from dsv3.infer.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    engines = {}
    old = os.environ.get(name)
    for v in sides:  # the setting is read while the engine (its fast decode path) is built
        os.environ[name] = v
        engines[v] = LLM(str(args.ckpt)).engine
    if old is None:
        os.environ.pop(name)
    else:
        os.environ[name] = old
    g = torch.Generator().manual_seed(0)
    vocab = engines[sides[0]].model.config.vocab_size

    def prompt(n: int) -> list[int]:
        return torch.randint(10, vocab - 10, (n,), generator=g).tolist()

    def prefill(eng, B: int, T: int) -> float:
        for _ in range(B):
            eng.add_request(prompt(T), SamplingParams(max_tokens=1, ignore_eos=True))
        t = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        return time.perf_counter() - t

    def decode(eng, B: int, steps: int = 12) -> float:
        for _ in range(B):
            eng.add_request(prompt(32), SamplingParams(max_tokens=steps + 3, ignore_eos=True))
        while eng.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in eng.scheduler.running):
            eng.step()
        ts = []
        while eng.has_unfinished():
            t = time.perf_counter()
            eng.step()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts[1:-1])

    cases = [
        (f"prefill {bt}", prefill, tuple(int(v) for v in bt.split("x")))
        for bt in args.prefill.split(",")
        if bt
    ]
    cases += [(f"decode batch {b}", decode, (int(b),)) for b in args.decode.split(",") if b]
    flags = " ".join(cpu_flags())
    print(f"CPU flags: {flags}; {args.threads} thread(s); {args.ckpt}; {name} = {sides[0]} vs {sides[1]}")
    print(
        f"{'case':<20} {sides[0]:>10} {sides[1]:>10} {'ratio':>7} {'paired':>7}  (ms, medians of {args.repeats}; ratio: time at {sides[0]} / time at {sides[1]})"
    )
    rows = []
    for label, f, shape in cases:
        times: dict[str, list[float]] = {v: [] for v in sides}
        for v in sides:
            f(engines[v], *shape)  # warm: packed copies, kernels for these row counts
        for r in range(args.repeats):
            for v in sides if r % 2 == 0 else sides[::-1]:
                times[v].append(f(engines[v], *shape) * 1e3)
        a, b = (statistics.median(times[v]) for v in sides)
        paired = statistics.median(x / y for x, y in zip(times[sides[0]], times[sides[1]]))
        print(f"{label:<20} {a:>10.1f} {b:>10.1f} {a / b:>6.2f}x {paired:>6.2f}x", flush=True)
        rows.append(
            {"case": label, sides[0]: times[sides[0]], sides[1]: times[sides[1]], "paired_ratio": paired}
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"cpu_flags": flags, "threads": args.threads, "env": name, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
