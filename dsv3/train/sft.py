"""`dsv3 sft`: supervised fine-tuning on chat conversations (§5.1), the V3 post-training schedule
scaled: 2 epochs, cosine decay of the learning rate from 5e-6 to 1e-6 (§5.1.1).

Scaled: the peak is the init run's pre-training lr times 5e-6 / 2.2e-4 (the paper's SFT peak over
its pre-training peak), the end 1/5 of the peak (1e-6 / 5e-6); a checkpoint without a training
state (no trainer.json) uses the paper's 5e-6 as it is. `--lr` sets the peak.

Data: one conversation per row, right-padded (dsv3.data.chat.batch): no packing, so no attention
between conversations; the loss is the main cross-entropy (plus lambda x MTP) on assistant tokens
only. The routing biases stay as pre-training left them (gamma = 0, as at the end of pre-training).
A held-out share of the conversations gives the chat loss before and after. A tokenizer without
the chat special tokens is migrated first (dsv3.data.chat.add_chat_tokens, resize_vocab).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3 import paper
from dsv3.checkpoint import load_pretrained
from dsv3.config import ConfigError
from dsv3.train.phases import pretraining_lr, run_config

SFT_PEAK_LR, SFT_FINAL_LR = 5e-6, 1e-6  # §5.1.1
SFT_EPOCHS = 2


@dataclass(frozen=True)
class SFTConfig:
    init: str
    data: str
    out: str = "runs/sft"
    epochs: int = SFT_EPOCHS
    lr: float | None = None  # None: scaled from the init run (module docstring)
    final_lr_ratio: float = SFT_FINAL_LR / SFT_PEAK_LR
    batch: int = 8  # conversations per step
    seq_len: int | None = None  # tokens per conversation at most; None: the model's max_seq_len
    val_fraction: float = 0.1
    max_val: int = 256  # held-out rows at most (a large data set's held-out loss is timed twice)
    seed: int = 0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    progress: bool = True  # a tqdm bar over the steps (stderr)
    weight_decay: float = paper.WEIGHT_DECAY
    grad_clip: float = paper.GRAD_CLIP
    mtp_lambda: float = paper.MTP_LAMBDA_LATE
    alpha: float = paper.BALANCE_LOSS_ALPHA

    def __post_init__(self) -> None:
        for name in ("epochs", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive integer (got {getattr(self, name)!r})")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr: must be positive (got {self.lr!r})")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in (0, 1) (got {self.val_fraction!r})")


def init_train_config(cfg: SFTConfig) -> dict[str, Any] | None:
    """The TrainConfig fields of the run behind the init checkpoint (None without a training state;
    through an SFT init, the run behind that one)."""
    state = Path(cfg.init) / "trainer.json"
    return run_config(json.loads(state.read_text())) if state.is_file() else None


def init_pretraining_lr(cfg: SFTConfig) -> float | None:
    """The pre-training peak lr behind the init checkpoint (None without a training state)."""
    saved = init_train_config(cfg)
    return None if saved is None else pretraining_lr(saved)


def peak_lr(cfg: SFTConfig) -> float:
    if cfg.lr is not None:
        return cfg.lr
    base = init_pretraining_lr(cfg)
    return SFT_PEAK_LR if base is None else base * SFT_PEAK_LR / paper.PEAK_LR


def cosine_lr(peak: float, final: float, step: int, total: int) -> float:
    """Cosine from `peak` at step 0 to `final` at the last step."""
    if total <= 1:
        return peak
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * step / (total - 1)))


def split(conversations: list, val_fraction: float, seed: int, max_val: int = 256) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(conversations)).tolist()
    n_val = max(1, min(max_val, round(val_fraction * len(conversations))))
    if n_val >= len(conversations):
        raise ConfigError(
            f"data: {len(conversations)} conversation(s) leave none to train on after the held-out share"
        )
    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]


@torch.no_grad()
def chat_loss(model, tok, conversations: list, seq_len: int, batch: int) -> float:
    """Mean cross-entropy per assistant token over `conversations` (the held-out chat loss)."""
    from dsv3.data.chat import batch as make_batch
    from dsv3.model.transformer import IGNORE_INDEX

    model.eval()
    nats, count = 0.0, 0
    for i in range(0, len(conversations), batch):
        inputs, labels = make_batch(tok, conversations[i : i + batch], seq_len)
        logits = model(inputs).float()
        keep = labels != IGNORE_INDEX
        nats += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return nats / max(count, 1)


def run_sft(cfg: SFTConfig, log=print) -> dict[str, Any]:
    from dsv3.data.chat import add_chat_tokens, read_conversations, resize_vocab
    from dsv3.data.chat import batch as make_batch
    from dsv3.data.tokenizer import Tokenizer
    from dsv3.optim import param_groups
    from dsv3.train.state import save_checkpoint

    torch.manual_seed(cfg.seed)
    model = load_pretrained(cfg.init)
    tok, added = add_chat_tokens(Tokenizer.load(cfg.init))
    if added:
        resize_vocab(model, tok.vocab_size)
        log(
            f"migrated the tokenizer: <｜User｜> = {tok.user_id}, <｜Assistant｜> = {tok.assistant_id} (special tokens)"
        )
    seq_len = min(cfg.seq_len or model.config.max_seq_len, model.config.max_seq_len)
    train, val = split(read_conversations(cfg.data), cfg.val_fraction, cfg.seed, cfg.max_val)
    steps_per_epoch = math.ceil(len(train) / cfg.batch)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    peak = peak_lr(cfg)
    final = peak * cfg.final_lr_ratio
    before = chat_loss(model, tok, val, seq_len, cfg.batch)
    log(
        f"held-out chat loss before: {before:.4f} ({len(val)} conversations); {total} steps, lr {peak:.3g} -> {final:.3g}"
    )
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak, betas=paper.ADAMW_BETAS)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl", "w")
    rng = np.random.default_rng(cfg.seed)
    step, t0 = 0, time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=total, desc="sft", unit="step", disable=not cfg.progress)
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(train)).tolist()
        for i in range(0, len(order), cfg.batch):
            if step >= total:
                break
            inputs, labels = make_batch(tok, [train[j] for j in order[i : i + cfg.batch]], seq_len)
            lr = cosine_lr(peak, final, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            loss = model.loss(inputs, labels, mtp_lambda=cfg.mtp_lambda, balance_alpha=cfg.alpha)
            if torch.isfinite(loss.total):
                loss.total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            row = {"kind": "sft", "step": step, "epoch": epoch, "loss": float(loss.main.detach()), "lr": lr}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
    bar.close()
    metrics.close()
    after = chat_loss(model, tok, val, seq_len, cfg.batch)
    log(f"held-out chat loss after: {after:.4f} ({time.perf_counter() - t0:.1f} s)")
    state = {"step": step, "phase": "sft", "val_chat_loss_before": before, "val_chat_loss_after": after,
             "config": {**dataclasses.asdict(cfg), "seq_len": seq_len, "phase": "sft", "lr": peak},
             "train_config": init_train_config(cfg) or {}}  # fmt: skip
    path = save_checkpoint(out / "checkpoints", step, model, opt.state_dict(), state, tok, keep_last=1)
    return {
        "steps": step,
        "val_chat_loss_before": before,
        "val_chat_loss_after": after,
        "checkpoint": str(path),
    }


def sft_main(argv: list[str] | None = None) -> int:
    from dsv3.cli import existing_dir, positive_int
    from dsv3.threads import add_threads_argument, configure_threads

    p = argparse.ArgumentParser(prog="dsv3 sft", description="Chat SFT on JSONL conversations (V3 format).")
    p.add_argument("--init", required=True, help="the checkpoint to fine-tune")
    p.add_argument(
        "--data",
        required=True,
        help='JSONL, one {"messages": [...]} or {"prompt": ..., "completion": ...} per line (dsv3 synth makes both)',
    )
    p.add_argument("--out", default="runs/sft")
    p.add_argument("--epochs", type=positive_int, default=SFT_EPOCHS)
    p.add_argument("--lr", type=float, help="peak learning rate (default: scaled from the init run)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int)
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)
    args = p.parse_args(argv)
    existing_dir("--init", args.init)
    configure_threads("dsv3 sft", args.threads)
    cfg = SFTConfig(init=args.init, data=args.data, out=args.out, epochs=args.epochs, lr=args.lr,
                    batch=args.batch, seq_len=args.seq_len, max_steps=args.max_steps, seed=args.seed)  # fmt: skip
    print(json.dumps(run_sft(cfg), indent=2))
    return 0


if __name__ == "__main__":
    from dsv3.errors import run_cli

    sys.exit(run_cli("dsv3 sft", sft_main))
