"""MTP speculative decoding: draft with the MTP module, verify with the main model (§2.2, §5.4.3).

Drafting. MTP module 1 at position i reads the main model's final hidden state h^0_i and the token
t_{i+1}, and predicts t_{i+2}. After a step commits tokens up to the pending (not yet processed)
token t_m, the module runs at position m-1 with t_m and proposes d_{m+1}. More drafts reuse the
module one position further on, feeding its own output hidden state in place of the main model's
(as vLLM and SGLang do when asked for more speculative tokens than MTP modules; V3 has one module).
Draft-time MTP cache entries past the committed tokens are provisional: the next step rewrites
them with the verified hidden states, and context lengths hide them until then.

Verification. The main model runs once over [t_m, d_{m+1}, ..., d_{m+k}] (k + 1 tokens per row,
absorbed MLA path) and gives the target distribution p_j at each of those positions.
- Greedy: accept drafts while d_{m+j+1} == argmax p_j; then emit argmax p_a (the correction, or the
  bonus token when all k are accepted). The output is exactly plain greedy decoding's.
- Sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_{j+1} ~ q_j with probability
  min(1, p_j(d) / q_j(d)); at the first rejection emit a sample of norm(max(0, p_j - q_j)); if all
  are accepted emit a sample of p_k. Every emitted token is distributed exactly as under p, with
  p and q the distributions after the request's temperature / top-k / top-p.
Rejected positions leave stale latents in the cache; the sequence's context length simply stops
before them and the next step overwrites them.

Draft vocabulary (`EngineConfig.draft_vocab`, FR-Spec's idea, Zhao et al. 2025): drafts may be
restricted to the token ids below a bound, so that drafting reads only that many columns of the
output head (the head is a third of the bytes a `small` decode step reads). BPE ids are in merge
order, roughly by frequency, so the first 2,048 of the demo tokenizer's 8,192 ids cover 98% of the
trained model's greedy choices on held-out text. The draft distribution q is then zero above the
bound; both acceptance rules are exact for any q, so outputs keep their distribution (greedy
output is unchanged); only acceptance can drop.

Statistics: per draft position j, the fraction of verifications in which drafts 1..j were all
accepted (vLLM's per-position acceptance), and the mean accept length = tokens emitted per
verification = 1 + mean accepted drafts.

Shapes: B rows, K drafts per row, V vocabulary, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv3.infer.decode.limits import MTP_ABSORB_POSITIONS
from dsv3.infer.runner import ModelRunner
from dsv3.infer.sampling import SamplingParams, draw, target_probs, uniforms
from dsv3.infer.scheduler import Sequence


@dataclass
class SpecStats:
    k: int
    verifications: int = 0  # rows verified (one per sequence and step)
    accepted: list[int] = field(default_factory=list)  # [K] times drafts 1..j were all accepted

    def __post_init__(self) -> None:
        self.accepted = self.accepted or [0] * self.k

    def record(self, n_accepted: int) -> None:
        self.verifications += 1
        for j in range(n_accepted):
            self.accepted[j] += 1

    @property
    def acceptance_rates(self) -> list[float]:
        return [a / max(self.verifications, 1) for a in self.accepted]

    @property
    def mean_accept_length(self) -> float:
        """Tokens emitted per verification forward (1 means no draft was ever accepted)."""
        return 1.0 + sum(self.accepted) / max(self.verifications, 1)

    def summary(self) -> str:
        rates = ", ".join(f"{r:.1%}" for r in self.acceptance_rates)
        return f"acceptance per draft position [{rates}], mean accept length {self.mean_accept_length:.2f}"


# ---- verification --------------------------------------------------------------------------------
def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """targets [K + 1] argmax tokens of the verification forward -> the emitted tokens."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return drafts[:a] + [targets[a]]


def accept_sampling(p: torch.Tensor, q: torch.Tensor, drafts: list[int], gen: torch.Generator) -> list[int]:
    """Speculative sampling for one row: p [K + 1, V] target, q [K, V] draft distributions."""
    u = uniforms([gen], len(drafts) + 1)[0]
    for j, d in enumerate(drafts):
        if u[j] * q[j, d] < p[j, d]:  # accept with probability min(1, p/q)
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection had probability ~0
            residual = p[j]
        return drafts[:j] + [int(draw(residual[None], uniforms([gen])[0]))]
    return drafts + [int(draw(p[-1:], u[-1:]))]


def verify(logits: torch.Tensor, seqs: list[Sequence]) -> list[list[int]]:
    """logits [B, K + 1, V] of the main model over [last token, drafts] -> emitted tokens per row."""
    B, K1, V = logits.shape
    targets = logits.argmax(dim=-1).tolist()  # (B, K + 1)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    probs = None
    if sampled:
        rows = logits[sampled].flatten(0, 1)  # (B' * (K + 1), V)
        params = [seqs[i].params for i in sampled for _ in range(K1)]
        probs = target_probs(rows, params).view(len(sampled), K1, V)
    out = []
    for i, seq in enumerate(seqs):
        if seq.params.greedy:
            out.append(accept_greedy(targets[i], seq.drafts))
        else:
            p = probs[sampled.index(i)]
            out.append(accept_sampling(p, seq.draft_probs, seq.drafts, seq.generator))
    return out


# ---- drafting ------------------------------------------------------------------------------------
def _draft_tokens(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]):
    """Draft logits [B, V] -> (tokens [B], draft distributions [B, V] or None for greedy rows)."""
    tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return tokens.tolist(), [None] * len(params)
    q = target_probs(logits, params)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    tokens[sampled] = draw(q[sampled], uniforms([gens[i] for i in sampled]).squeeze(1))
    return tokens.tolist(), [None if p.greedy else q[i] for i, p in enumerate(params)]


def propose(
    runner: ModelRunner,
    seqs: list[Sequence],
    h_prev: torch.Tensor,
    next_tokens: list[list[int]],
    start: list[int],
    take: list[int],
    k: int,
) -> None:
    """Run MTP over h_prev [B, T, D] with the tokens one ahead at positions start + 0..T-1 (writing
    its cache), then draft k tokens for each row from the output at index take[b] (the position
    just before the row's pending token). Sets seq.drafts and seq.draft_probs."""
    absorb = h_prev.shape[1] <= MTP_ABSORB_POSITIONS
    g = runner.mtp_hidden(seqs, h_prev, next_tokens, start, take, absorb=absorb)  # (B, D)
    params = [s.params for s in seqs]
    gens = [s.generator for s in seqs]
    drafts: list[list[int]] = [[] for _ in seqs]
    qs: list[list[torch.Tensor | None]] = [[] for _ in seqs]
    for j in range(k):
        tokens, q = _draft_tokens(runner.mtp_logits(g), params, gens)
        for i in range(len(seqs)):
            drafts[i].append(tokens[i])
            qs[i].append(q[i])
        if j + 1 < k:  # the module once more, one position on, from its own hidden state
            pos = [s.num_computed + j for s in seqs]
            g = runner.mtp_hidden(seqs, g[:, None], [[t] for t in tokens], pos, [0] * len(seqs))
    for i, s in enumerate(seqs):
        s.drafts = drafts[i]
        s.draft_probs = None if s.params.greedy else torch.stack(qs[i])  # (K, V)
