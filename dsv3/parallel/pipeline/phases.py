"""One micro-batch through one stage, as one piece (`StagePass`) or phase by phase (`PhasedPass`).

DualPipe overlaps a forward chunk with a backward chunk by cutting each into the phases of
§3.2.1 / Figure 4 and interleaving them, so that one micro-batch's all-to-all runs while the other
computes. A block's phases:

    attention  (compute)  h = h + MLA(norm(h))
    dispatch   (comm)     `moe.route` (gate, counts, balance loss) and `moe.dispatch` (the copies
                          sorted by expert; with expert parallelism, the all-to-all out)
    mlp        (compute)  `moe.run_experts`: routed experts (grouped GEMMs) and shared experts; a
                          dense block's FFN
    combine    (comm)     `moe.combine` (back to token order, gate-weighted sum, + shared; with
                          expert parallelism, the all-to-all back), + residual

plus `embed` on the first stage and `head` (final norm, output head, MTP modules, loss) on the last.
A dense block has attention and mlp only. The MoE phases are the MoE's own halves over one
`MoECall` (dsv3.model.moe), so any MoE class (single device, expert parallel) is cut the same way
and computes what its `forward` does; `StagePass` (one `PipelineStage.forward`) is the reference
they are tested against.

Backward phase by phase: every phase boundary cuts the autograd graph (the next phase starts from
detached leaves, an MoE call's tensors included), each phase keeps (input leaves, outputs, loss term), and its backward is one
`autograd.backward` from its outputs' gradients (plus its own loss term: a dispatch's alpha *
balance loss, the head's CE terms) to its input leaves' gradients, which feed the phase before.

Shapes: b micro-batch sequences, T tokens, N = b*T, D dim, K routed experts per token, M = N*K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dsv3.model.moe import MoE, MoECall
from dsv3.model.transformer import Block
from dsv3.parallel.pipeline.stages import MicroBatch, PipelineStage

COMPUTE, COMM = "compute", "comm"
State = tuple[torch.Tensor | MoECall, ...]  # hidden states, and an MoE call between its halves


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
            inputs = _cut_state(state)
            state, loss = phase.run(inputs)
            self._saved.append((inputs, state, loss))
            yield phase.name
        self.hidden = state[0] if state else None  # type: ignore[assignment]

    def backward_steps(self, grad: Callable[[], torch.Tensor | None], scale: float) -> Iterator[str]:
        grads: tuple[torch.Tensor | None, ...] | None = None
        for phase, (inputs, outputs, loss) in zip(reversed(self.phases), reversed(self._saved)):
            if grads is None:  # the last phase: the stage's output gradient, fetched only now
                grads = (grad(),) if outputs else ()
            tensors, gs = _flat(outputs), list(grads)
            if loss is not None:
                tensors.append(loss * scale)
                gs.append(torch.ones_like(tensors[-1]))
            _backward(tensors, gs)
            grads = tuple(t.grad if t.requires_grad else None for t in _flat(inputs))
            yield phase.name
        self._saved.clear()
        self._input_grad = grads[0] if grads else None

    @property
    def input_grad(self) -> torch.Tensor | None:
        return self._input_grad


def _cut(t: torch.Tensor) -> torch.Tensor:
    """A phase boundary: a fresh leaf for tensors that carry gradients, the tensor itself otherwise."""
    return t.detach().requires_grad_() if t.requires_grad else t


def _cut_state(state: State) -> State:
    """Cut every tensor of a state, those inside an MoE call included (a copy of the call)."""
    return tuple(_cut(t) if isinstance(t, torch.Tensor) else t.map_tensors(_cut) for t in state)


def _flat(state: State) -> list[torch.Tensor]:
    """The tensors of a state in a fixed order (`_cut_state` keeps it), an MoE call's expanded."""
    return [u for t in state for u in ((t,) if isinstance(t, torch.Tensor) else t.tensors())]


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
    moe: MoE = block.mlp

    def dispatch(s: State):
        (h,) = s
        call = moe.route(block.post_attention_layernorm(h))
        loss = None
        if call.balance is not None:
            loss = alpha * call.balance
            zero = loss.new_zeros(())
            parts.add_(torch.stack([loss, zero, zero, call.balance]).detach().double())
        moe.dispatch(call)
        return (h, call), loss

    def mlp(s: State):
        h, call = s
        call = dataclasses.replace(call)  # the phase's input state is saved: fill a copy
        moe.run_experts(call)
        return (h, call), None

    def combine(s: State):
        h, call = s
        return (h + moe.combine(call),), None

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
