"""Sampling: per-request parameters, the distribution they define, and seeded draws.

The distribution a request samples from is the model's softmax at `temperature`, without the tokens
less likely than `min_p` times the most likely one, restricted to the `top_k` most likely tokens and
then to the smallest set whose mass reaches `top_p`, renormalised (`target_probs`). Temperature 0 is greedy: argmax of the raw logits, bit-exact with the reference
decoder. Speculative sampling (dsv3.infer.speculative) preserves exactly this distribution.

Draws use inverse-CDF sampling with one uniform per token from the request's own generator (seeded
by `SamplingParams.seed`, else from the engine's), so a seeded request gives the same tokens
whatever else is in the batch. Logprobs are those of the model's raw distribution (temperature 1,
no truncation), as vLLM reports them.

Shapes: N rows (one per sampled token), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv3.errors import Dsv3Error

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)


class SamplingError(Dsv3Error, ValueError):
    """A sampling parameter is invalid; the message names it and its value."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0: all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; 0: none
    max_tokens: int = 16  # new tokens at most
    stop: tuple[str, ...] = ()  # stop strings (needs a tokenizer); the text is cut before them
    stop_token_ids: tuple[int, ...] = ()  # extra end tokens, besides the model's eos
    ignore_eos: bool = False  # keep going past eos (benchmarks)
    seed: int | None = None  # per-request generator; None: the engine's generator
    logprobs: int | None = None  # None: none; 0: the sampled token's; n: plus the top n

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(p: SamplingParams) -> None:
    """Every field, so that a bad request fails when it is made, not inside an engine step."""

    def fail(name: str, msg: str) -> None:
        raise SamplingError(f"{name}: {msg}, got {getattr(p, name)!r}")

    if not isinstance(p.temperature, (int, float)) or not (
        math.isfinite(p.temperature) and p.temperature >= 0
    ):
        fail("temperature", "must be a finite number >= 0")
    if not isinstance(p.top_p, (int, float)) or not 0 < p.top_p <= 1:
        fail("top_p", "must be in (0, 1]")
    if not isinstance(p.min_p, (int, float)) or not 0 <= p.min_p <= 1:
        fail("min_p", "must be in [0, 1]")
    if not _is_int(p.top_k) or p.top_k < 0:
        fail("top_k", "must be a non-negative integer (0: all)")
    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        fail("max_tokens", "must be a positive integer")
    if p.seed is not None and (not _is_int(p.seed) or not 0 <= p.seed < SEED_LIMIT):
        fail("seed", "must be None or an integer in [0, 2**64)")
    if p.logprobs is not None and (not _is_int(p.logprobs) or p.logprobs < 0):
        fail("logprobs", "must be None or a non-negative integer")
    if any(not isinstance(s, str) or not s for s in p.stop):
        fail("stop", "must be non-empty strings")
    if any(not _is_int(t) or t < 0 for t in p.stop_token_ids):
        fail("stop_token_ids", "must be non-negative token ids")
    if not isinstance(p.ignore_eos, bool):
        fail("ignore_eos", "must be True or False")


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [N, V] -> the sampling distribution [N, V] (FP32) of each row's parameters.
    Greedy rows get a one-hot distribution on the argmax."""
    logits = logits.float()
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
    probs = (logits / temp[:, None]).softmax(dim=-1)
    if any(p.min_p > 0 for p in params):  # before top-k/top-p, as vLLM applies it
        min_p = torch.tensor([p.min_p for p in params], device=probs.device)
        probs = probs * (probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (N, V)
        rank = torch.arange(probs.shape[-1], device=probs.device)
        k = torch.tensor([k if k > 0 else probs.shape[-1] for k in top_k], device=probs.device)
        keep = rank[None, :] < k[:, None]
        sorted_p = sorted_p * keep
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
        p_thr = torch.tensor(top_p, device=probs.device)
        keep &= (mass_before < p_thr[:, None] * sorted_p.sum(dim=-1, keepdim=True)) | (rank[None, :] == 0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p * keep)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def uniforms(generators: list[torch.Generator], n: int = 1) -> torch.Tensor:
    """[len(generators), n] uniforms in [0, 1), row i drawn from generators[i]."""
    return torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in generators])


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [N, V], u [N] in [0, 1) -> token ids [N]."""
    cdf = probs.double().cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    # u * total can round onto the last edge; never return a zero-probability token
    idx = idx.clamp(max=probs.shape[-1] - 1)
    bad = probs.gather(1, idx[:, None]).squeeze(1) <= 0
    if bool(bad.any()):
        idx[bad] = probs[bad].argmax(dim=-1)
    return idx


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> torch.Tensor:
    """logits [N, V] -> token ids [N]: argmax for greedy rows, a seeded draw otherwise."""
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1)
    probs = target_probs(logits, params)
    u = uniforms(generators).squeeze(1).to(probs.device)
    tokens = draw(probs, u)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    return torch.where(greedy, logits.argmax(dim=-1), tokens)


def logprob_entries(logits: torch.Tensor, tokens: torch.Tensor, top_n: list[int | None]) -> list[dict | None]:
    """Per row: {token: logprob} of the raw distribution for the chosen token and the top n."""
    if all(n is None for n in top_n):
        return [None] * len(top_n)
    logp = logits.float().log_softmax(dim=-1)  # (N, V)
    out: list[dict | None] = []
    for i, n in enumerate(top_n):
        if n is None:
            out.append(None)
            continue
        entry = {int(tokens[i]): float(logp[i, tokens[i]])}
        if n > 0:
            vals, idx = logp[i].topk(n)
            entry.update({int(t): float(v) for t, v in zip(idx, vals)})
        out.append(entry)
    return out
