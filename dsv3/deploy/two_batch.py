"""Two-micro-batch overlap in prefill (DESIGN §8, paper §3.4 "Prefilling").

DeepSeek's prefill "processes two micro-batches with similar computational workloads
simultaneously, overlapping the attention and MoE of one micro-batch with the dispatch and combine
of another". Here: a group of prefill chunks (the engine's [G, C] forward, `ModelRunner.hidden`)
is split in two halves A and B of similar work (`split_work`), and each half runs through the
model as the phases of the pipelined trainer (`dsv3.parallel.pipeline.phases`: attention,
dispatch, mlp, combine per block, over the MoE's own halves and `MoECall`), cut into steps that
each end by *starting* an all-to-all:

    step 1 of a block   [wait for the previous combine] attention, route, start the dispatch
    step 2 of a block   wait for the dispatch, routed + shared experts, start the combine

and the two halves' steps alternate (`dsv3.parallel.pipeline.overlap.interleave`):

    A:attn+dispatch | B:attn+dispatch | A:experts+combine | B:experts+combine | A:attn+dispatch | ...

so every exchange of one half is in flight while the other half computes (B's attention hides A's
dispatch, A's experts hide B's dispatch, B's experts A's combine, ...). Asynchronous all-to-all:
`ExpertParallelMoE.start_dispatch` / `start_combine` (`comm.start_all_to_all`, `async_op=True`);
on gloo an exchange runs on the backend's threads, on NCCL on its own stream. overlap=False runs
the same split in the same order with every exchange waited for at once (the serial reference);
so does a layer whose MoE class replaced dispatch or combine without their asynchronous halves
(`async_halves`).

Split (`split_work`). Work of a chunk piece of n tokens after `ctx` tokens of context is
n * (ctx + n/2) query-key pairs (causal attention over the context and the piece) plus
`per_token` * n for what every token costs alike (projections, experts), in query-key-pair units
(`keys_per_token`: linear multiply-adds per token / attention multiply-adds per query-key pair;
1.4e4 for V3's 671b preset, so below ~14k tokens of context token counts dominate). Two candidate
cuts, the better balanced wins: whole rows (longest-first greedy) or every row cut at one token
offset t (A: tokens [0, t), B: [t, C) of every row). The second is what a single long chunk needs;
it is exact over the paged cache because A's step 1 of a block always runs before B's, so the keys
B's attention gathers from the cache at that layer (A's tokens) are written by then.

Decode (`two_batch_decode_logits`): the same with one token per row and the absorbed attention
path, the rows split in two (DeepSeek's decode profile overlaps attention and the shared expert
with the dispatch instead: optional in the issue, not done here).

Cache: each half binds its own `CacheContext` (`paged_cache.make_context`) on a shallow copy of the
runner's `PagedLatentCache` (same pools, same allocator: only the bound context differs).
Collectives: every rank of the EP group must call `two_batch_hidden` the same number of times per
step, each call issuing per MoE layer A's dispatch, B's dispatch, A's combine, B's combine; a rank
with no prefill work calls it with no rows (two empty halves still join every exchange), never the
one-batch `runner.hidden` (whose exchanges would not line up).
MoE statistics: the halves bypass `MoE.forward` (module forward hooks do not fire); after the call
each MoE layer's `last_counts` holds both halves' counts, i.e. the whole group's, as after
`runner.hidden`.

Shapes: G rows of the group, C tokens per row, D model dim; a half holds g rows x c tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dsv3.config import ModelConfig
from dsv3.infer.paged_cache import PagedLatentCache, make_context
from dsv3.infer.runner import ModelRunner
from dsv3.infer.scheduler import Sequence as Seq
from dsv3.model.moe import MoE
from dsv3.model.transformer import Transformer
from dsv3.parallel.pipeline.overlap import interleave
from dsv3.parallel.pipeline.phases import COMM, Phase, State, _block_phases, _settle


# ---- the split ---------------------------------------------------------------------------------------------
def keys_per_token(cfg: ModelConfig) -> float:
    """Multiply-adds every token costs alike in an average layer (attention projections, FFN or
    routed + shared experts) over those of one query-key pair of attention (H * (qk_head + v_head)):
    the `per_token` weight of `split_work`."""
    H, qk, v = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    q = cfg.dim * H * qk if not cfg.q_lora_rank else cfg.q_lora_rank * (cfg.dim + H * qk)
    kv_a = cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + v)  # naive path: per key, ~ per token in prefill
    attn = q + kv_a + kv_b + H * v * cfg.dim
    moe = 3 * cfg.dim * cfg.moe_inter_dim * (cfg.n_activated_experts + cfg.n_shared_experts)
    dense = 3 * cfg.dim * cfg.inter_dim
    ffn = (cfg.n_dense_layers * dense + (cfg.n_layers - cfg.n_dense_layers) * moe) / max(1, cfg.n_layers)
    return (attn + ffn) / (H * (qk + v))


def piece_work(n: int, context: int, per_token: float = 0.0) -> float:
    """Work of n new tokens after `context` cached ones: n * (context + n/2) query-key pairs
    (causal) + per_token * n."""
    return n * (context + n / 2) + per_token * n


@dataclass(frozen=True)
class Half:
    """One micro-batch of a [G, C] group: rows `rows` (indices into the group), tokens [lo, hi)."""

    rows: tuple[int, ...]
    lo: int
    hi: int
    work: float

    @property
    def tokens(self) -> int:
        return len(self.rows) * (self.hi - self.lo)


def split_work(start: Sequence[int], chunk: int, per_token: float = 0.0) -> tuple[Half, Half]:
    """Rows at contexts start [G], chunk C tokens each -> halves (A, B) of similar `piece_work`.
    A comes first in every step (with a token cut, A holds the earlier tokens). One half may be
    empty (nothing to split: G = 0, or one row of one token)."""
    if chunk < 0 or any(s < 0 for s in start):
        raise ValueError(f"split_work: chunk and start must be >= 0, got chunk={chunk}, start={list(start)}")
    G, C = len(start), chunk
    everything = Half(tuple(range(G)), 0, C, sum(piece_work(C, s, per_token) for s in start))
    if G == 0 or (G == 1 and C <= 1):
        return everything, Half((), 0, C, 0.0)
    best: tuple[Half, Half] | None = None
    if G >= 2:  # whole rows, longest first to the lighter half
        loads, picks = [0.0, 0.0], ([], [])
        for r in sorted(range(G), key=lambda r: -piece_work(C, start[r], per_token)):
            side = 0 if loads[0] <= loads[1] else 1
            picks[side].append(r)
            loads[side] += piece_work(C, start[r], per_token)
        best = (Half(tuple(sorted(picks[0])), 0, C, loads[0]), Half(tuple(sorted(picks[1])), 0, C, loads[1]))
    if C >= 2:  # every row cut at one token offset t: A's work grows with t, take the most even t
        rows, S = tuple(range(G)), sum(start)
        for t in range(1, C):
            a = t * (S + G * per_token) + G * t * t / 2  # sum over rows of piece_work(t, start[r])
            cut = (Half(rows, 0, t, a), Half(rows, t, C, everything.work - a))
            if best is None or max(a, everything.work - a) < max(best[0].work, best[1].work):
                best = cut
            if a >= everything.work - a:
                break
    assert best is not None
    return best


def _defined_in(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in c.__dict__)


def async_halves(module: object) -> bool:
    """Whether `module` is an MoE whose asynchronous halves (start_dispatch, start_combine,
    finish_combine) belong to its dispatch and combine: not inherited from a base class whose
    dispatch or combine the module's class replaced (e.g. `AllGatherMoE`, whose `start_dispatch`
    would start a one-hop dispatch it never uses). Other MoEs run their exchanges synchronously."""
    if not isinstance(module, MoE):
        return False
    t = type(module)
    pairs = (("start_dispatch", "dispatch"), ("start_combine", "combine"), ("finish_combine", "combine"))
    return all(issubclass(_defined_in(t, a), _defined_in(t, b)) for a, b in pairs)


# ---- one half through the model -------------------------------------------------------------------------------
class _HalfPass:
    """One half's forward as steps (each ends by starting an all-to-all); `hidden` [g, c, D] at the end."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedLatentCache,
        seqs: Sequence[Seq],
        rows: Sequence[Sequence[int]],
        start: Sequence[int],
        half: Half,
        overlap: bool,
        absorb: bool = False,
    ) -> None:
        self.model, self.half, self.overlap, self.absorb = model, half, overlap, absorb
        device = next(model.parameters()).device
        if half.tokens:
            self.ids = torch.tensor([list(rows[r][half.lo : half.hi]) for r in half.rows], device=device)
            first = torch.tensor([start[r] + half.lo for r in half.rows], device=device)
            self.positions = first[:, None] + torch.arange(half.hi - half.lo, device=device)  # (g, c)
            ctx = make_context(
                [seqs[r].block_table for r in half.rows],
                self.positions,
                [start[r] + half.hi for r in half.rows],
                cache.block_size,
            )
            self.cache: PagedLatentCache | None = copy.copy(cache).bind(ctx)  # same pools, own context
        else:  # nothing to compute here, but the half still joins every MoE layer's exchanges
            self.ids = torch.zeros(0, 1, dtype=torch.long, device=device)
            self.positions = torch.zeros(0, 1, dtype=torch.long, device=device)
            self.cache = None
        self.counts: dict[int, torch.Tensor] = {}  # id(moe) -> this half's routed counts
        self.hidden: torch.Tensor | None = None

    def phases(self) -> list[tuple[Phase, MoE | None]]:
        """The model's phases for this half, each with the MoE whose dispatch it is (if it is one)."""
        model = self.model
        cos, sin = model.rotary(self.positions)
        parts = torch.zeros(4, dtype=torch.float64)  # loss terms: none in inference
        out = [(Phase("embed", "compute", lambda s: ((model.embed_tokens(self.ids),), None)), None)]
        prev: MoE | None = None
        for block in model.layers:
            overlap = self.overlap and async_halves(block.mlp)
            pos = self.positions
            for p in _block_phases(block, prev, cos, sin, pos, 0.0, parts, overlap, self.cache, self.absorb):
                if p.name == "attention" and not self.half.tokens:  # no rows: no attention to run
                    p = Phase(p.name, p.kind, lambda s, prev=prev: ((_settle(s, prev),), None))
                out.append((p, block.mlp if p.name == "dispatch" else None))
            prev = block.mlp if overlap and isinstance(block.mlp, MoE) else None
        last = prev
        out.append((Phase("norm", "compute", lambda s: ((model.norm(_settle(s, last)),), None)), None))
        return out

    def steps(self) -> Iterator[str]:
        state: State = ()
        for phase, moe in self.phases():
            state, _ = phase.run(state)
            if moe is not None:  # route just recorded this half's counts on the layer
                self.counts[id(moe)] = moe.last_counts
            if phase.kind == COMM:
                yield phase.name
        self.hidden = state[0]  # type: ignore[assignment]


@torch.no_grad()
def two_batch_hidden(
    runner: ModelRunner,
    seqs: Sequence[Seq],
    rows: Sequence[Sequence[int]],
    start: Sequence[int],
    overlap: bool = True,
    per_token: float | None = None,
    order: list[str] | None = None,
    absorb: bool = False,
) -> torch.Tensor:
    """`runner.hidden(seqs, rows, start, absorb)` as two overlapped micro-batches: tokens rows
    [G, C] of seqs at positions start[g] + 0..C-1 -> final hidden states [G, C, D]; writes the
    chunks' latents to the runner's paged cache. G = 0 (no rows) joins the group's exchanges and
    returns [0, 0, D]. per_token: `split_work`'s weight (default `keys_per_token` of the model);
    `order`, if given, receives the steps as they ran ("F:..." = A, "B:..." = B); absorb: the
    attention path (False: prefill's naive path; True: decode's, see `two_batch_decode_logits`)."""
    if len(seqs) != len(rows) or len(start) != len(rows):
        raise ValueError(f"two_batch_hidden: {len(seqs)} seqs, {len(rows)} rows, {len(start)} starts differ")
    C = len(rows[0]) if rows else 0
    if any(len(r) != C for r in rows):
        raise ValueError(f"two_batch_hidden: rows must have equal lengths, got {[len(r) for r in rows]}")
    model = runner.model
    if per_token is None:
        per_token = keys_per_token(model.config)
    a, b = split_work(start, C, per_token)
    passes = [_HalfPass(model, runner.cache, seqs, rows, start, h, overlap, absorb) for h in (a, b)]
    ran = interleave([(p.steps(), lambda: None) for p in passes])
    if order is not None:
        order.extend(ran)
    for moe in model.moe_layers():  # both halves' counts: what `runner.hidden` would leave
        got = [p.counts[id(moe)] for p in passes if id(moe) in p.counts]
        if got:
            moe.record(torch.stack(got).sum(dim=0))
    D = model.config.dim
    ref = passes[0].hidden
    out = ref.new_zeros(len(rows), C, D)
    for p in passes:
        if p.half.tokens:
            out[list(p.half.rows), p.half.lo : p.half.hi] = p.hidden  # type: ignore[index]
    return out


@torch.no_grad()
def two_batch_decode_logits(runner: ModelRunner, seqs: Sequence[Seq], overlap: bool = True) -> torch.Tensor:
    """`runner.decode_logits(seqs)` (its model path, not the fast decoder) as two overlapped halves
    of the rows (one token each: whole rows only): logits [B, V] of each sequence's next token.
    No sequences: joins the group's exchanges and returns [0, V]."""
    tokens, start = [[s.tokens[-1]] for s in seqs], [s.num_computed for s in seqs]
    h = two_batch_hidden(runner, seqs, tokens, start, overlap, absorb=True)  # (B, 1, D); (0, 0, D)
    return runner.logits(h[:, -1] if seqs else h.flatten(0, 1))
