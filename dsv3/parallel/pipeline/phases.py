"""One micro-batch through one stage, as one piece (`StagePass`) or phase by phase (`PhasedPass`).

DualPipe overlaps a forward chunk with a backward chunk by cutting each into the phases of
§3.2.1 / Figure 4 and interleaving them, so that one micro-batch's all-to-all runs while the other
computes. A block's phases:

    attention  (compute)  h = h + MLA(norm(h))
    dispatch   (comm)     route (gate, balance loss, sort by expert), gather token rows per expert:
                          with expert parallelism, the all-to-all to the experts' ranks
    mlp        (compute)  routed experts (grouped GEMMs) and shared experts; a dense block's FFN
    combine    (comm)     scatter rows back to token order, weight by the gate values, add
                          shared + residual: with expert parallelism, the all-to-all back

plus `embed` on the first stage and `head` (final norm, output head, MTP modules, loss) on the last.
A dense block has attention and mlp only; an MoE of another class (expert parallel) is one `moe`
phase, its forward and all-to-alls kept whole, until it exposes its halves. The phases call the
model's own modules and functions (gate, experts, `sort_by_expert`, `balance_loss`) in the order
`MoE.forward` does, so the result is the same; `StagePass` (one `PipelineStage.forward`) is the
reference they are tested against.

Backward phase by phase: every phase boundary cuts the autograd graph (the next phase starts from
detached leaves), each phase keeps (input leaves, outputs, loss term), and its backward is one
`autograd.backward` from its outputs' gradients (plus its own loss term: a dispatch's alpha *
balance loss, the head's CE terms) to its input leaves' gradients, which feed the phase before.

Shapes: b micro-batch sequences, T tokens, N = b*T, D dim, K routed experts per token, M = N*K.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dsv3.model.moe import MoE, balance_loss, sort_by_expert
from dsv3.model.moe import combine as combine_experts
from dsv3.model.transformer import Block
from dsv3.parallel.pipeline.stages import MicroBatch, PipelineStage

COMPUTE, COMM = "compute", "comm"
State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Phase:
    name: str  # embed, attention, dispatch, mlp, combine, head
    kind: str  # COMPUTE or COMM (what it would be with expert parallelism)
    run: Callable[[State], tuple[State, torch.Tensor | None]]  # state -> (state, weighted loss term)


def _backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    keep = [(t, g) for t, g in zip(tensors, grads) if t.requires_grad and g is not None]
    if keep:
        torch.autograd.backward([t for t, _ in keep], [g for _, g in keep])


class StagePass:
    """The reference: the stage's forward as one piece, its backward as one autograd call."""

    def __init__(self, stage: PipelineStage, x: torch.Tensor | None, mb: MicroBatch) -> None:
        self.stage, self.x, self.mb = stage, x, mb
        self.hidden: torch.Tensor | None = None
        self.parts = torch.zeros(4, dtype=torch.float64)

    def forward_steps(self) -> Iterator[str]:
        out = self.stage(self.x, self.mb)
        self.hidden, self._loss, self.parts = out.hidden, out.loss, out.parts
        yield "stage"

    def backward_steps(self, grad: Callable[[], torch.Tensor | None], scale: float) -> Iterator[str]:
        """`grad()` fetches the output gradient (called when first needed; None on the last stage)."""
        loss = self._loss * scale
        tensors, grads = [loss], [torch.ones_like(loss)]
        if self.hidden is not None:
            tensors.append(self.hidden)
            grads.append(grad())
        _backward(tensors, grads)
        yield "stage"

    @property
    def input_grad(self) -> torch.Tensor | None:
        return None if self.x is None else self.x.grad


class PhasedPass(StagePass):
    """The same computation cut at phase boundaries, so a scheduler can interleave two passes."""

    def __init__(self, stage: PipelineStage, x: torch.Tensor | None, mb: MicroBatch) -> None:
        super().__init__(stage, x, mb)
        self.phases = stage_phases(stage, mb, self.parts)
        self._saved: list[tuple[State, State, torch.Tensor | None]] = []
        self._input_grad: torch.Tensor | None = None

    def forward_steps(self) -> Iterator[str]:
        state: State = () if self.x is None else (self.x,)
        for phase in self.phases:
            inputs = tuple(_cut(t) for t in state)
            state, loss = phase.run(inputs)
            self._saved.append((inputs, state, loss))
            yield phase.name
        self.hidden = state[0] if state else None

    def backward_steps(self, grad: Callable[[], torch.Tensor | None], scale: float) -> Iterator[str]:
        grads: tuple[torch.Tensor | None, ...] | None = None
        for phase, (inputs, outputs, loss) in zip(reversed(self.phases), reversed(self._saved)):
            if grads is None:  # the last phase: the stage's output gradient, fetched only now
                grads = (grad(),) if outputs else ()
            tensors, gs = list(outputs), list(grads)
            if loss is not None:
                tensors.append(loss * scale)
                gs.append(torch.ones_like(tensors[-1]))
            _backward(tensors, gs)
            grads = tuple(t.grad if t.requires_grad else None for t in inputs)
            yield phase.name
        self._saved.clear()
        self._input_grad = grads[0] if grads else None

    @property
    def input_grad(self) -> torch.Tensor | None:
        return self._input_grad


def _cut(t: torch.Tensor) -> torch.Tensor:
    """A phase boundary: a fresh leaf for tensors that carry gradients, the tensor itself otherwise."""
    return t.detach().requires_grad_() if t.requires_grad else t


def stage_phases(stage: PipelineStage, mb: MicroBatch, parts: torch.Tensor) -> list[Phase]:
    """The phases of `stage` for `mb`; `parts` [total, main, mtp, balance] accumulates the loss terms."""
    ids = mb.input_ids
    positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)  # (b, T)
    cos, sin = stage.rotary(positions)
    phases = []
    if stage.is_first:
        phases.append(Phase("embed", COMPUTE, lambda s: ((stage.embed_tokens(mb.input_ids),), None)))
    for block in stage.layers:
        phases += _block_phases(block, cos, sin, positions, stage.balance_alpha, parts)
    if stage.is_last:
        phases.append(Phase("head", COMPUTE, lambda s: _head(stage, s, mb, cos, sin, positions, parts)))
    return phases


def _block_phases(block: Block, cos, sin, positions, alpha: float, parts: torch.Tensor) -> list[Phase]:
    def attention(s: State):
        (h,) = s
        return (h + block.self_attn(block.input_layernorm(h), cos, sin, positions),), None

    def whole_ffn(s: State):
        return (s[0] + block.mlp(block.post_attention_layernorm(s[0])),), None

    if not isinstance(block.mlp, MoE):
        return [Phase("attention", COMPUTE, attention), Phase("mlp", COMPUTE, whole_ffn)]
    if type(block.mlp) is not MoE:  # e.g. expert-parallel: its all-to-alls live inside its forward
        return [Phase("attention", COMPUTE, attention), Phase("moe", COMM, whole_ffn)]
    moe: MoE = block.mlp

    def dispatch(s: State):
        (h,) = s
        b, t, d = h.shape
        y = block.post_attention_layernorm(h).reshape(b * t, d)  # (N, D)
        weights, indices, scores = moe.gate(y)  # (N, K), (N, K), (N, E)
        loss = None
        moe.balance_loss = None
        if moe.training and torch.is_grad_enabled():
            moe.balance_loss = balance_loss(scores, indices, b, moe.top_k)
            loss = alpha * moe.balance_loss
            zero = loss.new_zeros(())
            parts.add_(torch.stack([loss, zero, zero, moe.balance_loss]).detach().double())
        order, counts = sort_by_expert(indices, moe.n_experts)  # (M,), (E,)
        moe.last_counts = counts.detach()
        rows = y[order // moe.top_k]  # (M, D) grouped by expert: what an all-to-all would send
        return (h, y, weights, rows, order, counts), loss

    def mlp(s: State):
        h, y, weights, rows, order, counts = s
        out = moe.experts(rows, counts)  # (M, D)
        shared = moe.shared_experts(y) if moe.shared_experts is not None else None  # (N, D)
        return (h, weights, out, order) + (() if shared is None else (shared,)), None

    def combine(s: State):
        h, weights, out, order = s[:4]
        n, k = weights.shape
        y = torch.empty_like(out).index_copy_(0, order, out).view(n, k, -1)  # (N, K, D) token order
        routed = combine_experts(weights, y)  # (N, D)
        if len(s) == 5:
            routed = routed + s[4]
        return (h + routed.view(h.shape),), None

    return [
        Phase("attention", COMPUTE, attention),
        Phase("dispatch", COMM, dispatch),
        Phase("mlp", COMPUTE, mlp),
        Phase("combine", COMM, combine),
    ]


def _head(stage: PipelineStage, s: State, mb: MicroBatch, cos, sin, positions, parts: torch.Tensor):
    (h,) = s
    main, mtp = stage.head_losses(h, mb.labels, cos, sin, positions)
    mtp_moe = [m for module in stage.mtp for m in module.modules() if isinstance(m, MoE)]
    balance = [m.balance_loss for m in mtp_moe if m.balance_loss is not None]
    bal = torch.stack(balance).sum() if balance else main.new_zeros(())
    loss = main + stage.mtp_lambda * mtp + stage.balance_alpha * bal
    parts.add_(torch.stack([loss, main, mtp, bal]).detach().double())
    return (), loss
