"""The single-process inference engine: continuous batching over the paged latent cache (DESIGN §8).

`add_request` queues a prompt (token ids); each `step` asks the scheduler for work and runs it:
- decodes as ONE batched forward [B, 1] (or [B, 1 + k] verifying k MTP drafts) on the absorbed MLA
  path, every row with its own positions and context length;
- prefill chunks of equal length as one [G, C] forward on the naive path, writing the latent cache;
- where the fast path runs them all (`ModelRunner.mixed`), plain decodes and every prefill chunk
  (of any lengths) as ONE forward whose rows share every projection and expert GEMM, each part
  attending over its own keys: the weights are read once per step instead of once per forward
  (BF16 v3-mini, 32 decodes + a 64-token prompt: 61 vs 81 ms a step; FP32, bound by
  multiply-adds: 140 vs 158 ms).
Separate or concatenated rows rather than one padded batch: padding would cost up to B x C wasted
tokens, and MoE routes each token independently (no capacity, no dropping), so splitting a step
into forwards or merging them changes no output (up to the GEMMs' rounding). Then the sampled
tokens are appended, stop conditions checked (eos / stop tokens, stop strings, max_tokens, the
model's length) and finished sequences free their blocks.
With speculative decoding the MTP module then drafts the next tokens of every row (see
dsv3.infer.speculative).

Failures: a request is validated completely when added (`add_requests` validates a whole batch
before admitting any of it), so a bad one is refused with a ValueError naming the field and leaves
nothing queued. An exception while a step runs fails exactly the requests it touched: the rows of a
failing forward, or the one request whose tokens could not be committed. They finish with
finish_reason "error" (`RequestOutput.error` holds the exception), their cache blocks are freed, a
warning names them, and the engine goes on serving every other request. `abort_request` ends a
request early the same way (finish_reason "abort").

Shapes: B decode rows, C chunk length, K drafts, V vocabulary.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from dsv3.config import ConfigError
from dsv3.infer.outputs import EngineStats, RequestOutput
from dsv3.infer.paged_cache import PagedLatentCache, cache_bytes_per_token
from dsv3.infer.runner import ModelRunner
from dsv3.infer.sampling import SamplingParams, logprob_entries, sample
from dsv3.infer.scheduler import RequestError, Scheduler, Sequence
from dsv3.infer.speculative import SpecStats, propose, verify
from dsv3.model.transformer import Transformer

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per cache block
    num_blocks: int | None = None  # cache blocks; None: as many as `cache_memory` bytes hold
    cache_memory: int = 256 * 2**20  # bytes of KV cache when num_blocks is None
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens per step: the prefill chunk budget
    speculative: bool = False  # MTP drafts verified by the main model
    num_speculative_tokens: int = 1  # drafts per step (V3 has one MTP module; more reuse it)
    draft_vocab: int | None = None  # MTP drafts only among ids < draft_vocab (speculative.py)
    max_model_len: int | None = None  # prompt + output tokens at most; None: the model's max_seq_len
    seed: int = 0  # seeds the generators of requests without their own seed
    fast_decode: bool = True  # plain decoding on dsv3.infer.decode (fused weights); False: the model
    # storage dtype of the fast path's feed-forward matrices and head (None: the model's); bfloat16
    # halves the bytes a decode step reads and is exact for a BF16 checkpoint (LLM picks it then)
    weight_dtype: torch.dtype | None = None
    # dtype of the latent KV cache (None: the model's); bfloat16 under an FP32 model halves the
    # cache's bytes (twice the tokens in `cache_memory`) and what attention reads, each cached value
    # rounded once to BF16 (LLM picks it for a BF16 checkpoint, as vLLM's kv_cache_dtype "auto")
    kv_cache_dtype: torch.dtype | None = None
    compile: bool = False  # torch.compile the model's decode forward (what the fast path does not run)
    prefix_caching: bool = False  # share full prompt blocks between requests (PrefixCachingAllocator)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_speculative_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        if self.draft_vocab is not None and (not isinstance(self.draft_vocab, int) or self.draft_vocab <= 0):
            raise ConfigError(f"draft_vocab: must be a positive integer or None, got {self.draft_vocab!r}")
        if self.weight_dtype not in (None, torch.float32, torch.bfloat16):
            raise ConfigError(
                f"weight_dtype: expected None, torch.float32 or torch.bfloat16, got {self.weight_dtype!r}"
            )
        if self.kv_cache_dtype not in (None, torch.float32, torch.bfloat16):
            raise ConfigError(
                f"kv_cache_dtype: expected None, torch.float32 or torch.bfloat16, got {self.kv_cache_dtype!r}"
            )
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"num_blocks: must be positive or None, got {self.num_blocks}")
        if self.prefix_caching and self.speculative:  # shared blocks would need valid MTP-layer KV too
            raise ConfigError("prefix_caching: not supported with speculative decoding yet")
        if self.speculative and self.max_num_batched_tokens < self.num_speculative_tokens + 1:
            raise ConfigError(
                "max_num_batched_tokens: must hold one verification (num_speculative_tokens + 1)"
            )


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig(), tokenizer=None) -> None:
        cfg = model.config
        self.model, self.config, self.tokenizer = model.eval(), config, tokenizer
        self.k = config.num_speculative_tokens if config.speculative else 0
        if self.k and len(model.mtp) == 0:
            raise ConfigError("speculative: the model has no MTP module (num_nextn_predict_layers = 0)")
        param = next(model.parameters())
        n_layers = cfg.n_layers + (1 if self.k else 0)  # MTP module 1 caches only when drafting
        num_blocks = config.num_blocks
        cache_dtype = config.kv_cache_dtype or param.dtype
        if num_blocks is None:
            per_block = n_layers * cfg.kv_cache_dim * cache_dtype.itemsize * config.block_size
            num_blocks = max(1, config.cache_memory // per_block)
        self.cache = PagedLatentCache(
            cfg, num_blocks, config.block_size, n_layers, cache_dtype, param.device,
            prefix_caching=config.prefix_caching, model_key=repr(cfg),
        )  # fmt: skip
        self.runner = ModelRunner(
            model,
            self.cache,
            compile=config.compile,
            fast=config.fast_decode,
            draft_vocab=config.draft_vocab,
            weight_dtype=config.weight_dtype,
        )
        self.scheduler = Scheduler(
            self.cache.allocator,
            config.block_size,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.k,
        )
        self.max_model_len = config.max_model_len or cfg.max_seq_len
        self.eos = {cfg.eos_token_id} | ({tokenizer.eos_id} if tokenizer is not None else set())
        self.stats = EngineStats()
        self.spec_stats = SpecStats(self.k)
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(config.seed)

    @property
    def bytes_per_token(self) -> int:
        return self.cache.bytes_per_token

    def formula_bytes_per_token(self) -> int:
        """(main layers + the one MTP layer when drafting) x (R + P) x element size."""
        cfg = self.model.config
        with_mtp = cache_bytes_per_token(cfg.replace(n_mtp_layers=1), self.cache.data.dtype, with_mtp=True)
        return with_mtp if self.k else cache_bytes_per_token(cfg, self.cache.data.dtype, with_mtp=False)

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue one request (validated first: a ValueError naming the field queues nothing)."""
        self._validate(prompt, params)
        if request_id is not None and request_id in self.scheduler.live:
            raise RequestError(f"request_id: {request_id!r} is already in use")
        return self._admit(prompt, params, request_id)

    def add_requests(
        self,
        prompts: Seq[list[int]],
        params: Seq[SamplingParams],
        request_ids: Seq[str] | None = None,
    ) -> list[str]:
        """Queue a batch of requests, all or none: every request is validated before any is
        admitted, so a bad one (ValueError naming `prompts[i]` and the field) leaves nothing queued
        whose outputs would reach a later caller."""
        if len(params) != len(prompts) or (request_ids is not None and len(request_ids) != len(prompts)):
            raise RequestError(f"params/request_ids: one per prompt ({len(prompts)} prompts)")
        ids = list(request_ids) if request_ids is not None else [None] * len(prompts)
        taken = set(self.scheduler.live)
        for i, (prompt, sp, rid) in enumerate(zip(prompts, params, ids)):
            try:
                self._validate(prompt, sp)
            except ValueError as e:  # RequestError, or a ValueError of the scheduler's checks
                raise RequestError(f"prompts[{i}]: {e}") from e
            if rid is not None and rid in taken:
                raise RequestError(f"prompts[{i}]: request_id {rid!r} is already in use")
            taken.add(rid)
        # only now draw seeds and ids: a refused batch leaves the engine's generator untouched
        return [self._admit(prompt, sp, rid) for prompt, sp, rid in zip(prompts, params, ids)]

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Everything that could make the request fail later, checked now (ValueError names the field)."""
        vocab = self.model.config.vocab_size
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params: expected SamplingParams, got {type(params).__name__}")
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise RequestError("prompt: must be a non-empty list of token ids")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt: token ids {bad[:5]} are not integers in the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"prompt: {len(prompt)} tokens, the model takes at most {self.max_model_len - 1}"
            )
        if params.stop and self.tokenizer is None:
            raise RequestError(
                "stop: stop strings need a tokenizer; use stop_token_ids with token-id prompts"
            )
        if params.logprobs is not None and (
            not isinstance(params.logprobs, int) or not 0 <= params.logprobs <= vocab
        ):
            raise RequestError(
                f"logprobs: must be an integer in [0, {vocab}] (the vocabulary), got {params.logprobs!r}"
            )
        if params.seed is not None and (
            not isinstance(params.seed, int) or not SEED_RANGE[0] <= params.seed < SEED_RANGE[1]
        ):
            raise RequestError(f"seed: must be an integer in [-2**63, 2**64), got {params.seed!r}")
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt))
        self.scheduler.check_fits(len(prompt), max_tokens)

    def add_prefilled(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str,
        output_ids: list[int],
        generator_state: torch.Tensor | None = None,
        logprobs: list[dict[int, float]] | None = None,
        kv: torch.Tensor | None = None,
    ) -> bool:
        """Admit a request whose prompt another engine prefilled (prefill/decode disaggregation,
        dsv3.deploy.disagg): its tokens are prompt + output_ids (the tokens sampled there, with the
        request generator's state after them) and kv [L, nb, block_size, W] holds the cache blocks of
        all tokens but the last. It runs at once with that KV when a seat and blocks are free and
        True is returned; otherwise (or with kv None) it waits like a preempted sequence and its
        tokens are recomputed when admitted (False)."""
        self._validate(prompt, params)
        if request_id in self.scheduler.live:
            raise RequestError(f"request_id: {request_id!r} is already in use")
        if not output_ids:
            raise RequestError("output_ids: a prefilled request has at least its first token")
        gen = torch.Generator()
        if generator_state is not None:
            gen.set_state(generator_state)
        seq = Sequence(request_id, list(prompt), params, gen, tokens=list(prompt) + list(output_ids))
        seq.logprobs = list(logprobs or []) if params.logprobs is not None else None
        n = seq.num_tokens - 1  # tokens whose KV was computed: all but the last sampled one
        if kv is not None:
            L, _, W = self.cache.data.shape
            bs = self.config.block_size
            if kv.dim() != 4 or (kv.shape[0], kv.shape[2], kv.shape[3]) != (L, bs, W):
                raise RequestError(f"kv: shape {tuple(kv.shape)}, this cache takes [{L}, nb, {bs}, {W}]")
            if kv.shape[1] != self.scheduler.blocks_for(n):
                raise RequestError(f"kv: {kv.shape[1]} blocks for {n} tokens of {bs}")
            if self.scheduler.admit_computed(seq, n):
                blocks = torch.tensor(seq.block_table[: kv.shape[1]], device=self.cache.data.device)
                rows = (blocks[:, None] * bs + torch.arange(bs, device=blocks.device)).flatten()
                self.cache.data[:, rows] = kv.reshape(L, -1, W).to(self.cache.data)
                return True
        self.scheduler.add(seq)
        return False

    def _admit(self, prompt: list[int], params: SamplingParams, request_id: str | None) -> str:
        seed = (
            params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._rng))
        )
        rid = request_id if request_id is not None else self._fresh_id()
        seq = Sequence(rid, list(prompt), params, torch.Generator().manual_seed(seed))
        seq.logprobs = [] if params.logprobs is not None else None
        self.scheduler.add(seq)
        return rid

    def _fresh_id(self) -> str:
        while (rid := str(next(self._ids))) in self.scheduler.live:
            pass  # a caller chose this id for an earlier request
        return rid

    def warmup(self) -> None:
        """Throwaway requests through the paths a server's first requests take, then every trace of
        them dropped (dsv3.infer.warmup). Needs an idle engine."""
        from dsv3.infer.warmup import warmup

        warmup(self)

    def abort_request(self, request_id: str) -> bool:
        """End an unfinished request now (finish_reason "abort") and free its blocks; False if no
        such request is running or waiting."""
        seq = self.scheduler.live.get(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the state of every request that received tokens or
        failed (an exception in the step fails the requests it touched, see the module docstring)."""
        batch = self.scheduler.schedule()
        if not batch.decodes and not batch.prefills and self.scheduler.has_unfinished():
            raise RuntimeError("step: requests are queued but none could be scheduled (cache too small?)")
        self._count(batch)
        outputs: list[RequestOutput] = []
        try:
            self._run(batch, outputs)
        except Exception as e:  # a failing forward: every row of the batch that is not done yet
            touched = batch.decodes + [seq for seq, _, _ in batch.prefills]
            outputs += self._fail([seq for seq in touched if not seq.finished], e)
        return outputs

    def _run(self, batch, outputs: list[RequestOutput]) -> None:
        """The forwards of one batch; commits each request's tokens into `outputs` as it goes."""
        emitted: dict[int, tuple[Sequence, list[int], torch.Tensor]] = {}  # id(seq) -> tokens, logits
        verified, merged = None, None
        groups = [(seqs, start, end, [s.tokens[a:b] for s, a, b in zip(seqs, start, end)])
                  for seqs, start, end in _group_chunks(batch.prefills)]  # fmt: skip
        decodes = batch.decodes if not self.k else []
        if groups and (decodes or len(groups) > 1):  # one forward for all, where that pays
            merged = self._merged_forward(decodes, [(seqs, rows, start) for seqs, start, _, rows in groups])
        if batch.decodes and self.k:
            verified = self._verify(batch.decodes, emitted)
        elif batch.decodes:
            seqs = batch.decodes
            logits = self.runner.decode_logits(seqs) if merged is None else merged[0]  # (B, V)
            tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
            for i, s in enumerate(seqs):
                s.num_computed += 1
                emitted[id(s)] = (s, [tokens[i]], logits[i : i + 1])
        final = []
        for g, (seqs, start, end, rows) in enumerate(groups):
            h = merged[1][g] if merged is not None else self._prefill_hidden(seqs, rows, start)
            for s, b in zip(seqs, end):
                s.num_computed = b
            if end[0] < seqs[0].num_tokens:  # not the prompt's last chunk: nothing to sample
                if self.k:  # MTP keeps up with the prompt: its inputs t_{i+1} are all known
                    self._mtp_prefill(seqs, h, start, end, draft=False)
                continue
            logits = self.runner.logits(h[:, -1])  # (G, V)
            tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
            for i, s in enumerate(seqs):
                emitted[id(s)] = (s, tokens[i : i + 1], logits[i : i + 1])
            final.append((seqs, h, start, end))
        for seq, tokens, logits in emitted.values():
            try:
                outputs.append(self._commit(seq, tokens, logits))
            except Exception as e:  # this request's tokens alone: the others commit as usual
                outputs += self._fail([seq], e)
        if verified is not None:
            self._draft_after_verify(*verified)
        for seqs, h, start, end in final:
            live = [i for i, s in enumerate(seqs) if not s.finished]
            if self.k and live:
                pick = [seqs[i] for i in live]
                self._mtp_prefill(pick, h[live], [start[i] for i in live], [end[i] for i in live], draft=True)

    def _prefill_hidden(self, seqs: list[Sequence], rows: list[list[int]], start: list[int]) -> torch.Tensor:
        """One [G, C] prefill forward -> hidden states [G, C, D] (the seam the expert-parallel
        engine's two-micro-batch prefill replaces)."""
        return self.runner.prefill_hidden(seqs, rows, start)

    def _merged_forward(
        self, decodes: list[Sequence], chunks: list[tuple[list[Sequence], list[list[int]], list[int]]]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]] | None:
        """Plain decodes and every prefill chunk (seqs, rows [G, C], start) of a step in one forward
        where that pays (`ModelRunner.mixed`): (decode logits [B, V] or None, each chunk's hidden
        [G, C, D]), else None and they run apart (the seam the expert-parallel engine closes: its
        forwards are counted across the group)."""
        return self.runner.mixed(decodes, chunks)

    def _fail(self, seqs: list[Sequence], error: Exception) -> list[RequestOutput]:
        """Finish seqs with finish_reason "error" and free their blocks; one warning names them."""
        if not seqs:
            return []
        for seq in seqs:
            self.scheduler.finish(seq, "error")
            seq.error = error
        ids = ", ".join(seq.request_id for seq in seqs)
        warnings.warn(
            f"engine: request(s) {ids} failed ({type(error).__name__}: {error}); "
            "their cache blocks are freed",
            stacklevel=3,
        )
        return [self._output(seq) for seq in seqs]

    def _count(self, batch) -> None:
        st = self.stats
        st.steps += 1
        st.prefill_tokens += sum(e - s for _, s, e in batch.prefills)
        st.mixed_steps += bool(batch.prefills and batch.decodes)
        st.max_running = max(st.max_running, len(self.scheduler.running))
        if self.scheduler.running:
            st.max_waiting_while_running = max(st.max_waiting_while_running, len(self.scheduler.waiting))

    # ---- speculative ------------------------------------------------------------------------------
    def _verify(self, seqs: list[Sequence], emitted: dict) -> tuple:
        """One [B, K + 1] forward over [last token, drafts]; accept; return what drafting needs."""
        m = [s.num_computed for s in seqs]
        h, logits = self.runner.verify(seqs, [[s.tokens[-1], *s.drafts] for s in seqs], m)  # (B, K+1, D | V)
        new = verify(logits, seqs)
        for i, s in enumerate(seqs):
            a = len(new[i]) - 1
            self.spec_stats.record(a)
            s.num_computed = m[i] + a + 1  # t_m and the accepted drafts now have valid KV
            emitted[id(s)] = (s, new[i], logits[i, : a + 1])
        return seqs, h, m, new

    def _draft_after_verify(
        self, seqs: list[Sequence], h: torch.Tensor, m: list[int], new: list[list[int]]
    ) -> None:
        """MTP over the verified positions m..m+K (tokens one ahead: the emitted ones, then filler
        that only provisional positions see); each row drafts from its last valid position m + a."""
        live = [i for i, s in enumerate(seqs) if not s.finished]
        if not live:
            return
        rows = [seqs[i] for i in live]
        nxt = [new[i] + [new[i][-1]] * (self.k + 1 - len(new[i])) for i in live]
        propose(
            self.runner, rows, h[live], nxt, [m[i] for i in live], [len(new[i]) - 1 for i in live], self.k
        )
        for s in rows:
            s.mtp_computed = s.num_computed

    def _mtp_prefill(
        self, seqs: list[Sequence], h: torch.Tensor, start: list[int], end: list[int], draft: bool
    ):
        """MTP over a prefilled chunk (tokens one ahead); after the last chunk, draft from its end."""
        nxt = [s.tokens[a + 1 : b + 1] for s, a, b in zip(seqs, start, end)]
        if draft:
            propose(self.runner, seqs, h, nxt, start, [b - a - 1 for a, b in zip(start, end)], self.k)
        else:
            self.runner.mtp_hidden(seqs, h, nxt, start, None, absorb=False)  # its cache rows only
        for s, b in zip(seqs, end):
            s.mtp_computed = b

    # ---- commit -----------------------------------------------------------------------------------
    def _commit(self, seq: Sequence, tokens: list[int], logits: torch.Tensor) -> RequestOutput:
        """Append tokens one by one until a stop condition; logits [len(tokens), V] for logprobs."""
        p = seq.params
        entries = logprob_entries(logits, torch.tensor(tokens), [p.logprobs] * len(tokens))
        for t, entry in zip(tokens, entries):
            seq.tokens.append(t)
            if seq.logprobs is not None:
                seq.logprobs.append(entry)
            self.stats.decode_tokens += 1
            reason = self._stop_reason(seq, t)
            if reason:
                self.scheduler.finish(seq, reason)
                break
        if seq.finished and self.tokenizer is not None:
            ids = seq.output_ids
            if ids and seq.finish_reason == "stop" and (ids[-1] in self.eos or ids[-1] in p.stop_token_ids):
                ids = ids[:-1]  # the end token is not part of the text
            seq.text = self.tokenizer.decode(ids)
            if seq.stop_text_len is not None:
                seq.text = seq.text[: seq.stop_text_len]
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            seq.prompt,
            seq.output_ids,
            seq.finished,
            seq.finish_reason,
            seq.text,
            seq.logprobs,
            seq.error,
            seq.num_cached,
        )

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop:
            text = self.tokenizer.decode(seq.output_ids)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                seq.stop_text_len = min(hits)
                return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None


def _group_chunks(prefills: list[tuple[Sequence, int, int]]):
    """Prefill chunks of equal length that all end (or all do not end) their prompt run as one
    [G, C] forward: yields (seqs, starts, ends)."""
    groups: dict[tuple[int, bool], list[tuple[Sequence, int, int]]] = {}
    for seq, a, b in prefills:
        groups.setdefault((b - a, b == seq.num_tokens), []).append((seq, a, b))
    for chunk in groups.values():
        seqs, starts, ends = zip(*chunk)
        yield list(seqs), list(starts), list(ends)
