"""The training loop: the V3 recipe (§4.2) on the single-device model, data-parallel ready.

Per optimizer step: the global batch (ramped) is split into micro-batches; each runs the full V3
loss (main CE + lambda x MTP CE + alpha x balance loss) and accumulates gradients and per-expert
counts; then the gradients are clipped and applied (AdamW, no decay on norms), and every MoE
layer's routing bias moves by gamma x sign(mean - count) from the counts of the whole step, so a
batch's routing only ever depends on earlier batches. A non-finite loss or gradient skips the step;
`max_bad_steps` in a row stop the run with a checkpoint of the last good state.

Interruption: the first SIGINT (Ctrl-C) or SIGTERM only asks the loop to stop; the step under way
is finished (all ranks agree on the step to stop after), saved, and `TrainingInterrupted` is raised,
so the checkpoint is exactly the one an uninterrupted run would have written at that step. A second
signal stops at once without saving (the previous checkpoint stays).
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dsv3 import ConfigError, ModelConfig, Transformer
from dsv3.checkpoint import load_pretrained, read_config
from dsv3.data.corpus import CorpusError
from dsv3.data.dataset import DataConfig, Dataset, prepare_data
from dsv3.data.loader import PackedLoader, val_batches
from dsv3.model.moe import MoE
from dsv3.optim import param_groups
from dsv3.parallel.materialize import WeightSource
from dsv3.parallel.parallelize import Parallelization, apply_recompute, parallelize, pipeline_chunks  # noqa: F401
from dsv3.train import schedules
from dsv3.train.config import TrainConfig
from dsv3.train.log import RunLog, logged, truncate_logs
from dsv3.train.metrics import matmul_peak as measure_peak
from dsv3.train.metrics import mean_max_violation, train_flops_per_token
from dsv3.train.precision import pick_precision
from dsv3.train.state import (
    TrainCheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from dsv3.train.strategy import Strategy

if TYPE_CHECKING:
    from dsv3.parallel.pipeline.runtime import PipelineRunner


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; a checkpoint of the last good state was written."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a completed step, which was saved to `path`."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at step {step}; saved {path}; continue with --resume")


class StopRequest:
    """While active, SIGINT and SIGTERM set `signum` instead of killing the run; a second one
    raises KeyboardInterrupt (stop now). Only the main thread can own signal handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_first: Callable[[int], None] | None = None) -> None:
        self.signum = 0
        self._on_first = on_first
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        if self._on_first is not None:
            self._on_first(signum)


@dataclass
class StepResult:
    loss: float
    main: float
    mtp: float
    balance: float
    grad_norm: float
    skipped: bool


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        dataset: Dataset | None = None,
        resume: bool = False,
        show_progress: bool = True,
        checkpoint: str | Path | None = None,
        strategy: Strategy | None = None,
        force: bool = False,
    ) -> None:
        """Fresh run, or with `resume` the newest valid checkpoint of cfg.out, or `checkpoint`.
        `strategy` spreads the step over processes (default: one process or plain data parallel).
        `resume` with no valid checkpoint starts afresh only where that loses nothing (no run there
        yet), or with `force` (which discards the run's log and its unusable checkpoints)."""
        self.cfg, self.show = cfg, show_progress
        if strategy is None and cfg.parallel:
            from dsv3.parallel.strategy import build_strategy  # expert parallel, ZeRO-1 (DESIGN §5)

            strategy = build_strategy(**cfg.parallel)
        self.strategy = strategy or Strategy()
        self.rank, self.world = self.strategy.rank, self.strategy.world
        schedules.check_batch(cfg, self.strategy.data_world)  # before any data or model work
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        # the checkpoint is hashed once, here: an explicit one before any data work, the newest valid
        # one by the search; the model and the training state are then loaded without hashing again
        if checkpoint:
            ckpt: Path | None = Path(checkpoint)
            verify_checkpoint(ckpt)
        else:
            ckpt = latest_valid_checkpoint(self.ckpt_root) if resume else None
        self.resumed_from = ckpt
        if ckpt is None and resume:  # nothing to continue from: the run would start over
            self._check_nothing_lost(force)
        torch.manual_seed(cfg.seed)
        if dataset is None:
            dataset = prepare_data(self.data_config(tokenizer=str(ckpt) if ckpt else cfg.tokenizer))
        self.data = dataset
        model_cfg = read_config(Path(ckpt)) if ckpt is not None else self.model_config(dataset)
        # auto: whichever of BF16 and FP32 runs this model's step faster here (rank 0 times it)
        self.precision, self.precision_reason = pick_precision(
            cfg.precision, model_cfg, cfg.micro_batch, cfg.seq_len
        )
        # fp8 keeps a BF16 compute copy on GPUs; on CPUs the FP8 GEMMs are emulated in FP32 and the
        # rest stays FP32, since CPUs without BF16 units run BF16 ~100x slower (docs/fp8.md)
        low = self.precision == "bf16" or (self.precision == "fp8" and torch.cuda.is_available())
        dtype = torch.bfloat16 if low else torch.float32
        # with pipeline stages a rank builds the model on the meta device and fills only its own
        # stages and experts at `parallelize` (from `source`); otherwise the whole model, here
        sliced = cfg.parallel.get("pp", 1) > 1
        source = None
        if ckpt is not None and sliced:
            with torch.device("meta"):
                self.model = Transformer(model_cfg).to(dtype)
            source = WeightSource(Path(ckpt))  # verified above
        elif ckpt is not None:
            self.model = load_pretrained(ckpt, dtype=dtype, verify=False)  # verified above
        else:
            with torch.device("meta" if sliced else "cpu"):
                self.model = Transformer(model_cfg).to(dtype)
            source = WeightSource(Path(cfg.init) if cfg.init else None)
            # --init: weights and gate biases of another run; optimizer and schedule start afresh
            if cfg.init and not sliced:
                from dsv3.train.phases import load_init_weights

                load_init_weights(self.model, cfg.init)
        self.model_cfg = self.model.config
        chunks = pipeline_chunks(cfg.batch_start, cfg.batch_end, cfg.micro_batch, self.strategy.data_world,
                                 cfg.parallel.get("pp", 1))  # fmt: skip
        # precision, recomputation, expert parallelism, pipeline stages (ZeRO-1: at the optimizer)
        self.model = parallelize(
            self.model, Parallelization(self.precision, cfg.recompute, chunks), self.strategy, source
        )
        self.optimizer = self._build_optimizer()
        self.data_rank, self.data_world = self.strategy.data_rank, self.strategy.data_world
        self.loader = PackedLoader(
            dataset.train, cfg.seq_len, seed=cfg.seed, rank=self.data_rank, world_size=self.data_world
        )
        self.step, self.bad_steps, self.tokens_seen, self.skipped_total = 0, 0, 0, 0
        self.saved: tuple[int, Path | None] = (-1, None)  # (step, path) of the last checkpoint written
        if ckpt is not None:
            state, optimizer_state = load_checkpoint(ckpt, verify=False)  # verified above
            self.strategy.load_optimizer_state(self.optimizer, optimizer_state)
            if state.get("dataset_key") != dataset.key:
                raise TrainCheckpointError(
                    f"{ckpt}: trained on other data (dataset key differs); resume with the same data"
                )
            self.loader.load_state_dict(state["loader"])
            self.step, self.bad_steps = state["step"], state["bad_steps"]
            self.tokens_seen, self.skipped_total = state["tokens_seen"], state["skipped_total"]
        self._check_val_split()
        self.flops_per_token = train_flops_per_token(self.model_cfg, cfg.seq_len)
        self.peak = measure_peak(dtype)
        self.main_moe = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        self._token_bytes = dataset.tokenizer.token_bytes()

    @property
    def runner(self) -> PipelineRunner | None:
        """The pipeline runtime that runs the step's schedule with pipeline stages (its `trace`: the
        last step's ops with their times), else None. Read-only: for benchmarks and tests."""
        return getattr(self.strategy, "runner", None)

    @classmethod
    def for_checkpoint(cls, cfg: TrainConfig, path: str | Path) -> Trainer:
        """The state of one checkpoint (e.g. to evaluate it), without a progress bar."""
        return cls(cfg, checkpoint=path, show_progress=False)

    # ---- set-up helpers ---------------------------------------------------------------------------
    def _check_nothing_lost(self, force: bool) -> None:
        """`--resume` found no valid checkpoint: refuse to start over a run that exists unless forced."""
        broken = list_checkpoints(self.ckpt_root)
        log = self.out / "metrics.jsonl"
        if not broken and not log.exists():
            return
        if not force:
            what = f"{len(broken)} checkpoint(s), none valid" if broken else "a training log, no checkpoint"
            raise TrainCheckpointError(
                f"{self.out}: --resume found {what}; starting from step 0 would overwrite the run "
                "(pass --force to start over, or --out for a new run directory)"
            )
        if self.strategy.is_main:
            for path in broken:  # they would otherwise outrank the new run's checkpoints
                shutil.rmtree(path, ignore_errors=True)

    def _check_val_split(self) -> None:
        """Fail before training, not at the first evaluation, when the validation split cannot fill
        one sequence per rank (every run evaluates at its last step)."""
        try:
            next(iter(val_batches(self.data.val, self.cfg.seq_len, 1, world_size=self.data_world)))
        except ValueError as e:
            raise CorpusError(str(e)) from e

    def data_config(self, tokenizer: str | None = None) -> DataConfig:
        vocab = self.cfg.model.get("vocab_size", ModelConfig.from_preset(self.cfg.preset).vocab_size)
        return DataConfig(
            data=self.cfg.data, extra=self.cfg.data_extra, tokenizer=tokenizer, vocab_size=vocab, val_fraction=self.cfg.val_fraction,
            seed=self.cfg.seed, max_bytes=self.cfg.max_corpus_bytes, fim_rate=self.cfg.fim_rate,
            progress=self.show,
        )  # fmt: skip

    def model_config(self, dataset: Dataset) -> ModelConfig:
        overrides = dict(self.cfg.model)
        tok = dataset.tokenizer
        overrides.setdefault("vocab_size", tok.vocab_size)
        overrides.setdefault("bos_token_id", tok.bos_id)
        overrides.setdefault("eos_token_id", tok.eos_id)
        cfg = ModelConfig.from_preset(self.cfg.preset, **overrides)
        if tok.vocab_size > cfg.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}"
            )
        return cfg

    def _build_optimizer(self) -> torch.optim.Optimizer:
        kw = dict(lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps)
        if self.precision == "fp32":
            make = lambda groups: torch.optim.AdamW(groups, foreach=True, **kw)
        else:
            from dsv3.optim import MixedPrecisionAdamW  # FP32 master weights, BF16 moments (§3.3)

            make = lambda groups: MixedPrecisionAdamW(groups, **kw)
        groups = param_groups(self.model, self.cfg.weight_decay)
        return self.strategy.build_optimizer(self.model, make, groups)

    # ---- one optimizer step -----------------------------------------------------------------------
    def train_step(self) -> StepResult:
        cfg, model = self.cfg, self.model
        model.train()
        step = self.step
        batch = schedules.global_batch(cfg, step, self.data_world)
        accum = batch // (cfg.micro_batch * self.data_world)  # micro-batches per data rank (pipeline)
        lam, gamma = schedules.mtp_weight(cfg, step), schedules.bias_update_speed(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = schedules.learning_rate(cfg, step)
        batches = [self.loader.next_batch(cfg.micro_batch) for _ in range(accum)]
        parts, counts = self.strategy.forward_backward(model, batches, lam, cfg.alpha)
        self.strategy.reduce_gradients(model)
        self.strategy.reduce_mean(parts)
        # the bias update must see the whole global batch: one collective for all layers together
        self.strategy.reduce_counts(counts)
        grad_norm = self.strategy.clip_grad_norm(model, cfg.grad_clip)
        skipped = not (math.isfinite(float(parts[0])) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped_total += 1
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.strategy.update_expert_bias(model, gamma, counts)
            self.bad_steps = 0
        self.last_counts = counts
        self.step += 1
        self.tokens_seen += batch * cfg.seq_len
        p = parts.tolist()
        return StepResult(p[0], p[1], p[2], p[3], grad_norm, skipped)

    def _zero_counts(self, layers: int) -> torch.Tensor:
        """Zero token counts [layers, E], to sum a step's (or an evaluation's) `LossOutput.counts` into."""
        device = next(p.device for p in self.model.parameters() if p.device.type != "meta")
        return torch.zeros(layers, self.model_cfg.n_routed_experts, dtype=torch.long, device=device)

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (main and MTP), bits per byte, MaxVio_global over the evaluated set."""
        model, cfg = self.model, self.cfg
        model.eval()
        main_nats = mtp_nats = 0.0
        n_tokens = n_bytes = 0
        counts = self._zero_counts(len(self.main_moe))  # (L_main, E)
        batches = val_batches(
            self.data.val, cfg.seq_len, cfg.micro_batch, rank=self.data_rank, world_size=self.data_world,
            max_batches=cfg.eval_batches,
        )  # fmt: skip
        for batch in batches:
            main, mtp, layer_counts = self.strategy.eval_loss(model, batch)
            labels = batch[:, 1:]
            n = labels.numel()
            main_nats += main * n
            mtp_nats += mtp * n
            n_tokens += n
            n_bytes += int(self._token_bytes[labels.numpy().astype(np.int64)].sum())
            counts += layer_counts[: len(self.main_moe)]  # main layers first (`moe_layers()` order)
        totals = self.strategy.reduce_sum(
            torch.tensor([main_nats, mtp_nats, n_tokens, n_bytes], dtype=torch.float64)
        )
        self.strategy.reduce_counts(counts)
        main_nats, mtp_nats, n_tokens, n_bytes = totals.tolist()
        self.val_counts = counts
        loss = main_nats / n_tokens
        return {
            "val_loss": loss,
            "val_mtp_loss": mtp_nats / n_tokens,
            "bits_per_byte": main_nats / math.log(2) / max(n_bytes, 1),
            "maxvio_global": mean_max_violation(counts),
            "tokens": int(n_tokens),
        }

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write a checkpoint (every rank takes part in gathering; the main rank writes)."""
        model = self.strategy.full_model(self.model)
        optimizer_state = self.strategy.optimizer_state(self.optimizer)
        if not self.strategy.is_main:
            self.saved = (self.step, None)
            return None
        state = {
            "step": self.step, "bad_steps": self.bad_steps, "tokens_seen": self.tokens_seen,
            "skipped_total": self.skipped_total, "loader": self.loader.state_dict(),
            "dataset_key": self.data.key, "precision": self.precision, "config": self.cfg.to_dict(),
        }  # fmt: skip
        path = save_checkpoint(
            self.ckpt_root,
            self.step,
            model,
            optimizer_state,
            state,
            self.data.tokenizer,
            self.cfg.keep_last,
        )
        self.saved = (self.step, path)
        return path

    # ---- the run ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to cfg.steps with logging, periodic evaluation and checkpoints; returns the last eval.
        SIGINT/SIGTERM: the current step is finished and saved, then TrainingInterrupted is raised."""
        cfg = self.cfg
        keep_until = self.step if self.resumed_from else None
        if self.strategy.is_main:
            truncate_logs(self.out, keep_until)
        log = RunLog(
            self.out,
            cfg.steps,
            self.step,
            cfg.tensorboard and self.strategy.is_main,
            self.show and self.strategy.is_main,
            purge_after=keep_until,
        )
        if self.step == 0 and self.strategy.is_main:
            log.write("run", 0, {"precision": self.precision, "precision_reason": self.precision_reason,
                                 "params": self.model.num_params(), **self.data.stats})  # fmt: skip
        last_eval: dict[str, float] = {}
        if self.strategy.is_main and self.strategy.describe():
            log.message(self.strategy.describe())
        # a kill between a checkpoint and the evaluation of its step lost that step's eval record
        missing = self.strategy.is_main and not logged(self.out, "eval", self.step)
        if self.resumed_from is not None and self._eval_due() and self._any_rank(missing):
            if self.strategy.is_main:
                log.message(
                    f"step {self.step}: its evaluation was not logged before the run stopped; running it"
                )
            last_eval = self._evaluate_and_log(log)

        def on_signal(signum: int) -> None:
            log.message(f"{signal.Signals(signum).name}: stopping after the step under way, then saving "
                        "(send it again to stop at once without saving)")  # fmt: skip

        try:
            with StopRequest(on_signal) as stop:
                while self.step < cfg.steps:
                    self._one_step(log)
                    if self._eval_due():
                        last_eval = self._evaluate_and_log(log)
                    if self._any_rank(bool(stop.signum)):
                        path = self.saved[1] if self.saved[0] == self.step else self.save()
                        raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.step, path)
        except KeyboardInterrupt:
            # a second signal, mid-step: the state is not a step boundary, so nothing is saved
            last = latest_valid_checkpoint(self.ckpt_root) if self.strategy.is_main else None
            log.message(
                f"stopped at once during step {self.step + 1}, not saved; the last checkpoint is {last}"
            )
            raise
        finally:
            log.close()
        return last_eval

    def _one_step(self, log: RunLog) -> None:
        """One optimizer step, its log line, and its checkpoint when due. The
        checkpoint comes before any evaluation of the same step, so a failing evaluation loses nothing."""
        cfg = self.cfg
        t0 = time.perf_counter()
        r = self.train_step()
        dt = time.perf_counter() - t0
        tokens = schedules.global_batch(cfg, self.step - 1, self.data_world) * cfg.seq_len
        if self.strategy.is_main and (self.step % cfg.log_every == 0 or r.skipped):
            values = {
                "loss": r.loss, "main_loss": r.main, "mtp_loss": r.mtp, "balance_loss": r.balance,
                "lr": schedules.learning_rate(cfg, self.step - 1), "grad_norm": r.grad_norm,
                "tokens_per_s": tokens / dt, "mfu": tokens / dt * self.flops_per_token / self.peak,
                "maxvio_batch": mean_max_violation(self.last_counts[: len(self.main_moe)]),
                "batch": tokens // cfg.seq_len, "tokens_seen": self.tokens_seen, "skipped": r.skipped,
            }  # fmt: skip
            log.write("train", self.step, values)
            log.progress(self.step, {"loss": f"{r.main:.3f}", "tok/s": f"{tokens / dt:.0f}"})
        if r.skipped:
            log.message(
                f"step {self.step}: non-finite loss or gradient, step skipped ({self.bad_steps} in a row)"
            )
            if self.bad_steps >= cfg.max_bad_steps:
                path = self.save()
                raise TrainingDiverged(
                    f"{self.bad_steps} consecutive non-finite steps at step {self.step}; "
                    f"the last good state is saved in {path}. "
                    "Lower the learning rate or check the data."
                )
        if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
            self.save()

    def _evaluate_and_log(self, log: RunLog) -> dict[str, float]:
        result = self.evaluate()
        if self.strategy.is_main:
            log.write("eval", self.step, result)
            log.expert_load(self.step, [c.tolist() for c in self.val_counts])
            log.message(f"step {self.step}: val loss {result['val_loss']:.3f}, "
                        f"bpb {result['bits_per_byte']:.3f}, MaxVio {result['maxvio_global']:.3f}")  # fmt: skip
        return result

    def _eval_due(self) -> bool:
        return self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank, e.g. a stop signal: every rank must stop after the same
        step, or the save's gathers would wait for ranks that went on training."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        return bool(self.strategy.reduce_sum(t)[0] > 0)
