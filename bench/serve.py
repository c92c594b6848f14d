"""Serving throughput and latency of OpenAI-compatible servers side by side (docs/serving.md).

Each side is a running server (dsv3 serve, vLLM, SGLang...) named NAME=BASE_URL; the same client
(`dsv3 bench serve`, dsv3.serve.bench) sends the same random prompts to each at every concurrency,
the sides alternating within each repeat (the machine's load drifts; alternating spreads it over
both). Reported per side and concurrency: output tokens/s, median TTFT and TPOT (medians over the
repeats), as a Markdown table; --out writes every run's summary as JSON.

    dsv3 serve CKPT --port 8000 &                    # and e.g. vLLM on :8001 (its own venv)
    python bench/serve.py --side dsv3=http://127.0.0.1:8000 --side vllm=http://127.0.0.1:8001 \\
        --concurrency 1 8 32 --num-prompts 64 --input-len 128 --output-len 64 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
from pathlib import Path

from dsv3.serve.bench import build_parser, check_args, run


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The client options shared with bench/serve_vs_vllm.py."""
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompts-per-concurrency", type=int, default=0,
                   help="send max(--num-prompts, this x concurrency) prompts at each concurrency")  # fmt: skip
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=0, help="shared prompt prefix (prefix caching)")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default=None, help="JSON file of every run's summary")


def compare(sides: dict[str, str], a: argparse.Namespace, note=lambda: "", turn=None) -> list[dict]:
    """Every side at every concurrency, alternating within each repeat; prints the table and returns
    every run's summary. note(): text appended to each progress line (e.g. the load average).
    turn(name): a context manager around each run of side `name` whose yielded dict, filled by its
    exit, joins the run's summary (bench/serve_vs_vllm.py: the other server stopped, and the CPU
    seconds it used meanwhile, bench/quiet.py)."""
    turn = turn or (lambda name: contextlib.nullcontext({}))
    runs: list[dict] = []
    for c in a.concurrency:
        n = max(a.num_prompts, a.prompts_per_concurrency * c)
        for rep in range(a.repeats):
            for name, url in sides.items():
                argv = ["--base-url", url, "--num-prompts", str(n), "--max-concurrency", str(c),
                        "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
                        "--random-prefix-len", str(a.prefix_len), "--vocab-size", str(a.vocab_size),
                        "--seed", str(rep), "--no-progress"]  # fmt: skip
                if a.api_key:
                    argv += ["--api-key", a.api_key]
                args = build_parser().parse_args(argv)
                check_args(args)
                with turn(name) as t:
                    s = asyncio.run(run(args))
                s.pop("requests")
                runs.append({"side": name, "concurrency": c, "repeat": rep, "note": note(), **s, **t})
                idle = "".join(f", {o} used {v:.2f} CPU s" for o, v in t.get("idle_cpu_s", {}).items())
                print(f"{name} c={c} rep={rep}: {s['output_throughput']:.1f} tok/s, "
                      f"TTFT {s['ttft']['median_ms']:.1f} ms, TPOT {s['tpot']['median_ms']:.1f} ms, "
                      f"{s['failed']} failed{idle} {note()}", flush=True)  # fmt: skip
    names = list(sides)
    ratio_head = "".join(f" {names[0]} / {o} tok/s |" for o in names[1:])
    print(f"\n| side | concurrency | output tok/s | TTFT median (ms) | TPOT median (ms) |{ratio_head}")
    print("|---|---:|---:|---:|---:|" + "---:|" * (len(names) - 1))
    for c in a.concurrency:
        med = {}
        for name in names:
            mine = [r for r in runs if r["side"] == name and r["concurrency"] == c]
            med[name] = [statistics.median(r[k] for r in mine) for k in ("output_throughput",)] + [
                statistics.median(r[k]["median_ms"] for r in mine) for k in ("ttft", "tpot")
            ]
        for name in names:
            tps, ttft, tpot = med[name]
            ratios = "".join(
                f" {med[names[0]][0] / med[o][0]:.2f}x |" if name == names[0] else " |" for o in names[1:]
            )
            print(f"| {name} | {c} | {tps:.1f} | {ttft:.1f} | {tpot:.1f} |{ratios}")
    if a.out:
        Path(a.out).write_text(json.dumps(runs, indent=2))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", action="append", required=True, help="NAME=BASE_URL (repeatable)")
    add_load_arguments(p)
    a = p.parse_args()
    compare(dict(s.split("=", 1) for s in a.side), a)


if __name__ == "__main__":
    main()
