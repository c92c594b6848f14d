"""`dsv3` command line: one sub-command per job; each lives in its own module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsv3.errors import Dsv3Error, run_cli


class UsageError(Dsv3Error, ValueError):
    """A command-line value is invalid; the message names the option and the value."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def existing_dir(option: str, path: str | Path) -> Path:
    """`path` as a directory, or a UsageError naming `option` (missing, or a file)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{option} {path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a checkpoint directory")
    return path


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def print_param_counts(cfg, name: str = "") -> None:
    c = cfg.param_counts()
    print(f"parameters{f' of {name}' if name else ''}:")
    for key in (
        "embedding",
        "head",
        "attention",
        "dense_mlp",
        "routed_experts",
        "shared_experts",
        "gates",
        "norms",
    ):
        print(f"  {key:<16} {_fmt(c[key]):>10}")
    print(f"  {'total':<16} {_fmt(c['total']):>10}   (main model)")
    print(f"  {'activated':<16} {_fmt(c['activated']):>10}   (per token)")
    print(f"  {'mtp':<16} {_fmt(c['mtp']):>10}   ({cfg.n_mtp_layers} module(s), embedding and head shared)")


def cmd_info(args: argparse.Namespace) -> int:
    from dsv3 import ModelConfig

    if args.ckpt and not Path(args.ckpt).exists():
        raise UsageError(f"--ckpt {args.ckpt}: no such directory or config.json")
    cfg = ModelConfig.from_hf(args.ckpt) if args.ckpt else ModelConfig.from_preset(args.preset)
    print_param_counts(cfg, args.ckpt or args.preset)
    print(f"KV cache: {cfg.kv_cache_dim} values per token and layer, "
          f"{(cfg.n_layers) * cfg.kv_cache_dim * 2 / 1024:.1f} KiB per token in BF16")  # fmt: skip
    print(context_line(cfg, args.ckpt))
    return 0


def context_line(cfg, ckpt: str | None = None) -> str:
    """The effective context: max_seq_len, with YaRN's settings when it extends the RoPE, and for a
    training checkpoint the phase and seq_len it was trained at (trainer.json)."""
    from dsv3.model.rope import softmax_scale

    if cfg.yarn_active:
        scale = softmax_scale(cfg) * cfg.qk_head_dim**0.5
        line = (f"context: {cfg.max_seq_len} positions (YaRN x{cfg.rope_factor:g} from {cfg.original_seq_len}; "
                f"beta_fast {cfg.beta_fast}, beta_slow {cfg.beta_slow}, mscale {cfg.mscale:g}: "
                f"attention logits x{scale:.4f})")  # fmt: skip
    else:
        line = f"context: {cfg.max_seq_len} positions (plain RoPE, no YaRN)"
    state = Path(ckpt) / "trainer.json" if ckpt else None
    if state is not None and state.is_file():
        import json

        try:
            saved = json.loads(state.read_text())["config"]
            line += f"; trained at seq_len {saved['seq_len']}, phase {saved.get('phase') or 'pre-training'}"
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable trainer state: the model's context is still known
    return line


def cmd_convert(args: argparse.Namespace) -> int:
    from dsv3.checkpoint import convert_fp8_to_bf16

    if not (args.fp8_to_bf16 or args.add_chat_tokens):
        raise UsageError("say what to convert, e.g. --fp8-to-bf16 SRC DST or --add-chat-tokens SRC DST")
    existing_dir("SRC", args.src)
    if Path(args.dst).resolve() == Path(args.src).resolve():
        raise UsageError(f"DST {args.dst}: must differ from SRC")
    if args.add_chat_tokens:
        from dsv3.data.chat import migrate_checkpoint

        info = migrate_checkpoint(args.src, args.dst)
        print(f"wrote {args.dst}: <｜User｜> = {info['user_id']}, <｜Assistant｜> = {info['assistant_id']}, "
              f"vocab {info['vocab_size']}" + ("" if info["added_tokens"] else " (the tokenizer had them already)"))  # fmt: skip
        return 0
    convert_fp8_to_bf16(args.src, args.dst)
    print(f"wrote a BF16 copy of {args.src} to {args.dst}")
    return 0


# Sub-commands that parse their own arguments: name -> (module, function, help).
DELEGATED = {
    "demo": ("dsv3.demo", "main", "the main job: train `small` on the bundled corpus, evaluate, sample"),
    "train": ("dsv3.train.cli", "train_main", "train with the V3 recipe (see dsv3 train -h)"),
    "eval": (
        "dsv3.evals.cli",
        "eval_main",
        "validation loss of a checkpoint, or --tasks: the evaluation harness",
    ),
    "plot": ("dsv3.train.cli", "plot_main", "PNG plots of a training run"),
    "pipeline-plan": (
        "dsv3.parallel.pipeline.cli",
        "pipeline_plan_main",
        "pipeline schedule timelines and bubbles",
    ),
    "sft": (
        "dsv3.train.sft",
        "sft_main",
        "chat SFT on JSONL conversations (V3 chat format, assistant-only loss)",
    ),
    "synth": ("dsv3.data.chat_synth", "synth_main", "synthesise the demo chat set from the corpus"),
    "distill-mtp": (
        "dsv3.train.mtp_distill",
        "distill_mtp_main",
        "train MTP module 1 on the model's own greedy outputs (speculative drafts)",
    ),
    "generate": ("dsv3.infer.cli", "generate_main", "generate from a checkpoint (batched, --speculative)"),
    "chat": ("dsv3.infer.cli", "chat_main", "interactive chat with a checkpoint (/exit, /clear)"),
    "complete": ("dsv3.infer.cli", "complete_main", "fill in the middle between --prefix and --suffix"),
    "serve": ("dsv3.serve.cli", "serve_main", "OpenAI-compatible HTTP server (docs/serving.md)"),
    "bench": (
        "dsv3.serve.bench",
        "bench_main",
        "benchmarks: `dsv3 bench serve` loads an OpenAI-compatible server",
    ),
}
# `dsv3 plan <what>`: planners.
PLANNERS = {
    "eplb": ("dsv3.infer.eplb.report", "plan_eplb_main"),
    "serve": ("dsv3.planner.serve", "plan_serve_main"),
    "train": ("dsv3.planner.train", "plan_train_main"),
    "calibrate": ("dsv3.planner.calibrate", "plan_calibrate_main"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3", description="The DeepSeek-V3 system in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameter counts and cache size of a preset or checkpoint")
    s.add_argument("--preset", default="small")
    s.add_argument("--ckpt", help="checkpoint directory (reads its config.json)")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("convert", help="checkpoint conversions")
    s.add_argument("--fp8-to-bf16", action="store_true", help="dequantise an official FP8 checkpoint")
    s.add_argument("--add-chat-tokens", action="store_true",
                   help="add <｜User｜>/<｜Assistant｜> special tokens to an older checkpoint (grows the vocabulary)")  # fmt: skip
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(fn=cmd_convert)
    for name, (_, _, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    sub.add_parser("plan", help="planners: `dsv3 plan eplb|serve|train|calibrate ...` (docs/planning.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Every sub-command runs through run_cli: a Dsv3Error is one line `dsv3 CMD: message`, exit 2
    (`--debug` anywhere, or DSV3_DEBUG=1, shows the traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    import importlib

    # `--debug` may come before the sub-command too; run_cli also takes it from the sub-command's argv
    debug = ["--debug"] if "--debug" in argv else []
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in DELEGATED:
        module, fn, _ = DELEGATED[argv[0]]
        return run_cli(f"dsv3 {argv[0]}", getattr(importlib.import_module(module), fn), argv[1:] + debug)
    if argv and argv[0] == "plan":
        if len(argv) < 2 or argv[1] not in PLANNERS:
            print(f"usage: dsv3 plan {{{','.join(PLANNERS)}}} ...", file=sys.stderr)
            print(f"dsv3 plan: error: choose a planner: {', '.join(PLANNERS)}", file=sys.stderr)
            return 2
        module, fn = PLANNERS[argv[1]]
        return run_cli(f"dsv3 plan {argv[1]}", getattr(importlib.import_module(module), fn), argv[2:] + debug)
    args = build_parser().parse_args(argv)
    return run_cli(f"dsv3 {args.command}", lambda _: args.fn(args), debug)


if __name__ == "__main__":
    sys.exit(main())
