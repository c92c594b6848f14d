"""`dsv3 demo` (what `make demo` runs): train the `small` DeepSeek-V3-architecture model on the bundled
corpus on this CPU, evaluate it, plot the run, and show what it learned: a text sample and a FIM
completion of a Python function body.

Everything is real: a 14M-parameter V3 model (MLA, 16+1 experts with auxiliary-loss-free balancing,
one MTP module), the V3 recipe scaled down, the Python standard library and Shakespeare as data.
A finished run in the same directory is reused (delete it to retrain); an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from dsv3.cli import positive_int
from dsv3.threads import add_threads_argument, configure_threads
from dsv3.train.config import TrainConfig

FIM_PREFIX = 'def is_palindrome(text):\n    """Return True if text reads the same backwards."""\n'
FIM_SUFFIX = "\n\n\nprint(is_palindrome('level'))\n"
PROMPTS = ["ROMEO:\n", "def read_config(path):\n"]


def demo_config(out: str, steps: int) -> TrainConfig:
    """The V3 recipe scaled to a few minutes on 2 CPU cores (see docs/training.md for the numbers)."""
    return TrainConfig(
        preset="small", steps=steps, out=out, seq_len=256, micro_batch=8, batch_start=8, batch_end=8,
        lr=2e-3, warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 4), eval_batches=16,
        ckpt_every=max(1, steps // 2), keep_last=1, precision="auto",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--steps", type=positive_int, default=500, help="optimizer steps (8 x 256 tokens each)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    configure_threads("dsv3 demo", args.threads)
    from dsv3.data.metrics import unigram_entropy
    from dsv3.train.loop import Trainer
    from dsv3.train.plot import plot_run

    t_start = time.perf_counter()
    cfg = demo_config(args.out, args.steps)
    print(f"dsv3 demo: training the `small` preset for {cfg.steps} steps of {cfg.micro_batch} x "
          f"{cfg.seq_len} tokens on the bundled corpus (Python stdlib + Shakespeare)")  # fmt: skip
    print(f"run directory: {cfg.out}")
    trainer = Trainer(cfg, resume=True)
    counts = trainer.model_cfg.param_counts()
    print(f"model: {counts['total'] / 1e6:.1f}M parameters ({counts['activated'] / 1e6:.1f}M activated "
          f"per token) + {counts['mtp'] / 1e6:.1f}M MTP; "
          f"precision {trainer.precision} ({trainer.precision_reason})")  # fmt: skip
    if trainer.resumed_from is not None:
        print(f"continuing from {trainer.resumed_from} (step {trainer.step}); delete {cfg.out} to start over")
    result = trainer.fit() if trainer.step < cfg.steps else trainer.evaluate()

    data = trainer.data
    vocab = data.tokenizer.vocab_size
    unigram = unigram_entropy(np.asarray(data.train.tokens), np.asarray(data.val.tokens), vocab)
    print("\nvalidation (held-out documents):")
    print(f"  loss              {result['val_loss']:.3f} nats/token  (MTP: {result['val_mtp_loss']:.3f})")
    print(f"  unigram baseline  {unigram:.3f} nats/token  (uniform: {math.log(vocab):.3f})")
    print(f"  bits per byte     {result['bits_per_byte']:.3f}")
    print(f"  MaxVio_global     {result['maxvio_global']:.3f}  (0 = every expert equally loaded)")
    plots = plot_run(cfg.out)
    print(f"plots: {', '.join(str(p) for p in plots)}")

    ckpt = sorted((Path(cfg.out) / "checkpoints").glob("step_*"))[-1]
    from dsv3.infer import LLM, SamplingParams

    llm = LLM(ckpt)
    bos = [llm.tokenizer.bos_id]
    sample = SamplingParams(temperature=0.8, top_k=40, max_tokens=80, seed=0)
    print(f"\nsamples from {ckpt} (temperature 0.8, top-k 40):")
    outs = llm.generate([bos + llm.tokenizer.encode(t) for t in PROMPTS], sample)
    for prompt, out in zip(PROMPTS, outs):
        print("-" * 72 + "\n" + prompt + out.text)
    middle = llm.complete(FIM_PREFIX, FIM_SUFFIX, SamplingParams(temperature=0.0, max_tokens=48))
    print("-" * 72 + "\nfill-in-the-middle (greedy): prefix, [generated middle], suffix")
    print(FIM_PREFIX + "[" + middle + "]" + FIM_SUFFIX + "-" * 72)
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    print(serve_hint(ckpt))
    return 0


def serve_hint(ckpt: Path, port: int = 8000) -> str:
    """The lines that tell how to serve the trained checkpoint and query it (docs/serving.md)."""
    return (
        f"\nserve it (OpenAI-compatible API, docs/serving.md):\n"
        f"  dsv3 serve {ckpt} --port {port} --served-model-name demo\n"
        f"  curl -s http://127.0.0.1:{port}/v1/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "demo", "prompt": "def main():", "max_tokens": 32, "temperature": 0}}\''
    )
