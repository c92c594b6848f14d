"""Requests and the continuous-batching scheduler (block accounting, chunked prefill, admission).

Every step the scheduler picks work under a token budget (`max_num_batched_tokens`):
1. running sequences first, oldest first: a decode costs 1 token (1 + k with k speculative drafts),
   an unfinished prefill continues with its next chunk;
2. then waiting requests in arrival order (preempted ones at the front), while seats
   (`max_num_seqs`), budget and free blocks last. A prompt longer than the remaining budget is
   prefilled in chunks over several steps (chunked prefill), while decodes keep running.
Blocks are taken as a sequence grows (its KV slots up to the tokens it will write this step plus a
look-ahead for speculative drafts). When a running sequence needs a block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the front of the
queue with its tokens so far, to be recomputed later. A request that does not fit in the whole cache
is refused when added, with the reason; every other request waits and is eventually served, never
dropped (at worst one sequence runs alone).

A sequence's tokens are prompt + output; `num_computed` of them have KV in the cache. Work for a
step is the slice [num_computed, end): a decode when it is the single last token.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv3.errors import Dsv3Error
from dsv3.infer.paged_cache import BlockAllocator
from dsv3.infer.sampling import SamplingParams


class RequestError(Dsv3Error, ValueError):
    """A request the engine refuses when it is added; the message names the field (and `prompts[i]`)."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0  # tokens whose KV is in the cache (main layers)
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    # "stop" (eos, stop token or string), "length", "abort" (abort_request) or "error" (its step failed)
    finish_reason: str | None = None
    error: BaseException | None = None  # what failed the request (finish_reason "error")
    logprobs: list[dict[int, float]] | None = None
    text: str | None = None
    stop_text_len: int | None = None  # where a stop string cut the text
    # speculative decoding state (dsv3.infer.speculative)
    drafts: list[int] = field(default_factory=list)  # draft tokens after the last token
    draft_probs: torch.Tensor | None = None  # [k, V] draft distributions (sampling rows)
    mtp_computed: int = 0  # positions whose MTP-layer KV is valid
    # prefix caching (PrefixCachingAllocator): keys of the leading full blocks registered so far,
    # and the prompt tokens the cache supplied when the sequence was admitted
    block_keys: list[bytes] = field(default_factory=list)
    num_cached: int = 0

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def reset_cache_state(self) -> None:
        self.num_computed = self.mtp_computed = 0
        self.block_table, self.block_keys = [], []
        self.drafts, self.draft_probs = [], None


@dataclass
class Batch:
    """One step's work: decodes run as one [B, 1 + k] forward, each prefill chunk as [1, C]."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, start, end)

    @property
    def num_tokens(self) -> int:
        return sum(1 + len(s.drafts) for s in self.decodes) + sum(e - s for _, s, e in self.prefills)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        num_draft_tokens: int = 0,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.k = num_draft_tokens
        # speculative rows write k draft positions when verified and up to k - 1 more when drafting
        self.lookahead = 2 * num_draft_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.live: dict[str, Sequence] = {}  # request id -> its unfinished sequence (waiting or running)
        self.num_preemptions = 0
        self.prefix = getattr(allocator, "prefix_caching", False)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a request that could never run, even alone in the cache."""
        need = self.blocks_for(prompt_len + max_tokens + self.lookahead)
        if need > self.allocator.num_blocks:
            raise RequestError(
                f"max_tokens: prompt ({prompt_len}) + max_tokens ({max_tokens}) needs {need} cache blocks "
                f"of {self.block_size} tokens, the cache has {self.allocator.num_blocks}"
            )

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.live:
            raise RequestError(f"request_id: {seq.request_id!r} is already running")
        self.waiting.append(seq)
        self.live[seq.request_id] = seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def admit_computed(self, seq: Sequence, n_computed: int) -> bool:
        """Run seq at once with the KV of its first n_computed tokens already supplied (a request
        prefilled elsewhere): True with its blocks allocated when a seat and the blocks are free
        (waiting requests keep their turn: none may be queued), else False and nothing changes."""
        need = self.blocks_for(n_computed + 1 + self.lookahead)
        if self.waiting or len(self.running) >= self.max_num_seqs or need > self.allocator.num_free:
            return False
        if seq.request_id in self.live:
            raise RequestError(f"request_id: {seq.request_id!r} is already running")
        seq.block_table = self.allocator.allocate(need)
        seq.num_computed, seq.status = n_computed, Status.RUNNING
        self.running.append(seq)
        self.live[seq.request_id] = seq
        return True

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.budget
        if self.prefix:  # the blocks the last step filled can serve the sequences admitted now
            for seq in self.running:
                self._register(seq)
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.drafts or (self.k == 0 and seq.num_tokens - seq.num_computed == 1):
                n, decode = 1 + len(seq.drafts), True
            else:
                n, decode = min(seq.num_tokens - seq.num_computed, budget), False
                if n <= 0:
                    i += 1
                    continue
            if not self._grow(seq, seq.num_computed + n + self.lookahead):
                continue  # seq itself was preempted; running[i] is now the next one
            if decode:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, seq.num_computed, seq.num_computed + n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            shared, keys = self._cached_prefix(seq) if self.prefix else ([], [])
            start = len(shared) * self.block_size
            n = min(seq.num_tokens - start, budget)
            need = self.blocks_for(start + n + self.lookahead) - len(shared)
            reviving = sum(b in self.allocator.evictable for b in shared) if shared else 0
            if need > self.allocator.num_free - reviving:
                break  # admission control: wait for blocks to be freed
            self.waiting.popleft()
            if self.prefix:
                self.allocator.take(shared)
                self.allocator.queries += seq.num_tokens
                self.allocator.hits += start
            seq.block_table = shared + self.allocator.allocate(need)
            seq.block_keys, seq.num_computed, seq.num_cached = keys, start, start
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.prefills.append((seq, start, start + n))
            budget -= n
        return batch

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """The cached blocks seq's tokens start with and their keys. At least the last token is
        recomputed (its logits are needed), so a shared block is never written."""
        bs, keys, prev = self.block_size, [], None
        for i in range((seq.num_tokens - 1) // bs):
            prev = self.allocator.key(prev, seq.tokens[i * bs : (i + 1) * bs])
            keys.append(prev)
        shared = self.allocator.match(keys)
        return shared, keys[: len(shared)]

    def _register(self, seq: Sequence) -> None:
        """Offer seq's newly filled blocks (all positions' KV computed) to the prefix cache."""
        bs = self.block_size
        while len(seq.block_keys) < min(seq.num_computed // bs, len(seq.block_table)):
            i = len(seq.block_keys)
            key = self.allocator.key(
                seq.block_keys[-1] if seq.block_keys else None, seq.tokens[i * bs : (i + 1) * bs]
            )
            self.allocator.register(seq.block_table[i], key)
            seq.block_keys.append(key)

    def _grow(self, seq: Sequence, n_tokens: int) -> bool:
        """Give seq blocks for n_tokens, preempting the newest sequences if needed. False if seq
        itself had to be preempted."""
        need = self.blocks_for(n_tokens) - len(seq.block_table)
        while need > self.allocator.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.block_table += self.allocator.allocate(need)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first; it is recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        if self.prefix:
            self._register(seq)  # its computed blocks may serve its own readmission
        self.allocator.free(seq.block_table)
        seq.reset_cache_state()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq wherever it is (running or still waiting) and free its blocks."""
        if seq.finished:
            return
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.live.pop(seq.request_id, None)
        if self.prefix and reason != "error":  # an error may have left a block half written
            self._register(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
