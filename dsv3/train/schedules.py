"""The V3 schedules (§4.2) as pure functions of the step: learning rate, batch size, gamma, lambda."""

from __future__ import annotations

import math

from dsv3.config import ConfigError
from dsv3.train.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, constant, cosine decay to final_lr_ratio * lr, then two tail levels.

    step counts from 0 (the first optimizer step uses learning_rate(cfg, 0))."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = step / cfg.steps
    final, tail = cfg.lr * cfg.final_lr_ratio, cfg.lr * cfg.tail_lr_ratio
    if progress < cfg.lr_constant_until:
        return cfg.lr
    if progress < cfg.lr_decay_until:
        t = (progress - cfg.lr_constant_until) / (cfg.lr_decay_until - cfg.lr_constant_until)
        return final + (cfg.lr - final) * 0.5 * (1 + math.cos(math.pi * t))
    return final if progress < cfg.lr_tail_from else tail


def batch_unit(cfg: TrainConfig) -> int:
    """The step of the batch ramp: gcd(batch_start, batch_end), the largest size both ends are
    multiples of. It does not depend on the world size, so every world size whose micro_batch x
    ranks divides both ends trains the same global batch at every step (and a resume on another
    world size continues the same ramp)."""
    return math.gcd(cfg.batch_start, cfg.batch_end)


def check_batch(cfg: TrainConfig, ranks: int) -> None:
    """Raise ConfigError unless `ranks` data-parallel ranks can run the configured global batches
    exactly: both ends of the ramp must be multiples of micro_batch x ranks (never silently more)."""
    unit = cfg.micro_batch * ranks
    bad = [name for name in ("batch_start", "batch_end") if getattr(cfg, name) % unit]
    if not bad:
        return
    fits = [m for m in range(cfg.micro_batch, 0, -1) if batch_unit(cfg) % (m * ranks) == 0]
    hint = f"set micro_batch={fits[0]}" if fits else f"use fewer ranks (at most {batch_unit(cfg)})"
    raise ConfigError(
        f"{', '.join(bad)}: the global batch (batch_start={cfg.batch_start}, batch_end={cfg.batch_end}) must be "
        f"a multiple of micro_batch ({cfg.micro_batch}) x {ranks} data ranks = {unit}; {hint}, or make "
        f"batch_start and batch_end multiples of {unit}"
    )


def global_batch(cfg: TrainConfig, step: int, ranks: int = 1) -> int:
    """Sequences per optimizer step: a linear ramp from batch_start to batch_end over the first
    batch_ramp of training, rounded down to a multiple of `batch_unit` (independent of the world
    size). Raises ConfigError if `ranks` cannot split it into whole micro-batches (`check_batch`)."""
    check_batch(cfg, ranks)
    unit = batch_unit(cfg)
    ramp_steps = cfg.batch_ramp * cfg.steps
    frac = 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)
    batch = cfg.batch_start + frac * (cfg.batch_end - cfg.batch_start)
    return max(unit, int(batch) // unit * unit)


def bias_update_speed(cfg: TrainConfig, step: int) -> float:
    """gamma: cfg.gamma during the first gamma_until of training, then 0."""
    return cfg.gamma if step / cfg.steps < cfg.gamma_until else 0.0


def mtp_weight(cfg: TrainConfig, step: int) -> float:
    """lambda: cfg.mtp_lambda during the first mtp_lambda_until of training, then mtp_lambda_late."""
    return cfg.mtp_lambda if step / cfg.steps < cfg.mtp_lambda_until else cfg.mtp_lambda_late
