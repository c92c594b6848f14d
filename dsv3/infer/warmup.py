"""Warming an engine up before it serves (`dsv3 serve`, DESIGN §8).

The fast path packs its weights and builds its kernels on first use, so a fresh server's first
request paid for it: on the AVX2 Zen 3, v3-mini, a first 64-token request's time to first token was
318-324 ms without a warm-up, 79-87 ms after it, later ones ~60 ms. `warmup` runs throwaway greedy
requests through the paths a server's first requests take (a lone sequence's prefill and decode,
then a batch whose prefill chunk has more rows than the many-row kernels' limits, and its batched
decode), then drops every trace of them: the cache blocks back in their first order, the prefix
cache's keys and counters, the stats. Request ids and the seeds of requests without their own are
not drawn, so later requests get what they would have got from a fresh engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsv3.infer.outputs import EngineStats
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.speculative import SpecStats

if TYPE_CHECKING:
    from dsv3.infer.engine import Engine

LONE_TOKENS = 64  # the lone sequence's prompt (a typical prompt's prefill shapes)
BATCH, BATCH_TOKENS = 5, 32  # the batch: 160 rows, past the AVX2 strips' 128 (decode.gemm.STRIP_ROWS)


def warmup(engine: Engine) -> None:
    """Warm `engine` up (see the module docstring); it must be idle."""
    scheduler = engine.scheduler
    if scheduler.has_unfinished():
        raise RuntimeError("warmup: the engine has requests; warm it up before adding any")
    # prompt + 2 new tokens (+ a block of slack for the drafts' lookahead) fit the context and the cache
    limit = min(engine.max_model_len, (engine.cache.num_blocks - 1) * engine.cache.block_size) - 3
    if limit < 1:
        return  # a context too short for a throwaway request: nothing to warm
    batch = min(BATCH, scheduler.max_num_seqs)
    length = max(1, min(BATCH_TOKENS, limit, scheduler.budget // batch))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, seed=0)
    vocab = engine.model.config.vocab_size
    for n, rows in ((1, max(1, min(LONE_TOKENS, limit, scheduler.budget))), (batch, length)):
        prompts = [[(7 * i + 3 * j + 1) % vocab for j in range(rows)] for i in range(n)]
        engine.add_requests(prompts, [params] * n, [f"warmup-{n}-{i}" for i in range(n)])
        while engine.has_unfinished():
            engine.step()
    scheduler.allocator.reset()
    engine.stats, engine.spec_stats = EngineStats(), SpecStats(engine.k)
