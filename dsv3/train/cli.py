"""`dsv3 train`, `dsv3 eval` and `dsv3 plot` (also `python -m dsv3.train`, e.g. under torchrun)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from dsv3.config import ConfigError


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv3 train",
        description="Train a DeepSeek-V3-architecture model with the V3 recipe. Any TrainConfig field can "
        "be set as key=value (model fields as model.<field>=value).",
    )
    p.add_argument("--preset", help="model preset (tiny, small, 16b, 671b)")
    p.add_argument("--steps", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp8"])
    p.add_argument("--data", help="text/jsonl/parquet file or directory (default: the bundled corpus)")
    p.add_argument("--out", help="run directory (logs, checkpoints, plots)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument(
        "--force", action="store_true", help="with --resume: start over when no checkpoint of --out is valid"
    )
    p.add_argument("--config", help="JSON or TOML file of TrainConfig fields")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--ep", type=int, help="expert-parallel size (under torchrun; same as parallel.ep=N)")
    p.add_argument("--dp", type=int, help="data-parallel size (under torchrun; same as parallel.dp=N)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def build_config(args: argparse.Namespace):
    from dsv3.train.config import TrainConfig

    values = TrainConfig.from_file(args.config) if args.config else {}
    for name in ("preset", "steps", "precision", "data", "out"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    overrides = list(args.overrides)
    overrides += [f"parallel.{k}={getattr(args, k)}" for k in ("ep", "dp") if getattr(args, k) is not None]
    return TrainConfig.build(values, overrides)


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE set), join the process group: NCCL on cuda:LOCAL_RANK when CUDA is
    there, gloo on CPU otherwise. DSV3_DIST_TIMEOUT (seconds, default 600) bounds every collective,
    so a stuck rank makes the others fail with an error instead of hanging; the watchdog
    (dsv3.parallel.launch.Watchdog) ends this worker within seconds when torchrun's agent dies, and
    within DSV3_HEARTBEAT_TIMEOUT (default 60 s) when a peer stops (docs/parallel.md, Failures)."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from dsv3.parallel.launch import start_watchdog

        timeout = datetime.timedelta(seconds=float(os.environ.get("DSV3_DIST_TIMEOUT", "600")))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        start_watchdog()


def oversubscription_warning(threads: int, load: float, cpus: int) -> str | None:
    """A warning when `threads` intra-op threads would share the cores with other busy processes
    (1-minute load average `load` on `cpus` cores): OpenMP threads then spin-wait on each other and a
    step can run 10x slower (measured: 1.9 s -> 24 s on 2 cores next to another training run)."""
    if threads <= 1 or load + threads <= cpus + 0.5:
        return None
    return (
        f"load average {load:.1f} on {cpus} cores: {threads} torch threads will compete with other "
        f"busy processes and may run many times slower; consider --threads {max(1, cpus - round(load))} "
        f"(or OMP_NUM_THREADS)"
    )


def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(f"dsv3 train: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "getloadavg") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        warning = oversubscription_warning(torch.get_num_threads(), os.getloadavg()[0], os.cpu_count() or 1)
        if warning:
            print(f"dsv3 train: warning: {warning}", file=sys.stderr)
    _init_distributed()
    from dsv3.errors import Dsv3Error
    from dsv3.train.loop import Trainer, TrainingDiverged, TrainingInterrupted

    try:
        trainer = Trainer(cfg, resume=args.resume, show_progress=not args.quiet, force=args.force)
    except Dsv3Error as e:
        print(f"dsv3 train: {e}", file=sys.stderr)
        return 2
    main_rank = trainer.strategy.is_main
    if trainer.resumed_from and main_rank:
        print(f"resuming from {trainer.resumed_from} (step {trainer.step})")
    elif args.resume and main_rank:
        print(f"no valid checkpoint in {trainer.ckpt_root}: starting from step 0")
    if main_rank:
        print(
            f"precision: {trainer.precision} ({trainer.precision_reason}); "
            f"{trainer.model.num_params():,} parameters"
        )
    try:
        result = trainer.fit()
    except TrainingDiverged as e:
        print(f"dsv3 train: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # saved at a step boundary; 128 + signal, as shells report it
        if main_rank:
            print(f"dsv3 train: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # a second signal: stopped mid-step without saving
        return 128 + signal.SIGINT
    if main_rank:
        print(json.dumps(result, indent=2))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dsv3 eval", description="Validation loss, bits per byte, MaxVio_global."
    )
    p.add_argument("--ckpt", required=True, help="a checkpoint directory (run/checkpoints/step_...)")
    p.add_argument("--data", help="evaluate on other data (default: the run's validation split)")
    p.add_argument("--batches", type=int, default=50)
    args = p.parse_args(argv)
    from dsv3.train.config import TrainConfig
    from dsv3.train.loop import Trainer

    ckpt = Path(args.ckpt)
    state_file = ckpt / "trainer.json"
    if not state_file.exists():
        print(f"dsv3 eval: {state_file} not found; --ckpt must be a training checkpoint", file=sys.stderr)
        return 2
    saved = json.loads(state_file.read_text())["config"]
    saved.update(eval_batches=args.batches, tokenizer=str(ckpt), tensorboard=False)
    if args.data:
        saved["data"] = args.data
    cfg = TrainConfig.build(saved)
    trainer = Trainer.for_checkpoint(cfg, ckpt)
    print(json.dumps(trainer.evaluate(), indent=2))
    return 0


def plot_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 plot", description="PNG plots of a training run.")
    p.add_argument("run", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="where to write the PNGs (default: RUN/plots)")
    args = p.parse_args(argv)
    from dsv3.train.plot import plot_run

    for path in plot_run(args.run, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
