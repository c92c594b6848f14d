"""TrainConfig: the V3 recipe (§4.2, DESIGN §7) scaled down by configuration, validated.

Schedules are defined on the fraction of training done, with the paper's token fractions as
defaults: of 14.8T tokens, the learning rate is constant until 10T, decays (cosine) until 14.3T,
then holds 2.2e-5 for 333B and 7.3e-6 for the last 167B; gamma = 0.001 until 14.3T then 0;
lambda = 0.3 until 10T then 0.1; the batch ramps 3072 -> 15360 sequences over the first 469B.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3 import paper
from dsv3.config import PRESETS, ConfigError, ModelConfig, check_known_fields, check_typed, parse_typed

_T = 14.8e12  # total pre-training tokens of V3, to turn the paper's milestones into fractions


@dataclass(frozen=True)
class TrainConfig:
    # model and run
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (model.<field>=value)
    parallel: dict[str, Any] = field(default_factory=dict)  # dsv3.parallel settings (parallel.<key>=value)
    steps: int = 1000  # optimizer steps
    seed: int = 0
    out: str = "runs/small"
    init: str | None = None  # start from this checkpoint's weights and gate biases (dsv3.train.phases)
    phase: str | None = None  # the post-training phase this run is (ctx1, ctx2), recorded in checkpoints
    # batch: global batch in sequences ramps from batch_start to batch_end over the first ramp fraction
    seq_len: int = 256
    micro_batch: int = 8  # sequences per forward; global batch / (micro_batch x ranks) = accumulation
    batch_start: int = 8
    batch_end: int = 8
    batch_ramp: float = 469e9 / _T
    # optimiser (§4.2): AdamW (0.9, 0.95), weight decay 0.1 (not on norms), clipping 1.0
    lr: float = paper.PEAK_LR
    warmup_steps: int | None = None  # None: 2% of the steps
    lr_constant_until: float = 10e12 / _T
    lr_decay_until: float = 14.3e12 / _T
    lr_tail_from: float = (14.3e12 + 333e9) / _T
    final_lr_ratio: float = paper.FINAL_LR / paper.PEAK_LR  # 2.2e-5 / 2.2e-4
    tail_lr_ratio: float = paper.TAIL_LR / paper.PEAK_LR  # 7.3e-6 / 2.2e-4
    betas: tuple[float, float] = paper.ADAMW_BETAS
    eps: float = 1e-8
    weight_decay: float = paper.WEIGHT_DECAY
    grad_clip: float = paper.GRAD_CLIP
    # load balance (§2.1.2) and MTP (§2.2)
    gamma: float = paper.BIAS_UPDATE_SPEED
    gamma_until: float = 14.3e12 / _T
    alpha: float = paper.BALANCE_LOSS_ALPHA
    mtp_lambda: float = paper.MTP_LAMBDA_EARLY
    mtp_lambda_late: float = paper.MTP_LAMBDA_LATE
    mtp_lambda_until: float = 10e12 / _T
    # numerics and memory
    precision: str = "auto"  # auto | fp32 | bf16 | fp8; auto: bf16 where it trains this model faster (dsv3.train.precision)
    recompute: bool = False  # activation checkpointing of every block
    # data (DESIGN §6)
    data: str | None = None  # a file or directory of text/jsonl/parquet; None: the bundled corpus
    data_extra: str | None = None  # more such files, added to the training split only (e.g. passkey rows)
    tokenizer: str | None = None  # an existing tokenizer.json; None: train one
    fim_rate: float = paper.FIM_RATE
    val_fraction: float = 0.05  # by document; the default corpus has ~320 documents
    max_corpus_bytes: int | None = None  # None: the data module's default cap
    # logging, evaluation, checkpoints
    log_every: int = 1
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 2
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.02 * self.steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- construction from files and key=value overrides ------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> dict[str, Any]:
        """Read a JSON or TOML config file into a dict of fields (validated when applied)."""
        path = Path(path)
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                import tomllib

                return tomllib.loads(text)
            return json.loads(text)
        except Exception as e:
            raise ConfigError(f"{path}: cannot parse ({e})") from e

    @classmethod
    def build(cls, values: dict[str, Any] | None = None, overrides: list[str] = ()) -> TrainConfig:
        """Fields from `values`, then `key=value` overrides (model fields as model.<name>=value,
        parallelism as parallel.<key>=value), each value parsed by its field's type."""
        values = dict(values or {})
        model = dict(values.pop("model", {}) or {})
        parallel = dict(values.pop("parallel", {}) or {})
        check_known_fields(cls, values, "training field")
        for item in overrides:
            key, raw = split_override(item)
            if key.startswith("model."):
                name = key[len("model.") :]
                model[name] = parse_typed(key, raw, _field_hint(ModelConfig, name, "model field", "model."))
            elif key.startswith("parallel."):
                name = key[len("parallel.") :]
                parallel[name] = parse_typed(
                    key, raw, _field_hint(_parallel_settings(), name, "setting", "parallel.")
                )
            else:
                values[key] = parse_typed(key, raw, _field_hint(cls, key, "training field"))
        return cls(**values, model=model, parallel=parallel)

    def model_config(self, **defaults: Any) -> ModelConfig:
        """The ModelConfig of this run: the preset with the model.<field> overrides, `defaults`
        (e.g. the tokenizer's vocabulary size) where no override sets the field."""
        return ModelConfig.from_preset(self.preset, **(defaults | self.model))


def split_override(item: str) -> tuple[str, str]:
    """`key=value` -> (key, value); a ConfigError for anything else."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value (e.g. lr=3e-4 or model.n_layers=4)")
    return key.strip(), raw


def _field_hint(cls: type, name: str, what: str, prefix: str = "") -> Any:
    check_known_fields(cls, {name: None}, what, prefix)
    return typing.get_type_hints(cls)[name]


def _parallel_settings() -> type:
    from dsv3.parallel.strategy import ParallelSettings  # imports torch.distributed: only when used

    return ParallelSettings


def _check_types(c: TrainConfig) -> None:
    """Every field against its annotation (values from a --config file or Python are not parsed);
    lists become tuples for tuple fields."""
    for name, hint in typing.get_type_hints(TrainConfig).items():
        value = check_typed(name, getattr(c, name), hint)
        if value is not getattr(c, name):
            object.__setattr__(c, name, value)


def _check_model(c: TrainConfig) -> None:
    """The preset and model.<field> overrides make a valid ModelConfig whose max_seq_len holds
    seq_len: checked here, before any data is prepared or model built."""
    if c.preset not in PRESETS:
        raise ConfigError(f"preset: unknown {c.preset!r}; choose one of {sorted(PRESETS)}")
    check_known_fields(ModelConfig, c.model, "model field", "model.")
    try:
        model = c.model_config()
    except ConfigError as e:
        raise ConfigError(f"model.{e}") from None
    if c.seq_len > model.max_seq_len:
        raise ConfigError(
            f"seq_len: {c.seq_len} exceeds model.max_seq_len ({model.max_seq_len} for preset {c.preset!r}); "
            "lower seq_len or raise model.max_seq_len"
        )


def _check_parallel(c: TrainConfig) -> None:
    if not c.parallel:
        return
    settings = _parallel_settings()
    check_known_fields(settings, c.parallel, "setting", "parallel.")
    hints = typing.get_type_hints(settings)
    for key, value in c.parallel.items():
        check_typed(f"parallel.{key}", value, hints[key])


def _validate(c: TrainConfig) -> None:
    def fail(name: str, msg: str) -> None:
        raise ConfigError(f"{name}: {msg} (got {getattr(c, name)!r})")

    _check_types(c)

    for name in ("steps", "seq_len", "micro_batch", "batch_start", "batch_end", "log_every", "eval_every",
                 "eval_batches", "ckpt_every", "keep_last", "max_bad_steps"):  # fmt: skip
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            fail(name, "must be a positive integer")
    for name in ("lr", "eps", "grad_clip"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not v > 0:
            fail(name, "must be a positive number")
    for name in ("weight_decay", "gamma", "alpha", "mtp_lambda", "mtp_lambda_late", "final_lr_ratio",
                 "tail_lr_ratio"):  # fmt: skip
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or v < 0:
            fail(name, "must be a non-negative number")
    for name in ("batch_ramp", "lr_constant_until", "lr_decay_until", "lr_tail_from", "gamma_until",
                 "mtp_lambda_until", "fim_rate"):  # fmt: skip
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            fail(name, "must be a fraction in [0, 1]")
    if not 0 < c.val_fraction < 1:
        fail("val_fraction", "must be in (0, 1)")
    if not c.lr_constant_until <= c.lr_decay_until <= c.lr_tail_from:
        fail("lr_decay_until", "need lr_constant_until <= lr_decay_until <= lr_tail_from")
    if c.warmup_steps is not None and (not isinstance(c.warmup_steps, int) or c.warmup_steps < 0):
        fail("warmup_steps", "must be a non-negative integer")
    if len(c.betas) != 2 or not all(0 <= b < 1 for b in c.betas):
        fail("betas", "must be two numbers in [0, 1)")
    if c.phase is not None and c.phase not in ("ctx1", "ctx2"):
        fail("phase", "must be None, ctx1 or ctx2")
    if c.precision not in ("auto", "fp32", "bf16", "fp8"):
        fail("precision", "must be one of auto, fp32, bf16, fp8")
    for name in ("batch_start", "batch_end"):
        if getattr(c, name) % c.micro_batch:
            fail(name, f"must be a multiple of micro_batch ({c.micro_batch})")
    if not 0 <= c.seed < 2**63:
        fail("seed", "must be an integer in [0, 2**63)")
    _check_model(c)
    _check_parallel(c)
