"""`dsv3 generate`, `dsv3 chat` and `dsv3 complete`: thin command lines over `dsv3.infer.LLM`.

dsv3 generate --ckpt DIR --prompt "def fib(n):" [--max-tokens 64 --temperature 0 --speculative]
dsv3 generate --ckpt DIR --input-file prompts.txt        # one prompt a line, batched together
dsv3 generate --ckpt DIR --ids 0,17,42                    # token ids (checkpoints without tokenizer)
dsv3 chat --ckpt DIR                                      # /exit quits, /clear forgets the conversation
dsv3 complete --ckpt DIR --prefix "def add(a, b):\\n    return " --suffix "\\n"
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _common(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and cache (default fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--num-speculative-tokens", type=int, default=1)
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="MTP drafts only among token ids below this (faster drafts; output unchanged)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start)")
    p.add_argument("--fp8-weights", action="store_true", help="keep an FP8 checkpoint's projections in FP8")
    p.add_argument("--weight-dtype", choices=["fp32", "bf16"], default=None,
                   help="decode weights of the fast path (feed-forward, head); default: bf16 for a BF16 "
                   "checkpoint, else the model's dtype")  # fmt: skip
    p.add_argument("--stats", action="store_true", help="print throughput and speculative acceptance")


def _llm(args: argparse.Namespace):
    from dsv3.infer.llm import LLM

    return LLM(
        args.ckpt,
        dtype=DTYPES[args.dtype],
        device=args.device,
        speculative=args.speculative,
        num_speculative_tokens=args.num_speculative_tokens,
        draft_vocab=args.draft_vocab,
        compile=args.compile,
        fp8_weights=args.fp8_weights,
        **({} if args.weight_dtype is None else {"weight_dtype": DTYPES[args.weight_dtype]}),
    )


def _params(args: argparse.Namespace):
    from dsv3.infer.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _report(llm, n_tokens: int, seconds: float, out: TextIO) -> None:
    print(f"[{n_tokens} tokens in {seconds:.2f}s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s]", file=out)
    if llm.engine.k:
        print(f"[speculative: {llm.spec_stats.summary()}]", file=out)


def generate_main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    p = argparse.ArgumentParser(prog="dsv3 generate", description="Generate continuations of prompts.")
    _common(p, max_tokens=64, temperature=0.0)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--input-file", help="a file with one prompt a line")
    src.add_argument("--ids", help="prompt token ids, comma separated")
    args = p.parse_args(argv)
    llm = _llm(args)
    if args.ids is not None:
        prompts: list = [[int(t) for t in args.ids.replace(",", " ").split()]]
    elif args.input_file is not None:
        with open(args.input_file) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = [args.prompt]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, _params(args))
    dt = time.perf_counter() - t0
    for prompt, o in zip(prompts, outs):
        body = o.text if o.text is not None else " ".join(map(str, o.token_ids))
        head = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        print(f"{head}{body}" if isinstance(prompt, str) else f"{head} -> {body}", file=out)
        if len(prompts) > 1:
            print("-" * 40, file=out)
    if args.stats:
        _report(llm, sum(len(o.token_ids) for o in outs), dt, out)
    return 0


def chat_main(argv: list[str] | None = None, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    p = argparse.ArgumentParser(prog="dsv3 chat", description="Chat interactively (/exit, /clear).")
    _common(p, max_tokens=256, temperature=0.7)
    p.add_argument("--system", default="", help="system prompt")
    args = p.parse_args(argv)
    llm = _llm(args)
    if llm.tokenizer is None:
        print("chat: the checkpoint has no tokenizer.json", file=sys.stderr)
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print("dsv3 chat: /exit to quit, /clear to start over", file=out)
    while True:
        print(">>> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/clear":
            history = []
            print("(conversation cleared)", file=out)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        shown = [0]

        def stream(
            o, shown=shown
        ) -> None:  # print the text as it grows (decoded from all tokens: UTF-8 safe)
            text = llm.tokenizer.decode([t for t in o.token_ids if t != llm.tokenizer.eos_id])
            if o.finished and o.text is not None:
                text = o.text
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text[shown[0] :], end="", file=out, flush=True)
                shown[0] = len(text)

        t0 = time.perf_counter()
        o = llm.chat(system + history, _params(args), on_update=stream)
        print(file=out)
        history.append({"role": "assistant", "content": o.text or ""})
        if args.stats:
            _report(llm, len(o.token_ids), time.perf_counter() - t0, out)


def complete_main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    p = argparse.ArgumentParser(
        prog="dsv3 complete", description="Fill in the middle of a prefix and a suffix."
    )
    _common(p, max_tokens=64, temperature=0.0)
    p.add_argument("--prefix", required=True)
    p.add_argument("--suffix", default="")
    args = p.parse_args(argv)
    llm = _llm(args)
    if llm.tokenizer is None:
        print("complete: the checkpoint has no tokenizer.json", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    middle = llm.complete(args.prefix, args.suffix, _params(args))
    print(middle, file=out)
    if args.stats:
        _report(llm, len(llm.tokenizer.encode(middle)), time.perf_counter() - t0, out)
    return 0
