"""`dsv3 distill-mtp`: train MTP module 1 of a checkpoint on the model's own greedy continuations,
so that it drafts what the main model will say (speculative decoding, DESIGN §3.6, §8).

MTP module 1 at position i reads h_i and token t_{i+1} and predicts t_{i+2} (paper §2.2). In greedy
speculative decoding its draft is accepted when it equals the main model's greedy token at i + 1,
so the right training targets are the main model's own greedy outputs, not the corpus: that is
self-distillation, as draft heads are usually trained (the EAGLE and Medusa recipes train on the
target model's outputs). Here:
1. prompts: windows of the checkpoint's training split (a training checkpoint's trainer.json names
   its data) or random ids; the main model continues each greedily (the engine, batched);
2. only MTP module 1's own parameters train (eh_proj, its norms, its block, shared_head.norm); the
   embedding and the output head are the main model's and stay frozen, so the main model, and with
   it every greedy output, is unchanged;
3. the loss is the module's cross-entropy on the continuation positions only (the targets the main
   model produced), AdamW, a cosine schedule;
4. a held-out share of the sequences measures the draft's agreement with the main model (argmax of
   the MTP logits == the main model's next greedy token): the first-draft acceptance of greedy
   speculative decoding, before and after.
The result is a checkpoint directory (the main model's weights as they were, the new MTP module,
the tokenizer) and a JSON report.

Shapes: N sequences, T tokens each (prompt P + continuation), B batch, D dim, V vocab.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dsv3.model.transformer import Transformer, mtp_shift, token_cross_entropy

IGNORE = -100


@dataclass
class DistillReport:
    sequences: int
    held_out: int
    prompt_len: int
    new_tokens: int
    steps: int
    agreement_before: float  # held-out share of continuation positions where the draft = the model's token
    agreement_after: float
    loss_first: float
    loss_last: float
    generate_s: float
    train_s: float


def greedy_sequences(ckpt: str | Path, prompts: list[list[int]], new: int) -> torch.Tensor:
    """Each prompt followed by the main model's greedy continuation of `new` tokens: [N, P + new]."""
    from dsv3.infer.llm import LLM
    from dsv3.infer.sampling import SamplingParams

    llm = LLM(ckpt, verify=False, max_num_seqs=64, max_num_batched_tokens=4096)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    outs = llm.generate(prompts, params)
    return torch.tensor([p + o.token_ids for p, o in zip(prompts, outs)])


def mtp_targets(seqs: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs [N, T-1], MTP-1 input tokens [N, T-1] and targets [N, T-1] (IGNORE outside the
    continuation): at position i the module reads t_{i+1} and predicts t_{i+2}, a target only when
    t_{i+2} is a generated token (index >= prompt_len)."""
    ids, labels = seqs[:, :-1], seqs[:, 1:]
    next_ids, targets = mtp_shift(labels, 1)
    positions = torch.arange(targets.shape[1])
    return ids, next_ids, targets.masked_fill((positions + 2 < prompt_len)[None], IGNORE)


def mtp_parameters(model: Transformer) -> list[torch.nn.Parameter]:
    """MTP module 1's own parameters (the embedding and the head are the main model's)."""
    return list(model.mtp[0].parameters())


@torch.no_grad()
def agreement(model: Transformer, seqs: torch.Tensor, prompt_len: int, batch: int = 16) -> float:
    """Share of continuation positions where MTP module 1's argmax equals the main model's greedy token."""
    hit = total = 0
    for s in range(0, len(seqs), batch):
        ids, next_ids, targets = mtp_targets(seqs[s : s + batch], prompt_len)
        h = model.mtp_hidden(1, model.hidden_states(ids), next_ids)
        draft = model.mtp_logits(1, h).argmax(-1)
        keep = targets != IGNORE
        hit += int((draft[keep] == targets[keep]).sum())
        total += int(keep.sum())
    return hit / max(total, 1)


def distill(
    model: Transformer,
    seqs: torch.Tensor,
    prompt_len: int,
    steps: int,
    batch: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train MTP module 1 in place on seqs [N, T] (the model's greedy continuations after
    prompt_len prompt tokens); everything else is frozen. Returns the loss of every step."""
    if not len(model.mtp):
        raise ValueError("the checkpoint has no MTP module (num_nextn_predict_layers is 0)")
    params = mtp_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    ids, next_ids, targets = mtp_targets(seqs, prompt_len)
    with torch.no_grad():  # the main model is frozen: its hidden states once, not per step
        hidden = torch.cat([model.hidden_states(ids[s : s + batch]) for s in range(0, len(ids), batch)])
    gen = torch.Generator().manual_seed(seed)
    bar = _bar(steps, progress)
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(seqs), (batch,), generator=gen)
        h1 = model.mtp_hidden(1, hidden[rows], next_ids[rows])
        loss = token_cross_entropy(model.mtp_logits(1, h1), targets[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="distill MTP", unit="step", disable=not enabled, file=sys.stderr)


def prompts_for(ckpt: Path, n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """n windows of `length` tokens of the training split named by the checkpoint's trainer.json
    (its held-out split is left for measuring), else random ids."""
    meta = ckpt / "trainer.json"
    gen = torch.Generator().manual_seed(seed)
    if not meta.exists():
        return torch.randint(2, vocab, (n, length), generator=gen).tolist()
    import numpy as np

    from dsv3.data.dataset import DataConfig, prepare_data

    saved = json.loads(meta.read_text())["config"]
    data = prepare_data(DataConfig(data=saved["data"], tokenizer=str(ckpt), seed=saved["seed"],
                                   val_fraction=saved["val_fraction"], fim_rate=saved["fim_rate"]))  # fmt: skip
    tokens = torch.from_numpy(np.array(data.train.tokens))
    starts = torch.randint(0, len(tokens) - length, (n,), generator=gen)
    return [tokens[s : s + length].tolist() for s in starts]


def distill_mtp_main(argv: list[str] | None = None) -> int:
    from dsv3.checkpoint import load_pretrained, save_pretrained
    from dsv3.cli import positive_int
    from dsv3.threads import add_threads_argument, configure_threads

    p = argparse.ArgumentParser(prog="dsv3 distill-mtp", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint directory with an MTP module (and tokenizer.json)")
    p.add_argument("--out", required=True, help="directory for the checkpoint with the distilled MTP module")
    p.add_argument("--sequences", type=positive_int, default=512, help="greedy continuations to generate")
    p.add_argument("--held-out", type=positive_int, default=64, help="of them, kept for measuring")
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--new", type=positive_int, default=96, help="greedy tokens per prompt")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)
    args = p.parse_args(argv)
    ckpt, out = Path(args.ckpt), Path(args.out)
    if args.held_out >= args.sequences:
        p.error(f"--held-out: {args.held_out} must be below --sequences ({args.sequences})")
    if out.resolve() == ckpt.resolve():
        p.error("--out: must differ from the checkpoint (it is written anew)")
    configure_threads("dsv3 distill-mtp", args.threads)
    cfg = json.loads((ckpt / "config.json").read_text())
    if not cfg.get("num_nextn_predict_layers"):
        p.error(f"{ckpt}: the checkpoint has no MTP module (num_nextn_predict_layers is 0)")
    t0 = time.perf_counter()
    prompts = prompts_for(ckpt, args.sequences, args.prompt_len, cfg["vocab_size"], args.seed)
    seqs = greedy_sequences(ckpt, prompts, args.new)
    t1 = time.perf_counter()
    train, held = seqs[args.held_out :], seqs[: args.held_out]
    model = load_pretrained(ckpt)
    before = agreement(model, held, args.prompt_len)
    losses = distill(model, train, args.prompt_len, args.steps, args.batch, args.lr, args.seed)
    after = agreement(model, held, args.prompt_len)
    t2 = time.perf_counter()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(cfg.get("torch_dtype"), None)
    save_pretrained(model, out, dtype=dtype)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (ckpt / name).exists():
            shutil.copy2(ckpt / name, out / name)
    report = DistillReport(len(train), len(held), args.prompt_len, args.new, args.steps, before, after,
                           losses[0], losses[-1], t1 - t0, t2 - t1)  # fmt: skip
    (out / "distill_mtp.json").write_text(json.dumps(asdict(report), indent=2))
    print(f"MTP draft agreement with the main model's greedy tokens (held-out {len(held)} sequences): "
          f"{before:.1%} -> {after:.1%}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; wrote {out}")  # fmt: skip
    return 0
