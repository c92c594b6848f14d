"""Training phases after pre-training: a run that starts from another run's weights (`--init CKPT`)
and the context-extension recipe of §4.3, scaled.

`--init CKPT` copies the model's weights and every MoE gate's routing bias (a buffer, not a
parameter) into the new run's model, which may differ in its RoPE/YaRN settings and seq_len; the
optimizer state, the step, the schedules and the data position start afresh. The rotary
frequencies are not copied: they are recomputed from the new run's YaRN settings.

The paper's recipe (§4.3): after pre-training at 4K, two phases of 1,000 steps each, 32K with
batch 1920 and then 128K with batch 480, learning rate 7.3e-6 (the last pre-training rate) held
constant, with the same YaRN settings in both (scale s = 40, alpha = 1, beta = 32, sqrt(t) =
0.1 ln s + 1; the released config: max_position_embeddings 163840 = 40 x 4096, beta_fast 32,
beta_slow 1, mscale 1). Scaled to a run pre-trained at seq_len L with final batch B:

| phase  | seq_len | batch (tokens per step as pre-training) | steps | lr |
|--------|---------|------------------------------------------|-------|----|
| `ctx1` | 8 L     | max(1, B / 8)                             | 1000 / 235,000 of the pre-training steps (at least 20) | pre-training lr x tail_lr_ratio, constant |
| `ctx2` | 32 L    | max(1, B / 32)                            | as ctx1 | as ctx1 |

with model.original_seq_len = L, model.max_seq_len = 40 L, rope_factor 40, beta_fast 32,
beta_slow 1, mscale 1, gamma 0 (the bias update stopped at the end of pre-training) and the late
MTP weight. 235,000 is the pre-training's step count at its final batch (14.8T tokens / (15360 x
4096)). Every value can be overridden like any other field (e.g. seq_len=1024 for a 4x phase).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dsv3 import paper
from dsv3.checkpoint import load_pretrained
from dsv3.config import ConfigError

PAPER_PRETRAIN_STEPS = 14.8e12 / (15360 * 4096)  # ~235K steps at the final batch
PAPER_PHASE_STEPS = 1000
MIN_PHASE_STEPS = 20
YARN_SCALE = 40  # s = 40: max_position_embeddings 163840 = 40 x the 4K pre-training length
# phase -> (seq_len multiple of the pre-training length, the paper's batch at that length)
PHASES = {"ctx1": (8, 1920), "ctx2": (32, 480)}


def init_state(path: str | Path) -> dict[str, Any] | None:
    """The trainer.json of a training checkpoint, or None for a plain model directory."""
    state_file = Path(path) / "trainer.json"
    if not state_file.is_file():
        return None
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--init {path}: trainer.json is not readable ({e})") from None


def check_init(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--init {path}: not a checkpoint directory (no config.json)")
    return path


def init_values(path: str | Path, phase: str | None) -> dict[str, Any]:
    """TrainConfig fields of a run started from checkpoint `path`: its own run's settings (data,
    tokenizer, model shape), a fresh schedule, and with `phase` the scaled recipe on top."""
    path = check_init(path)
    state = init_state(path)
    if state is None:
        if phase is not None:
            raise ConfigError(f"--phase {phase}: needs a training checkpoint (with trainer.json) as --init")
        return {"init": str(path), "tokenizer": str(path)}
    saved = run_config(state)
    if saved is None:
        raise ConfigError(f"--init {path}: this SFT checkpoint records no training run to continue from")
    recipe_from = dict(saved)
    for key in ("out", "init", "phase", "steps", "warmup_steps"):
        saved.pop(key, None)
    if saved.get("precision") == "auto" and state.get("precision"):
        saved["precision"] = state["precision"]
    values = {**saved, "init": str(path), "tokenizer": str(path)}
    if phase is not None:
        values.update(phase_values(phase, recipe_from, int(recipe_from.get("steps", 1000))))
    return values


def run_config(state: dict[str, Any]) -> dict[str, Any] | None:
    """The TrainConfig fields of the training run behind a trainer state (trainer.json): its own,
    or for an SFT checkpoint (whose `config` holds SFT's settings) the run it was fine-tuned from,
    recorded as `train_config`; None for an SFT state without one."""
    saved = dict(state.get("config") or {})
    if saved.get("phase") != "sft":
        return saved
    behind = state.get("train_config")
    return dict(behind) if isinstance(behind, dict) else None


def pretraining_lr(saved: dict[str, Any]) -> float:
    """The pre-training peak lr behind a run's saved TrainConfig fields: a context-extension run's own
    lr is the pre-training's x tail_lr_ratio (7.3e-6 / 2.2e-4 in the paper)."""
    lr = float(saved.get("lr", paper.PEAK_LR))
    if saved.get("phase") in PHASES:
        lr /= float(saved.get("tail_lr_ratio", paper.TAIL_LR / paper.PEAK_LR))
    return lr


def phase_values(phase: str, saved: dict[str, Any], pretrain_steps: int) -> dict[str, Any]:
    """The scaled recipe of `phase` for a run with the TrainConfig fields `saved` (pre-trained, or
    itself a phase: then `pretrain_steps` is that phase's steps)."""
    if phase not in PHASES:
        raise ConfigError(f"--phase {phase}: unknown; choose one of {', '.join(PHASES)}")
    base_len = int(saved.get("seq_len", 256))
    model = dict(saved.get("model") or {})
    # a second phase keeps the first one's YaRN settings and base length (the paper's: the same)
    base_len = int(model.get("original_seq_len", base_len)) if model.get("rope_factor") else base_len
    multiple, _ = PHASES[phase]
    seq_len = multiple * base_len
    tokens = int(saved.get("batch_end", 8)) * int(saved.get("seq_len", base_len))
    batch = max(1, tokens // seq_len)
    micro = min(int(saved.get("micro_batch", 8)), batch)
    batch -= batch % micro
    model.update(original_seq_len=base_len, max_seq_len=YARN_SCALE * base_len, rope_factor=float(YARN_SCALE),
                 beta_fast=32, beta_slow=1, mscale=1.0)  # fmt: skip
    if saved.get("phase") in PHASES:  # a second phase: the first one's lr and length (the paper's: the same)
        lr, steps = float(saved["lr"]), pretrain_steps
    else:
        lr = pretraining_lr(saved) * float(saved.get("tail_lr_ratio", paper.TAIL_LR / paper.PEAK_LR))
        steps = max(MIN_PHASE_STEPS, round(pretrain_steps * PAPER_PHASE_STEPS / PAPER_PRETRAIN_STEPS))
    return {
        "phase": phase, "seq_len": seq_len, "batch_start": batch, "batch_end": batch, "micro_batch": micro,
        "model": model, "lr": lr, "warmup_steps": 0, "lr_constant_until": 1.0, "lr_decay_until": 1.0,
        "lr_tail_from": 1.0, "gamma": 0.0, "mtp_lambda": float(saved.get("mtp_lambda_late", paper.MTP_LAMBDA_LATE)),
        "steps": steps,
    }  # fmt: skip


def load_init_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy the weights and gate biases of checkpoint `path` into `model` (same shapes required;
    the RoPE settings may differ: the frequencies are not state)."""

    source = load_pretrained(path, dtype=torch.float32)
    theirs, mine = source.state_dict(), model.state_dict()
    missing = sorted(set(mine) - set(theirs))
    if missing or set(theirs) - set(mine):
        name = (missing or sorted(set(theirs) - set(mine)))[0]
        raise ConfigError(f"--init {path}: the model differs from this run's ({name} is in one only)")
    for name, value in theirs.items():
        if value.shape != mine[name].shape:
            raise ConfigError(
                f"--init {path}: {name} has shape {tuple(value.shape)}, this run's model {tuple(mine[name].shape)}"
            )
    model.load_state_dict(theirs, strict=True)
