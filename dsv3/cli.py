"""`dsv3` command line: one sub-command per job; each lives in its own module."""

from __future__ import annotations

import argparse
import sys


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

    cfg = ModelConfig.from_hf(args.ckpt) if args.ckpt else ModelConfig.from_preset(args.preset)
    print_param_counts(cfg, args.ckpt or args.preset)
    print(f"KV cache: {cfg.kv_cache_dim} values per token and layer, "
          f"{(cfg.n_layers) * cfg.kv_cache_dim * 2 / 1024:.1f} KiB per token in BF16")  # fmt: skip
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from dsv3.checkpoint import convert_fp8_to_bf16

    if not args.fp8_to_bf16:
        print("convert: say what to convert, e.g. --fp8-to-bf16 SRC DST", file=sys.stderr)
        return 2
    convert_fp8_to_bf16(args.src, args.dst)
    print(f"wrote a BF16 copy of {args.src} to {args.dst}")
    return 0


# Sub-commands that parse their own arguments: name -> (module, function, help).
DELEGATED = {
    "demo": ("dsv3.demo", "main", "the main job: train `small` on the bundled corpus, evaluate, sample"),
    "train": ("dsv3.train.cli", "train_main", "train with the V3 recipe (see dsv3 train -h)"),
    "eval": ("dsv3.train.cli", "eval_main", "evaluate a training checkpoint"),
    "plot": ("dsv3.train.cli", "plot_main", "PNG plots of a training run"),
    "pipeline-plan": ("dsv3.parallel.plan", "pipeline_plan_main", "pipeline schedule timelines and bubbles"),
    "generate": ("dsv3.infer.cli", "generate_main", "generate from a checkpoint (batched, --speculative)"),
    "chat": ("dsv3.infer.cli", "chat_main", "interactive chat with a checkpoint (/exit, /clear)"),
    "complete": ("dsv3.infer.cli", "complete_main", "fill in the middle between --prefix and --suffix"),
}
# `dsv3 plan <what>`: planners.
PLANNERS = {"eplb": ("dsv3.infer.eplb.report", "plan_eplb_main")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3", description="The DeepSeek-V3 system in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameter counts and cache size of a preset or checkpoint")
    s.add_argument("--preset", default="small")
    s.add_argument("--ckpt", help="checkpoint directory (reads its config.json)")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("convert", help="checkpoint conversions")
    s.add_argument("--fp8-to-bf16", action="store_true", help="dequantise an official FP8 checkpoint")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(fn=cmd_convert)
    for name, (_, _, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    sub.add_parser("plan", help="planners: `dsv3 plan eplb ...` (expert placement with redundant experts)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import importlib

    if argv and argv[0] in DELEGATED:
        module, fn, _ = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), fn)(argv[1:])
    if argv and argv[0] == "plan":
        if len(argv) < 2 or argv[1] not in PLANNERS:
            print(f"usage: dsv3 plan {{{','.join(PLANNERS)}}} ...", file=sys.stderr)
            return 2
        module, fn = PLANNERS[argv[1]]
        return getattr(importlib.import_module(module), fn)(argv[2:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
