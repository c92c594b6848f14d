"""One micro-batch through one stage, as one piece (`StagePass`) or phase by phase (`PhasedPass`).

DualPipe overlaps a forward chunk with a backward chunk by cutting each into the phases of
§3.2.1 / Figure 4 and interleaving them, so that one micro-batch's all-to-all runs while the other
computes. A block's phases:

    attention  (compute)  [wait for the previous block's combine, + residual], h = h + MLA(norm(h))
    dispatch   (comm)     `moe.route` (gate, counts, balance loss) and `moe.start_dispatch` (the
                          copies sorted by expert; with expert parallelism, the all-to-all out is
                          started and left in flight)
    mlp        (compute)  `moe.run_experts` (waits for the dispatch first): routed experts (grouped
                          GEMMs) and shared experts; a dense block's FFN
    combine    (comm)     `moe.start_combine` (expert parallelism: the all-to-all back, started);
                          the next phase of the micro-batch waits for it (`moe.finish_combine`:
                          back to token order, gate-weighted sum, + shared) and adds the residual

plus `embed` on the first stage and on the last `head` (final norm, output head, main loss), then
each MTP module's block as the phases above and `mtp` (its loss);
a stage that ends with an MoE block and is not the last ends with `output`, the wait for its last
combine, which is not a step of its own (`Phase.step`): in an F&B pair it runs after the other
half's next step, and its backward in the same step as the combine's. A dense block has attention
and mlp only. The MoE phases are the MoE's own halves over one `MoECall` (dsv3.model.moe), so any
MoE class (single device, expert parallel) is cut the same way and computes what its `forward`
does; `StagePass` (one `PipelineStage.forward`) is the reference they are tested against.

Why it overlaps: an exchange is started at the end of one step and waited for at the start of the
micro-batch's next step, so whatever the scheduler runs in between (`overlap.interleave`: the other
micro-batch's step) runs while it is in flight. The backward mirrors it: a phase that waited in the
forward *starts* the reverse exchange in its backward (the Wait's backward of `comm.start_all_to_all`),
and the comm phase before it waits for that in its own backward (the Start's backward), because the
phase boundary cuts the graph at the exchange's token like at every other tensor.
With overlap=False the comm phases wait for their own exchange: the synchronous reference.

Backward phase by phase: every phase boundary cuts the autograd graph (the next phase starts from
detached leaves, an MoE call's tensors included), each phase keeps (input leaves, outputs, loss
term), and its backward is one `autograd.backward` from its outputs' gradients (plus its own loss
term: a dispatch's alpha * balance loss, the head's CE terms) to its input leaves' gradients, which
feed the phase before.

Shapes: b micro-batch sequences, T tokens, N = b*T, D dim, K routed experts per token, M = N*K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dsv3.model.attention import LatentKVCache
from dsv3.model.moe import MoE, MoECall
from dsv3.model.transformer import Block, mtp_shift, token_cross_entropy
from dsv3.parallel.pipeline.stages import MicroBatch, PipelineStage

COMPUTE, COMM = "compute", "comm"
State = tuple[torch.Tensor | MoECall, ...]  # hidden states, and an MoE call between its halves


@dataclass(frozen=True)
class Phase:
    name: str  # embed, attention, dispatch, mlp, combine, head
    kind: str  # COMPUTE or COMM (what it would be with expert parallelism)
    run: Callable[[State], tuple[State, torch.Tensor | None]]  # state -> (state, weighted loss term)
    step: bool = True  # a step of its own; False: runs in the same step as its neighbour (see below)


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

    def __init__(
        self, stage: PipelineStage, x: torch.Tensor | None, mb: MicroBatch, overlap: bool = True
    ) -> None:
        super().__init__(stage, x, mb)
        self.phases = stage_phases(stage, mb, self.parts, overlap)
        self._saved: list[tuple[State, State, torch.Tensor | None]] = []
        self._input_grad: torch.Tensor | None = None

    def forward_steps(self) -> Iterator[str]:
        state: State = () if self.x is None else (self.x,)
        for phase in self.phases:
            inputs = _cut_state(state)
            state, loss = phase.run(inputs)
            self._saved.append((inputs, state, loss))
            if phase.step:
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
            if phase.step:
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


def stage_phases(
    stage: PipelineStage, mb: MicroBatch, parts: torch.Tensor, overlap: bool = True
) -> list[Phase]:
    """The phases of `stage` for `mb`; `parts` [total, main, mtp, balance] accumulates the loss terms.

    overlap=True: a dispatch or combine phase only starts its exchange (`MoE.start_dispatch`,
    `start_combine`) and the next phase of the same micro-batch waits for it (mlp: the dispatch;
    the next attention, the head or the stage's `output`: the combine). overlap=False: each comm
    phase waits for its own exchange (the synchronous reference, same values)."""
    ids = mb.input_ids
    positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)  # (b, T)
    cos, sin = stage.rotary(positions)
    phases = []
    if stage.is_first:
        phases.append(Phase("embed", COMPUTE, lambda s: ((stage.embed_tokens(mb.input_ids),), None)))
    prev: MoE | None = None  # the block before, if its combine may still be in flight
    for block in stage.layers:
        phases += _block_phases(block, prev, cos, sin, positions, stage.balance_alpha, parts, overlap)
        prev = block.mlp if overlap and isinstance(block.mlp, MoE) else None
    if stage.is_last:
        phases += _head_phases(stage, prev, mb, cos, sin, positions, parts, overlap)
    elif prev is not None:  # the last combine, waited for after the other half's next phase
        phases.append(Phase("output", COMM, lambda s: ((_settle(s, prev),), None), step=False))
    return phases


def _settle(s: State, moe: MoE | None) -> torch.Tensor:
    """The hidden state of `s`: h, or h + the output of the MoE whose combine is in flight (waits)."""
    if len(s) == 1:
        return s[0]  # type: ignore[return-value]
    h, call = s
    return h + moe.finish_combine(call)  # type: ignore[union-attr, operator]


def _block_phases(
    block: Block,
    prev: MoE | None,
    cos,
    sin,
    positions,
    alpha: float,
    parts: torch.Tensor,
    overlap: bool,
    cache: LatentKVCache | None = None,
    absorb: bool = False,
) -> list[Phase]:
    """A block's phases; `cache` and `absorb`: the attention's latent cache and path (inference's
    two-micro-batch overlap, dsv3.deploy.two_batch; training passes none)."""

    def attention(s: State):
        h = _settle(s, prev)
        return (h + block.self_attn(block.input_layernorm(h), cos, sin, positions, cache, absorb),), None

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
        if overlap:
            moe.start_dispatch(call)  # in flight until the mlp phase
        else:
            moe.dispatch(call)
        return (h, call), loss

    def mlp(s: State):
        h, call = s
        call = dataclasses.replace(call)  # the phase's input state is saved: fill a copy
        moe.run_experts(call)  # waits for a dispatch in flight first
        return (h, call), None

    def combine(s: State):
        h, call = s
        if not overlap:
            return (h + moe.combine(call),), None
        call = dataclasses.replace(call)
        moe.start_combine(call)  # in flight until the next phase of this micro-batch
        return (h, call), None

    return [
        Phase("attention", COMPUTE, attention),
        Phase("dispatch", COMM, dispatch),
        Phase("mlp", COMPUTE, mlp),
        Phase("combine", COMM, combine),
    ]


def _head_phases(
    stage: PipelineStage,
    prev: MoE | None,
    mb: MicroBatch,
    cos,
    sin,
    positions,
    parts: torch.Tensor,
    overlap: bool,
) -> list[Phase]:
    """The last stage's `head` (final norm, output head, main CE; the first MTP module's input) and
    each MTP module as a block's phases plus `mtp` (its CE; the next module's input), so that the
    MTP blocks' all-to-alls overlap like the main blocks'. The same terms as
    `PipelineStage.head_losses`: CE_main + lambda * mean_k CE_k (§2.2)."""
    depth = len(stage.mtp)

    def mtp_input(k: int, h_prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Depth k's block input from h^{k-1} and Emb(t_{i+k}) (MTPModule.forward without its block)."""
        if k > depth:
            return ()
        module = stage.mtp[k - 1]
        emb = stage.embed_tokens(mtp_shift(mb.labels, k)[0])
        return (module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h_prev)], dim=-1)),)

    def head(s: State):
        h = stage.norm(_settle(s, prev))
        main = token_cross_entropy(stage.lm_head(h), mb.labels)
        zero = main.new_zeros(())
        parts.add_(torch.stack([main, main, zero, zero]).detach().double())
        return mtp_input(1, h), main

    phases = [Phase("head", COMPUTE, head)]
    for k, module in enumerate(stage.mtp, start=1):
        block = module.block
        phases += _block_phases(block, None, cos, sin, positions, stage.balance_alpha, parts, overlap)
        last = block.mlp if overlap and isinstance(block.mlp, MoE) else None

        def mtp(s: State, k=k, module=module, last=last):
            h = _settle(s, last)  # h^k, before the shared head's norm
            ce = token_cross_entropy(stage.lm_head(module.shared_head.norm(h)), mtp_shift(mb.labels, k)[1])
            loss = stage.mtp_lambda / depth * ce
            parts.add_(torch.stack([loss, ce.new_zeros(()), ce / depth, ce.new_zeros(())]).detach().double())
            return mtp_input(k + 1, h), loss

        phases.append(Phase("mtp", COMPUTE, mtp))
    return phases
