"""The one-row decoder with and without its streamed weights (csrc/streamed.h), in one process:
two `LLM`s on the same checkpoint, one whose `RowDecoder` was built with `stream=True` and one
without, alternating (the order flipping every repeat), batch-1 greedy decode tok/s = B * (N - 1) /
(t(N new tokens) - t(1 new token)), medians, and whether the greedy tokens agree (docs/inference.md).

    python bench/row_stream.py CKPT [--threads 1] [--batch 1] [--new 64] [--repeats 6]

CKPT: a Hugging Face checkpoint directory (bench/vs_engines.py leaves random `v3-mini` ones in
its --work directory). Needs the native kernels (AVX2; the AVX-512F loops where the CPU has it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args(argv)

    import torch

    from dsv3.infer.decode.kernels import cpu_flags, kernels
    from dsv3.infer.llm import LLM
    from dsv3.infer.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    native = kernels()
    if native.name != "native":
        sys.exit(f"row_stream: needs the native kernels (CPU flags: {' '.join(cpu_flags())})")
    prompts = [[(100 + b + i) % 1000 for i in range(args.prompt_len)] for b in range(args.batch)]

    def run(llm, n: int):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        return time.perf_counter() - t, [o.token_ids for o in outs]

    sides, default = {}, native.stream
    for name, stream in (("streamed", True), ("row-major", False)):
        native.stream = stream  # read when the engine builds its RowDecoder, on its first step
        sides[name] = LLM(args.ckpt, verify=False, max_num_seqs=max(4, args.batch))
        run(sides[name], 4)
    native.stream = default
    rates: dict[str, list[float]] = {k: [] for k in sides}
    tokens = {}
    for r in range(args.repeats):
        for name in sides if r % 2 == 0 else reversed(list(sides)):
            t1, _ = run(sides[name], 1)
            tn, tokens[name] = run(sides[name], args.new)
            rates[name].append(args.batch * (args.new - 1) / (tn - t1))
    print(
        f"CPU flags: {' '.join(cpu_flags())}; {args.threads} thread(s), batch {args.batch}, {args.new} new tokens"
    )
    for name, v in rates.items():
        print(f"{name:>10}: median {statistics.median(v):7.1f} tok/s  ({', '.join(f'{x:.0f}' for x in v)})")
    ratio = statistics.median(rates["streamed"]) / statistics.median(rates["row-major"])
    print(
        f"streamed / row-major: {ratio:.2f}x; same greedy tokens: {tokens['streamed'] == tokens['row-major']}"
    )


if __name__ == "__main__":
    main()
