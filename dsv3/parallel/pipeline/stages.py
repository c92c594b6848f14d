"""The single-device model cut into pipeline stages, applied from outside (DESIGN §5).

Stage s runs a contiguous range of the main model's blocks. Stage 0 also holds the embedding; the
last stage holds the final norm, the output head and the MTP modules, and computes the loss
(§2.2: CE_main + lambda * mean_k CE_k). The MTP modules read Emb(t_{i+k}), so the last stage also
holds the embedding: with DualPipe / DualPipeV it is the very same Parameter as stage 0's (the two
stages live on one rank, DESIGN §5 "shared physically"; DualPipe has two such ranks, whose copies
are summed like those of every stage); with 1F1B / ZB1P the first and the last rank each hold a
copy and the runtime sums their gradients.

Split rule (`split_layers`): the n_layers main blocks and the D MTP modules (each one block plus a
head) count as n_layers + D units, cut into S contiguous ranges as evenly as integers allow; the
MTP units always fall in the last range. V3's 61 layers + 1 MTP on 16 stages: 62 units, ranges of 3
or 4 (blocks per stage 3, 4, 4, 4, 4, 4, 4, 4, 3, 4, 4, 4, 4, 4, 4, 3 with the MTP module on the last).
This counts a block as a unit and ignores the embedding and the heads; a real deployment would
weigh the stages by measured time (`split_layers` is the place to change).

Balance loss (§2.1.2): every MoE layer records its sequence-wise balance loss in its forward; a
stage collects those of its own layers, right after its forward (the next micro-batch overwrites
them), and adds alpha * their sum to what its backward differentiates. So the gradient of the
whole loss reaches every stage's router without sending anything but hidden states between ranks.

Shapes: b micro-batch sequences, T tokens, D dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv3.errors import Dsv3Error
from dsv3.model.moe import MoE
from dsv3.model.transformer import Transformer, mtp_shift, token_cross_entropy


class StageError(Dsv3Error, ValueError):
    """The model cannot be cut as asked; the message names the argument and its value."""


@dataclass(frozen=True)
class StageLayout:
    layers: tuple[range, ...]  # main-model blocks of each stage; the MTP modules go to the last

    @property
    def num_stages(self) -> int:
        return len(self.layers)


def split_layers(n_layers: int, n_mtp: int, num_stages: int) -> StageLayout:
    """Cut n_layers blocks + n_mtp MTP modules into `num_stages` contiguous, nearly equal ranges."""
    units = n_layers + n_mtp
    if num_stages < 1 or num_stages > units:
        raise StageError(
            f"num_stages: every stage needs at least one block; {n_layers} layers + {n_mtp} MTP modules "
            f"cannot make {num_stages} stages"
        )
    bounds = [min(i * units // num_stages, n_layers) for i in range(num_stages)] + [n_layers]
    return StageLayout(tuple(range(bounds[i], bounds[i + 1]) for i in range(num_stages)))


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, T]
    labels: torch.Tensor  # [b, T]; label i is the token after input i, IGNORE_INDEX if none


@dataclass
class StageOutput:
    hidden: torch.Tensor | None  # [b, T, D] for the next stage; None on the last stage
    loss: torch.Tensor  # this stage's share of the micro-batch loss, to back-propagate (a scalar)
    parts: torch.Tensor  # detached float64 [4]: total, main CE, MTP CE (mean over depths), balance


class PipelineStage(nn.Module):
    """One stage of a `Transformer`, sharing its modules (and so its Parameters)."""

    def __init__(
        self,
        model: Transformer,
        index: int,
        layout: StageLayout,
        mtp_lambda: float,
        balance_alpha: float,
    ) -> None:
        super().__init__()
        self.index, self.num_stages = index, layout.num_stages
        self.is_first, self.is_last = index == 0, index == layout.num_stages - 1
        self.mtp_lambda, self.balance_alpha = mtp_lambda, balance_alpha
        needs_embedding = self.is_first or (self.is_last and len(model.mtp) > 0)
        self.embed_tokens = model.embed_tokens if needs_embedding else None
        self.layers = nn.ModuleList(model.layers[i] for i in layout.layers[index])
        if self.is_last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        self.rotary = model.rotary  # frequencies only (a buffer), recomputed per stage from positions

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, x: torch.Tensor | None, mb: MicroBatch) -> StageOutput:
        """x [b, T, D] from the previous stage (None on stage 0, which embeds mb.input_ids)."""
        ids = mb.input_ids
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)  # (b, T)
        cos, sin = self.rotary(positions)
        h = self.embed_tokens(ids) if self.is_first else x
        for layer in self.layers:
            h = layer(h, cos, sin, positions)
        zero = h.new_zeros((), dtype=torch.float32)
        main = mtp = zero
        if self.is_last:
            main, mtp = self.head_losses(h, mb.labels, cos, sin, positions)
        balance = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        bal = torch.stack(balance).sum() if balance else zero
        loss = main + self.mtp_lambda * mtp + self.balance_alpha * bal
        parts = torch.stack([loss, main, mtp, bal]).detach().double()
        return StageOutput(None if self.is_last else h, loss, parts)

    def head_losses(
        self,
        h: torch.Tensor,
        labels: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Main CE and the mean MTP CE, as `Transformer.loss` computes them (§2.2): h [b, T, D] the
        last block's output, labels [b, T]; cos/sin/positions as the blocks take them."""
        h = self.norm(h)
        main = token_cross_entropy(self.lm_head(h), labels)
        per_depth = []
        for k, module in enumerate(self.mtp, start=1):
            next_ids, targets = mtp_shift(labels, k)  # reads t_{i+k}, predicts t_{i+k+1}
            h = module(h, self.embed_tokens(next_ids), cos, sin, positions)
            per_depth.append(token_cross_entropy(self.lm_head(module.shared_head.norm(h)), targets))
        mtp = torch.stack(per_depth).mean() if per_depth else main.new_zeros(())
        return main, mtp


def stage_parameter_names(model: Transformer, layout: StageLayout, index: int) -> list[str]:
    """Full-model names of the Parameters stage `index` uses (to know which ranks share a weight)."""
    ids = {id(p) for p in PipelineStage(model, index, layout, 0.0, 0.0).parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def split_batch(input_ids: torch.Tensor, labels: torch.Tensor | None, chunks: int) -> list[MicroBatch]:
    """input_ids [B, T] with labels [B, T], or packed [B, T+1] alone -> `chunks` micro-batches of B/chunks."""
    if labels is None:
        input_ids, labels = input_ids[:, :-1], input_ids[:, 1:]
    if labels.shape != input_ids.shape:
        raise StageError(f"labels: shape {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}")
    if input_ids.shape[0] % chunks:
        raise StageError(
            f"input_ids: a batch of {input_ids.shape[0]} sequences does not split into chunks={chunks} "
            "equal micro-batches"
        )
    return [MicroBatch(ids, lab) for ids, lab in zip(input_ids.chunk(chunks), labels.chunk(chunks))]
