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
from pathlib import Path
from typing import TextIO

import torch

from dsv3.cli import UsageError, existing_dir, positive_int
from dsv3.threads import add_threads_argument, configure_threads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_LINE_CHARS = 100_000  # a chat line longer than this is refused before it is even tokenized


def _common(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and cache (default fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=positive_int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--num-speculative-tokens", type=positive_int, default=1)
    p.add_argument("--draft-vocab", type=positive_int, default=None,
                   help="MTP drafts only among token ids below this (faster drafts; output unchanged)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start)")
    p.add_argument("--fp8-weights", action="store_true", help="keep an FP8 checkpoint's projections in FP8")
    p.add_argument("--weight-dtype", choices=["fp32", "bf16"], default=None,
                   help="decode weights of the fast path (feed-forward, head); default: bf16 for a BF16 "
                   "checkpoint, else the model's dtype")  # fmt: skip
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="latent KV cache dtype; auto: bf16 for a BF16 checkpoint, else the model's dtype")  # fmt: skip
    p.add_argument("--stats", action="store_true", help="print throughput and speculative acceptance")
    add_threads_argument(p)


def _prepare(args: argparse.Namespace) -> None:
    """What can be checked before the model is loaded: the checkpoint directory, the device, the
    sampling options."""
    existing_dir("--ckpt", args.ckpt)
    _check_device(args.device)
    _params(args)


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device type {device.type!r} (use cpu or cuda)")


def _utf8(text: str, where: str) -> str:
    """`text` if it is valid Unicode text; a lone surrogate (undecodable bytes on the command line or
    an unpaired surrogate) becomes a UsageError naming `where` and the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(
            f"{where}: not valid UTF-8 text (undecodable byte or lone surrogate at character {e.start})"
        ) from None
    return text


def _read_prompts(path: str) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file; a decoding error names the file and the line."""
    data = Path(path).read_bytes()
    prompts = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise UsageError(
                f"--input-file {path}: line {n} is not valid UTF-8 (byte {e.start + 1})"
            ) from None
        if line.strip():
            prompts.append(line)
    if not prompts:
        raise UsageError(f"--input-file {path}: holds no prompt (one prompt a line)")
    return prompts


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--ids {text!r}: expected comma-separated token ids, e.g. 0,17,42") from None
    if not ids or any(t < 0 for t in ids):
        raise UsageError(f"--ids {text!r}: expected one or more non-negative token ids")
    return ids


def _check_prompts(llm, prompts: list, labels: list[str], params) -> list[list[int]]:
    """The prompts as token ids, each checked against the model (vocabulary, context length) so that
    a bad one is refused with its label before any is run."""
    if llm.tokenizer is None and (params.stop or any(isinstance(p, str) for p in prompts)):
        raise UsageError(f"{labels[0]}: text prompts and --stop need a tokenizer; this checkpoint has no "
                         "tokenizer.json (give --ids)")  # fmt: skip
    vocab, limit = llm.model.config.vocab_size, llm.engine.max_model_len
    out = []
    for prompt, label in zip(prompts, labels):
        ids = llm.encode(prompt) if isinstance(prompt, str) else list(prompt)
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise UsageError(f"{label}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if not ids:
            raise UsageError(f"{label}: encodes to no tokens")
        if len(ids) >= limit:
            raise UsageError(f"{label}: {len(ids)} tokens, the model takes at most {limit - 1}")
        out.append(ids)
    return out


def _llm(prog: str, args: argparse.Namespace):
    """The torch threads (with the oversubscription warning), then the model."""
    from dsv3.infer.llm import LLM

    configure_threads(prog, args.threads)

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
        **({} if args.kv_cache_dtype == "auto" else {"kv_cache_dtype": DTYPES[args.kv_cache_dtype]}),
    )


def _params(args: argparse.Namespace):
    from dsv3.infer.sampling import SamplingParams

    for i, stop in enumerate(args.stop):
        _utf8(stop, f"--stop {i}")
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


def generate_main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # the stream of now, not of import time
    p = argparse.ArgumentParser(prog="dsv3 generate", description="Generate continuations of prompts.")
    _common(p, max_tokens=64, temperature=0.0)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--input-file", help="a file with one prompt a line")
    src.add_argument("--ids", help="prompt token ids, comma separated")
    args = p.parse_args(argv)
    _prepare(args)
    if args.ids is not None:
        prompts: list = [_parse_ids(args.ids)]
        labels = ["--ids"]
    elif args.input_file is not None:
        prompts = _read_prompts(args.input_file)
        labels = [f"--input-file {args.input_file}: prompt {i + 1}" for i in range(len(prompts))]
    else:
        prompts, labels = [args.prompt], ["--prompt"]
    for prompt, label in zip(prompts, labels):
        if isinstance(prompt, str):
            _utf8(prompt, label)
    llm = _llm("dsv3 generate", args)
    params = _params(args)
    ids = _check_prompts(llm, prompts, labels, params)
    t0 = time.perf_counter()
    outs = llm.generate(ids, params)
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


def chat_main(argv: list[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Ctrl-C or end of input at the prompt (or during a reply) ends the chat with exit code 0."""
    out = out or sys.stdout  # the stream of now, not of import time
    p = argparse.ArgumentParser(prog="dsv3 chat", description="Chat interactively (/exit, /clear).")
    _common(p, max_tokens=256, temperature=0.7)
    p.add_argument("--system", default="", help="system prompt")
    args = p.parse_args(argv)
    _prepare(args)
    _utf8(args.system, "--system")
    stdin = stdin if stdin is not None else sys.stdin
    if hasattr(stdin, "reconfigure"):  # undecodable input bytes become surrogates we can report
        stdin.reconfigure(errors="surrogateescape")
    llm = _llm("dsv3 chat", args)
    if llm.tokenizer is None:
        raise UsageError(f"--ckpt {args.ckpt}: the checkpoint has no tokenizer.json (chat needs one)")
    chat = _Chat(llm, args, out)
    print("dsv3 chat: /exit to quit, /clear to start over", file=out)
    try:
        while True:
            print(">>> ", end="", file=out, flush=True)
            line = stdin.readline()
            if not line:  # end of input
                print(file=out)
                return 0
            if line.strip() == "/exit":
                return 0
            chat.turn(line.rstrip("\n"))
    except KeyboardInterrupt:
        print("\n(interrupted)", file=out, flush=True)
        return 0


class _Chat:
    """The conversation: its history, trimmed from the oldest turn to fit the model's context."""

    def __init__(self, llm, args: argparse.Namespace, out: TextIO) -> None:
        self.llm, self.args, self.out = llm, args, out
        self.params = _params(args)
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict[str, str]] = []
        self.limit = llm.engine.max_model_len
        # room kept for the reply: a prompt that fills the context would leave the model no tokens
        self.reserve = min(args.max_tokens, self.limit // 4)

    def say(self, note: str) -> None:
        print(f"({note})", file=self.out, flush=True)

    def turn(self, text: str) -> None:
        if text.strip() == "/clear":
            self.history = []
            self.say("conversation cleared")
            return
        if not text.strip():
            return
        if len(text) > MAX_LINE_CHARS:
            self.say(f"line too long: {len(text)} characters, at most {MAX_LINE_CHARS}; not sent")
            return
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            self.say("the line is not valid UTF-8; not sent")
            return
        self.history.append({"role": "user", "content": text})
        if not self._fit():
            return
        self._reply()

    def _tokens(self) -> int:
        tok = self.llm.tokenizer
        return len(tok.apply_chat_template(self.system + self.history, add_generation_prompt=True))

    def _fit(self) -> bool:
        """Drop the oldest exchanges until the prompt leaves room for a reply; False (and the new
        message dropped) when even the new message alone does not fit."""
        budget = self.limit - self.reserve
        dropped = 0
        while self._tokens() > budget and len(self.history) > 1:
            del self.history[:2]  # the oldest user message and its reply
            dropped += 2
        if self._tokens() > budget:
            n = self._tokens()
            self.history.pop()
            self.say(f"message too long: {n} tokens with the history, the context holds {budget} "
                     f"(plus {self.reserve} for the reply); not sent")  # fmt: skip
            return False
        if dropped:
            self.say(f"dropped the {dropped} oldest messages to fit the context of {self.limit} tokens")
        return True

    def _reply(self) -> None:
        llm, out = self.llm, self.out
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
        o = llm.chat(self.system + self.history, self.params, on_update=stream)
        print(file=out)
        self.history.append({"role": "assistant", "content": o.text or ""})
        if self.args.stats:
            _report(llm, len(o.token_ids), time.perf_counter() - t0, out)


def complete_main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # the stream of now, not of import time
    p = argparse.ArgumentParser(
        prog="dsv3 complete", description="Fill in the middle of a prefix and a suffix."
    )
    _common(p, max_tokens=64, temperature=0.0)
    p.add_argument("--prefix", required=True)
    p.add_argument("--suffix", default="")
    args = p.parse_args(argv)
    _prepare(args)
    _utf8(args.prefix, "--prefix")
    _utf8(args.suffix, "--suffix")
    llm = _llm("dsv3 complete", args)
    if llm.tokenizer is None:
        raise UsageError(f"--ckpt {args.ckpt}: the checkpoint has no tokenizer.json (complete needs one)")
    from dsv3.data.fim import fim_prompt

    _check_prompts(
        llm, [fim_prompt(llm.tokenizer, args.prefix, args.suffix)], ["--prefix/--suffix"], _params(args)
    )
    t0 = time.perf_counter()
    middle = llm.complete(args.prefix, args.suffix, _params(args))
    print(middle, file=out)
    if args.stats:
        _report(llm, len(llm.tokenizer.encode(middle)), time.perf_counter() - t0, out)
    return 0
