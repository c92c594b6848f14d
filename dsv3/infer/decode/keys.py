"""The keys a fast decode step attends over, read from the paged latent cache (DESIGN §3.2, §8):
`SliceKeys` for a lone sequence whose blocks are consecutive in the pool (a slice, its new rows
written in place), `GatheredKeys` for anything else (the new rows of all layers go to the pool in one
write at the end). `GatheredKeys.attend` has two implementations of one contract: the torch
reference gathers each layer's rows through the block tables into one reused buffer (index_select,
then the new rows copied in) and runs two batched matmuls with a -inf bias; with the native kernels
(`attend=`, csrc/paged_attention.cpp) one pass per row reads the keys straight from the pool
through the block table, with an online softmax (flash-decoding's running max and sum): the keys
are read once instead of copied once and read twice, and nothing past a row's own length is read.
`GatheredKeys.attend_naive` is the model's naive MLA over the gathered keys (prefill chunks).
Used by dsv3.infer.decode.step.

Shapes: B rows, T new tokens per row, S key positions, H heads, R kv_lora_rank, W = R + P cache width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv3.infer.paged_cache import pool_rows


class SliceKeys:
    """One sequence whose pool rows start .. start + pos + T - 1 are its positions 0 .. pos + T - 1
    (T new tokens at pos ..; T > 1 in speculative verification, causal among themselves)."""

    def __init__(self, pools: list[torch.Tensor], start: int, pos: int, rank: int, T: int = 1) -> None:
        self.pools, self.start, self.slot, self.rank, self.T = pools, start, start + pos, rank, T
        # -inf above the diagonal of the last T key columns: new token t sees new tokens <= t only
        tail = torch.full((T, T), float("-inf"), dtype=pools[0].dtype).triu_(1) if T > 1 else None
        self.tail = None if tail is None else tail[:, None, :]  # (T, 1, T): broadcast over heads

    def new_rows(self, layer: int) -> torch.Tensor:
        """Where this step's cache rows of `layer` go: [T, W], in the pool itself."""
        return self.pools[layer][self.slot : self.slot + self.T]

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [T, H, W] -> attention output in latent space [T, H, R] (the new rows included)."""
        keys = self.pools[layer][self.start : self.slot + self.T]  # (S, W)
        if keys.dtype != q.dtype:  # a BF16 cache under FP32 compute: widened, exactly
            keys = keys.to(q.dtype)
        if self.tail is None:
            probs = (q[0] @ keys.T).softmax(dim=-1)  # (H, S)
            return (probs @ keys[:, : self.rank])[None]
        T, H, W = q.shape
        scores = (q.reshape(T * H, W) @ keys.T).view(T, H, -1)  # (T, H, S)
        scores[..., -T:] += self.tail
        probs = scores.softmax(dim=-1).view(T * H, -1)
        return (probs @ keys[:, : self.rank]).view(T, H, self.rank)

    def finish(self) -> None:
        pass


class GatheredKeys:
    """Any rows, T new tokens each (T > 1: speculative verification), new rows written to the pool
    at the end. attend: the native paged attention (`Native.paged_attend`, dsv3.infer.decode.kernels)
    or None for the torch reference, which gathers each layer's keys by one index_select (`keys`,
    which the naive prefill reads either way). dtype: the compute dtype (default: the pool's); a
    BF16 pool under FP32 compute is widened where torch reads it (`keys`), the new rows rounded to
    BF16 when written into `new`."""

    def __init__(
        self,
        data: torch.Tensor,
        tables: list[list[int]],
        starts: list[int],
        T: int,
        block_size: int,
        heads: int,
        rank: int,
        attend: Callable[..., torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        B, S, L = len(tables), max(starts) + T, data.shape[0]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # (B, blocks)
        s = torch.arange(S)
        gather = pool_rows(table, s, block_size)  # (B, S) pool row per position
        pos = torch.tensor(starts)[:, None] + torch.arange(T)  # (B, T) the new tokens' positions
        # pool row of each (row, position), 0 past the row's last new token: gathered per layer in
        # `attend` by index_select (a row copy; ~8x faster than one advanced index over all layers)
        self.index = gather.masked_fill(s >= pos[:, -1:] + 1, 0).flatten()  # (B*S,)
        self.S, self.heads = S, heads
        self._buf: torch.Tensor | None = None  # one layer's keys [B*S, W], reused by every layer
        visible = s[None, None] <= pos[..., None]  # (B, T, S): causal, and nothing past the row
        self.dtype = data.dtype if dtype is None else dtype
        self.causal = torch.zeros(B, T, S, dtype=self.dtype).masked_fill(~visible, float("-inf"))
        self._wide: torch.Tensor | None = None  # `keys` widened to `dtype` (a BF16 pool), reused
        self._bias: torch.Tensor | None = None  # (B, T*H, S) the causal mask per query (torch attend)
        self.native, self.table, self.starts, self.block_size = attend, table, list(starts), block_size
        self.rows, self.cols = torch.arange(B).repeat_interleave(T), pos.flatten()  # (B*T,)
        self.slots = gather[self.rows, self.cols]  # (B*T,) where the new rows go
        self.at = self.rows * S + self.cols  # (B*T,) their rows in `buf`
        self.new = data.new_empty(L, B * T, data.shape[-1])  # (L, B*T, W) this step's rows
        self.data, self.B, self.rank = data, B, rank

    def new_rows(self, layer: int) -> torch.Tensor:
        return self.new[layer]

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [B*T, H, W] (the softmax scale folded in) -> softmax(q k^T) k[:, :R]: [B*T, H, R], over
        each row's positions 0 .. its new token's (causal among the T new ones). Native: read
        through the block tables, no gather; torch: the gathered keys, the rest masked by -inf."""
        if self.native is not None:
            return self.native(
                q, self.data[layer], self.new[layer], self.table, self.block_size, self.starts, self.rank
            )
        k = self.keys(layer)  # (B, S, W)
        q = q.reshape(self.B, -1, q.shape[-1])  # (B, T*H, W)
        if self._bias is None:
            self._bias = self.causal.repeat_interleave(self.heads, dim=1)  # queries ordered (t, h)
        probs = torch.baddbmm(self._bias, q, k.transpose(1, 2)).softmax(dim=-1)  # (B, T*H, S)
        return torch.bmm(probs, k[..., : self.rank]).view(len(self.rows), -1, self.rank)  # (B*T, H, R)

    def attend_naive(
        self, layer: int, q: torch.Tensor, w_kvb: torch.Tensor, mm: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        """The model's naive MLA (dsv3.model.attention) over these keys, for prefill chunks: q
        [B*T, H, N + P] (q_nope | rope(q_pe), the softmax scale folded in) -> attention output
        [B*T, H * V]. Each key position's k_nope | v per head from its latent in one GEMM (mm: x [M, K]
        @ w [K, N], the caller's), then causal attention per head (SDPA)."""
        k = self.keys(layer)  # (B, S, W)
        B, S, W = k.shape
        H, R = self.heads, self.rank
        P = W - R
        N = q.shape[-1] - P
        kv = mm(k[..., :R].reshape(B * S, R), w_kvb).view(B, S, H, -1)  # (B, S, H, N + V)
        k_h = torch.cat([kv[..., :N], k[:, :, None, R:].expand(B, S, H, P)], dim=-1)  # (B, S, H, N + P)
        q_h = q.view(B, -1, H, N + P).transpose(1, 2)  # (B, H, T, N + P)
        v = kv[..., N:].transpose(1, 2)  # (B, H, S, V)
        V = v.shape[-1]
        if V < N + P:  # SDPA's fused CPU kernel needs one head width for q, k and v, else it runs its
            v = F.pad(v, (0, N + P - V))  # math path: zero columns, dropped (512 FP32 tokens: 1.8x)
        o = F.scaled_dot_product_attention(
            q_h, k_h.transpose(1, 2), v, attn_mask=self.causal[:, None], scale=1.0
        )
        return o[..., :V].transpose(1, 2).reshape(q.shape[0], -1)  # (B, T, H, V) -> (B*T, H * V)

    def keys(self, layer: int) -> torch.Tensor:
        """The cache rows [B, S, W] of every row's positions 0 .. S-1, this step's new rows included
        (rows past a row's last new token: pool row 0, masked by `causal`)."""
        if self._buf is None:  # one buffer for every layer: a fresh ~10 MB tensor per layer (batch
            # 64, v3-mini) costs page faults on first touch
            self._buf = self.data.new_empty(self.B * self.S, self.data.shape[-1])
        torch.index_select(self.data[layer], 0, self.index, out=self._buf)
        keys = self._buf.index_copy_(0, self.at, self.new[layer])
        if keys.dtype != self.dtype:
            if self._wide is None:
                self._wide = torch.empty(keys.shape, dtype=self.dtype, device=keys.device)
            keys = self._wide.copy_(keys)
        return keys.view(self.B, self.S, -1)

    def finish(self) -> None:
        self.data.index_copy_(1, self.slots, self.new)


def consecutive_start(table: list[int], position: int, block_size: int) -> int | None:
    """Pool row of position 0 when blocks 0 .. position // block_size are consecutive, else None."""
    n, first = position // block_size + 1, table[0]
    if table[n - 1] - first != n - 1 or any(table[i] != first + i for i in range(1, n - 1)):
        return None
    return first * block_size
