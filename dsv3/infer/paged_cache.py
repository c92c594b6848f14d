"""The paged latent KV cache of the engine: MLA's cache protocol over fixed-size blocks (DESIGN §3.2).

MLA caches, per token and layer, only the normalised latent c_kv and the rotated shared rope key:
kv_lora_rank + qk_rope_head_dim values (576 for V3; naive MHA caching would be 128 x (192 + 128)).
Storage here is one pool per layer of `num_blocks * block_size` such rows. A sequence owns a list
of blocks (its block table); the token at position p lives in row
`block_table[p // block_size] * block_size + p % block_size` of every layer. All layers, main
blocks and MTP blocks alike, share one block table, so a block holds `block_size` tokens of every
layer and the bytes per token are `layers * (R + P) * element_size` (`cache_bytes_per_token`).

Per forward the engine binds a `CacheContext` (the one per-step context object): where each new
token is written (`slots`; -1 for padding, which never reaches a block) and which rows to gather as the
keys of each sequence (`gather`, with `key_positions` = -1 for slots past a sequence's length).
Attention then sees exactly the `LatentKVCache.update` contract of `dsv3.model.attention`.
`key_positions` stop at the context length given by the engine, not at the highest slot ever
written: speculative decoding writes draft tokens and rolls back by simply passing a shorter length.

Shapes: L layers, N slots (num_blocks * block_size, plus one spare row for padding), W = R + P
cache width, B rows, T new tokens per row, S key positions (longest context of the batch).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from dsv3.config import ModelConfig


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, with_mtp: bool = True) -> int:
    """Cache bytes of one token over all layers: layers * (kv_lora_rank + qk_rope_head_dim) * size."""
    layers = cfg.n_layers + (cfg.n_mtp_layers if with_mtp else 0)
    return layers * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()


class BlockAllocator:
    """Free-block accounting: a LIFO free list (recently freed blocks are reused first)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"allocate: {n} blocks requested, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        if len(self._free) > self.num_blocks:
            raise RuntimeError("free: more blocks returned than allocated (double free)")

    def reset(self) -> None:
        """Back to the state of a new allocator (every block free, in the first order); no block may
        be held (Engine.warmup forgets its throwaway requests this way)."""
        if self.num_free != self.num_blocks:
            raise RuntimeError(f"reset: {self.num_blocks - self.num_free} blocks are still allocated")
        self._free = list(range(self.num_blocks - 1, -1, -1))


class PrefixCachingAllocator(BlockAllocator):
    """A BlockAllocator whose full blocks are shared between sequences with the same prefix.

    A full block is keyed by a hash chain: key_i = H(key_{i-1}, its tokens), key_{-1} = H(model).
    Blocks carry reference counts; a cached block whose count drops to zero is not free-listed but
    kept, least recently used first, and handed out again only when the free list is empty (its key
    is then forgotten). `num_free` counts both, as both can be allocated. A sequence takes the
    longest run of cached blocks its prompt starts with (`match` then `take`) and skips their prefill.
    """

    prefix_caching = True

    def __init__(self, num_blocks: int, model_key: str = "") -> None:
        super().__init__(num_blocks)
        self.root = hashlib.blake2b(model_key.encode(), digest_size=16).digest()
        self.ref = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}  # cached block -> its key
        self.block_of: dict[bytes, int] = {}  # key -> cached block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU first
        self.queries = self.hits = 0  # prompt tokens looked up / found (the hit rate)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self.evictable)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"allocate: {n} blocks requested, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently used cached block
                b, _ = self.evictable.popitem(last=False)
                del self.block_of[self.key_of.pop(b)]
            self.ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            if self.ref[b] <= 0:
                raise RuntimeError(f"free: block {b} is not allocated (double free)")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.key_of:
                    self.evictable[b] = None  # most recently used last
                else:
                    self._free.append(b)

    def reset(self) -> None:
        """As BlockAllocator.reset, the cached blocks' keys and the hit counters forgotten too."""
        super().reset()
        self.ref = [0] * self.num_blocks
        self.key_of.clear()
        self.block_of.clear()
        self.evictable.clear()
        self.queries = self.hits = 0

    def key(self, prev: bytes | None, tokens: list[int]) -> bytes:
        h = hashlib.blake2b(prev if prev is not None else self.root, digest_size=16)
        h.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
        return h.digest()

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of keys (not taken yet)."""
        out = []
        for k in keys:
            b = self.block_of.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def take(self, blocks: list[int]) -> None:
        for b in blocks:
            self.evictable.pop(b, None)
            self.ref[b] += 1

    def register(self, block: int, key: bytes) -> None:
        """Block `block` (allocated, full, its KV computed) now holds the tokens of `key`."""
        if key not in self.block_of and block not in self.key_of:
            self.block_of[key], self.key_of[block] = block, key


@dataclass
class CacheContext:
    """Where one forward writes and reads, row by row (built by `make_context`)."""

    slots: torch.Tensor  # [B, T] row of the pool each new token goes to; -1: padding, not written
    gather: torch.Tensor  # [B, S] pool row of key position s of each sequence (0 past its length)
    key_positions: torch.Tensor  # [B, S] s, or -1 past the sequence's context length


def pool_rows(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """The pool row of each position through the block tables: table [B, blocks] (each row's block
    ids), positions [B, S], or [S] for every row -> [B, S], table[b, p // block_size] * block_size +
    p % block_size (the layout of the module docstring)."""
    if positions.dim() == 1:
        positions = positions.expand(table.shape[0], -1)
    return table.gather(1, positions // block_size) * block_size + positions % block_size


def make_context(
    block_tables: list[list[int]],
    positions: torch.Tensor,
    context_lens: list[int],
    block_size: int,
    valid: torch.Tensor | None = None,
) -> CacheContext:
    """block_tables (one list of block ids per row), positions [B, T] of the new tokens,
    context_lens (keys visible to the row after this forward), valid [B, T] (False: padding)."""
    device = positions.device
    B = len(block_tables)
    width = max(1, max(len(t) for t in block_tables))
    table = torch.zeros(B, width, dtype=torch.long)
    for i, t in enumerate(block_tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    table = table.to(device)
    lens = torch.tensor(context_lens, dtype=torch.long, device=device)
    if int(lens.max()) > width * block_size or int(positions.max()) >= width * block_size:
        raise ValueError(f"context_lens/positions: beyond the {width} blocks of the block tables")
    pos = positions.clamp(min=0)
    slots = pool_rows(table, pos, block_size)  # (B, T)
    if valid is not None:
        slots = slots.masked_fill(~valid, -1)
    s = torch.arange(int(lens.max()), device=device)  # (S,)
    inside = s[None, :] < lens[:, None]  # (B, S)
    gather = pool_rows(table, s, block_size)  # (B, S)
    return CacheContext(
        slots=slots,
        gather=gather.masked_fill(~inside, 0),
        key_positions=s.expand(B, -1).masked_fill(~inside, -1),
    )


def _write_eager(data: torch.Tensor, layer: int, slots: torch.Tensor, new: torch.Tensor) -> None:
    """data[layer] [N + 1, W] <- new [M, W] at slots [M]; padding (-1) goes to the spare last row."""
    pool = data[layer]
    pool.index_copy_(0, torch.where(slots >= 0, slots, pool.shape[0] - 1), new)


@torch.library.custom_op("dsv3::paged_write", mutates_args=("data",))
def _write(data: torch.Tensor, layer: int, slots: torch.Tensor, new: torch.Tensor) -> None:
    """`_write_eager` as a custom op on the whole storage (not a view of it), so that a compiled
    decode step writes in place: traced as plain tensor code, an in-place write into a graph input
    is functionalised into a copy of the whole pool. Eager calls skip it (its dispatch costs ~0.2 ms)."""
    _write_eager(data, layer, slots, new)


@_write.register_fake
def _(data: torch.Tensor, layer: int, slots: torch.Tensor, new: torch.Tensor) -> None:
    return None


class PagedLatentCache:
    """`n_layers` pools of `num_blocks * block_size` latent rows; implements `LatentKVCache`."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        n_layers: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        prefix_caching: bool = False,
        model_key: str = "",
    ) -> None:
        """prefix_caching: share full blocks between sequences (PrefixCachingAllocator); model_key
        names the model, whose hash starts every block key."""
        if block_size <= 0:
            raise ValueError(f"block_size: must be positive, got {block_size}")
        self.block_size = block_size
        self.rank = cfg.kv_lora_rank
        n = cfg.n_layers + cfg.n_mtp_layers if n_layers is None else n_layers
        # one spare row after the blocks takes the writes of padding tokens
        self.data = torch.zeros(n, num_blocks * block_size + 1, cfg.kv_cache_dim, dtype=dtype, device=device)
        self.allocator = (
            PrefixCachingAllocator(num_blocks, model_key) if prefix_caching else BlockAllocator(num_blocks)
        )
        self.context: CacheContext | None = None

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes over all cached layers (measured from the storage itself)."""
        n_layers, _, width = self.data.shape
        return n_layers * width * self.data.element_size()

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def bind(self, context: CacheContext) -> PagedLatentCache:
        """Set where the next forward writes and reads; returns self (pass it as the model's cache)."""
        self.context = context
        return self

    def update(
        self, layer_id: int, kv: torch.Tensor, pe: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write kv [B, T, R] and pe [B, T, P] at the bound slots; return the keys of each row
        (kv [B, S, R], pe [B, S, P], key_positions [B, S])."""
        ctx = self.context
        if ctx is None:
            raise RuntimeError("update: no CacheContext bound; call bind(make_context(...)) first")
        if ctx.slots.shape != positions.shape:
            raise ValueError(
                f"positions: shape {tuple(positions.shape)} != bound slots {tuple(ctx.slots.shape)}"
            )
        new = torch.cat([kv, pe], dim=-1).to(self.data.dtype).flatten(0, 1)  # (B*T, W)
        if torch.compiler.is_compiling():
            _write(self.data, layer_id, ctx.slots.flatten(), new)
        else:
            _write_eager(self.data, layer_id, ctx.slots.flatten(), new)
        keys = self.data[layer_id][ctx.gather].to(kv.dtype)  # (B, S, W); a BF16 cache widened, exactly
        return keys[..., : self.rank], keys[..., self.rank :], ctx.key_positions
