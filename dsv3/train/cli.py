"""`dsv3 train`, `dsv3 eval` and `dsv3 plot` (also `python -m dsv3.train`, e.g. under torchrun)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import torch

from dsv3.cli import positive_int
from dsv3.config import ConfigError
from dsv3.config.presets import PRESETS
from dsv3.threads import add_threads_argument, configure_threads
from dsv3.threads import oversubscription_warning as oversubscription_warning  # its old home


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv3 train",
        description="Train a DeepSeek-V3-architecture model with the V3 recipe. Any TrainConfig field can "
        "be set as key=value (model fields as model.<field>=value).",
    )
    p.add_argument("--preset", help=f"model preset ({', '.join(PRESETS)})")
    p.add_argument("--steps", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp8"])
    p.add_argument("--data", help="text/jsonl/parquet file or directory (default: the bundled corpus)")
    p.add_argument(
        "--data-extra",
        help="more text/jsonl/parquet files added to the training split only (e.g. `dsv3 synth --passkey --text` rows)",
    )
    p.add_argument("--out", help="run directory (logs, checkpoints, plots)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument(
        "--force",
        action="store_true",
        help="start over: with --resume when no checkpoint of --out is valid; without it, when --out "
        "already holds checkpoints (they are deleted)",
    )
    p.add_argument("--config", help="JSON or TOML file of TrainConfig fields")
    p.add_argument(
        "--init", help="start from this checkpoint's weights and gate biases (fresh optimizer, schedule)"
    )
    p.add_argument(
        "--phase", choices=["ctx1", "ctx2"], help="with --init: the scaled context-extension recipe"
    )
    add_threads_argument(p)
    p.add_argument("--ep", type=int, help="expert-parallel size (under torchrun; same as parallel.ep=N)")
    p.add_argument("--dp", type=int, help="data-parallel size (under torchrun; same as parallel.dp=N)")
    p.add_argument("--pp", type=int, help="pipeline ranks (under torchrun; same as parallel.pp=N)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="anywhere on the line, e.g. lr=3e-4")
    return p


def parse_train_args(argv: list[str] | None) -> argparse.Namespace:
    """The train options, with key=value overrides accepted before, between or after them."""
    return _train_parser().parse_intermixed_args(argv)


def build_config(args: argparse.Namespace):
    """The run's TrainConfig: with --resume, the settings saved in the run's newest checkpoint; then
    --config, the options and the key=value overrides on top (each printed when it changes a saved
    setting). A resumed run keeps its checkpoint's model: a preset or model.* change is refused."""
    from dsv3.train.config import TrainConfig

    found = saved_run_config(args.out) if args.resume and args.out else None
    values = dict(found[0]) if found else _init_values(args)
    values.update(TrainConfig.from_file(args.config) if args.config else {})
    for name in ("preset", "steps", "precision", "data", "data_extra", "out"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    overrides = list(args.overrides)
    overrides += [
        f"parallel.{k}={getattr(args, k)}" for k in ("ep", "dp", "pp") if getattr(args, k) is not None
    ]
    cfg = TrainConfig.build(values, overrides)
    if found:
        _report_resumed_settings(cfg, *found)
    _check_world_size(cfg)
    return cfg


def _init_values(args: argparse.Namespace) -> dict:
    if args.phase and not args.init:
        raise ConfigError(f"--phase {args.phase}: needs --init CKPT (the checkpoint to extend)")
    if not args.init:
        return {}
    from dsv3.train.phases import init_values

    return init_values(args.init, args.phase)


def saved_run_config(out: str | Path) -> tuple[dict, Path] | None:
    """(TrainConfig fields, checkpoint) of the newest checkpoint of run `out` whose trainer.json
    reads, or None. `precision=auto` is replaced by the precision that run picked, so a resume never
    re-measures and switches precision mid-run."""
    from dsv3.train.config import TrainConfig
    from dsv3.train.state import list_checkpoints

    for path in reversed(list_checkpoints(Path(out) / "checkpoints")):
        try:
            state = json.loads((path / "trainer.json").read_text())
            values = dict(state["config"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable checkpoint: the trainer skips it too
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in values.items() if k in known}  # fields a newer dsv3 dropped
        if values.get("precision") == "auto" and state.get("precision"):
            values["precision"] = state["precision"]
        values.pop("out", None)
        return values, path
    return None


def _plain(value):
    return json.loads(json.dumps(value))  # tuples and lists compare equal, as they are saved


def _report_resumed_settings(cfg, saved: dict, path: Path) -> None:
    now = cfg.to_dict()
    if now["preset"] != saved.get("preset", now["preset"]):
        raise ConfigError(
            f"preset: a resumed run keeps its checkpoint's model ({path} is {saved['preset']!r}, "
            f"given {now['preset']!r}); use another --out for a new run"
        )
    saved_model, model = _plain(saved.get("model") or {}), _plain(now["model"])
    for name in sorted(set(saved_model) | set(model)):
        if saved_model.get(name) != model.get(name):
            raise ConfigError(
                f"model.{name}: a resumed run keeps its checkpoint's model (saved {saved_model.get(name)!r}, "
                f"given {model.get(name)!r}); use another --out for a new run"
            )
    changed = [
        f"{k}={_plain(now[k])!r} (saved {_plain(saved[k])!r})"
        for k in sorted(now)
        if k in saved and k not in ("out", "model") and _plain(now[k]) != _plain(saved[k])
    ]
    if os.environ.get("RANK", "0") == "0":
        print(
            f"resume: the settings saved in {path}" + (f"; changed: {', '.join(changed)}" if changed else "")
        )


def _check_fresh_run(cfg, force: bool) -> None:
    """A run without --resume into a directory that has checkpoints would mix its checkpoints with
    the old run's (and a later --resume could pick the old run's newer one): refuse, or with
    --force delete the old checkpoints first."""
    from dsv3.train.state import list_checkpoints

    root = Path(cfg.out) / "checkpoints"
    old = list_checkpoints(root)
    if not old:
        return
    if not force:
        raise ConfigError(
            f"--out {cfg.out}: already holds a run ({old[-1].name}); pass --resume to continue it, "
            "--force to delete its checkpoints and start over, or another --out"
        )
    if os.environ.get("RANK", "0") == "0":
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        print(f"--force: deleted the checkpoints of {cfg.out}")


def _check_world_size(cfg) -> None:
    """Parallel sizes that need more processes than this launch has fail here, before any data is
    prepared, instead of inside the trainer."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    par = cfg.parallel
    need = int(par.get("ep", 1)) * int(par.get("dp") or 1) * int(par.get("pp", 1))
    if world == 1 and need > 1:
        sizes = ", ".join(f"parallel.{k}={par[k]}" for k in ("ep", "dp", "pp") if par.get(k) not in (None, 1))
        raise ConfigError(f"{sizes}: needs {need} processes; launch with torchrun --nproc-per-node {need}")


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


def _finish_distributed() -> None:
    """A finished run leaves together: every rank past its last collective (a barrier), then the
    process group torn down, before the interpreter exits. Exiting with the group alive let gloo's
    threads meet the C++ static destructors ("terminate called without an active exception",
    seen on a pp=2 torchrun run on a loaded machine)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_main(argv: list[str] | None = None) -> int:
    args = parse_train_args(argv)
    cfg = build_config(args)  # the whole config, model included, before any data is prepared
    if not args.resume:
        _check_fresh_run(cfg, args.force)
    configure_threads("dsv3 train", args.threads)
    _init_distributed()
    from dsv3.train.loop import Trainer, TrainingDiverged, TrainingInterrupted

    # user errors (Dsv3Error) raised from here on are printed as one line by run_cli
    trainer = Trainer(cfg, resume=args.resume, show_progress=not args.quiet, force=args.force)
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
    _finish_distributed()
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dsv3 eval", description="Validation loss, bits per byte, MaxVio_global."
    )
    p.add_argument("--ckpt", required=True, help="a checkpoint directory (run/checkpoints/step_...)")
    p.add_argument("--data", help="evaluate on other data (default: the run's validation split)")
    p.add_argument("--batches", type=positive_int, default=50, help="validation batches (positive)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    from dsv3.train.config import TrainConfig

    ckpt = Path(args.ckpt)
    saved = _saved_config(ckpt)
    saved.update(eval_batches=args.batches, tokenizer=str(ckpt), tensorboard=False)
    if args.data:
        saved["data"] = args.data
    cfg = TrainConfig.build(saved)
    configure_threads("dsv3 eval", args.threads)
    from dsv3.train.loop import Trainer

    trainer = Trainer.for_checkpoint(cfg, ckpt)
    print(json.dumps(trainer.evaluate(), indent=2))
    return 0


def _saved_config(ckpt: Path) -> dict:
    """The TrainConfig fields a training checkpoint was written with (its trainer.json); for an SFT
    checkpoint, those of the training run it was fine-tuned from."""
    from dsv3.train.state import TrainCheckpointError

    if not ckpt.is_dir():
        what = "is not a directory" if ckpt.exists() else "does not exist"
        raise TrainCheckpointError(
            f"--ckpt {ckpt}: {what}; give a training checkpoint (RUN/checkpoints/step_N)"
        )
    state_file = ckpt / "trainer.json"
    if not state_file.is_file():
        raise TrainCheckpointError(f"{state_file}: not found; --ckpt must be a training checkpoint")
    try:
        state = json.loads(state_file.read_text())
        saved = state["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise TrainCheckpointError(f"{state_file}: not a trainer state ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict):
        raise TrainCheckpointError(f"{state_file}: 'config' is not a mapping")
    from dsv3.train.phases import run_config

    behind = run_config(state)  # for an SFT checkpoint, the training run behind it (its data, shape)
    if behind is None:
        raise TrainCheckpointError(f"{state_file}: an SFT state that records no training run behind it")
    return behind


def plot_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 plot", description="PNG plots of a training run.")
    p.add_argument("run", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="where to write the PNGs (default: RUN/plots)")
    args = p.parse_args(argv)
    from dsv3.cli import UsageError
    from dsv3.train.plot import plot_run

    try:
        paths = plot_run(args.run, args.out)
    except json.JSONDecodeError as e:  # a torn or hand-edited log: name the file, not a parser frame
        raise UsageError(f"{Path(args.run) / 'metrics.jsonl'}: a line is not JSON ({e.msg})") from None
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    from dsv3.errors import run_cli

    sys.exit(run_cli("dsv3 train", train_main))
