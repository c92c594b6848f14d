"""The eager fast decode path: one new token per sequence over the paged latent cache (DESIGN §3.2, §8).

Decoding a few sequences is bound by reading every weight once and by per-operator overhead (an
FP32 `small` step reads ~24 MB of weights for ~6M multiply-adds), so this path computes the
model's absorbed-MLA decode step with as few operators and matmuls as it can, on the weights of
dsv3.infer.decode.weights:
- attention: one matmul for q_a | kv_a | rope key, one for the query (W_UK and the softmax scale
  folded in), RoPE as x * cos + rot(x) * sin, the scores over the cached rows [c_kv | k_pe] in ONE
  matmul (the query is laid out [q_lat | rope(q_pe)] like a cache row), and one matmul for the
  output (W_UV folded into o_proj) that also adds the residual (W_UK / W_UV applied per head where
  not folded: dsv3.infer.decode.weights folds them only where it pays, for few rows and for many
  rows separately, `AttnWeights.many`). RMSNorm is x * 1/rms(x), its weight folded into the next
  matmul;
- the cache (`SliceKeys`, `GatheredKeys`, in dsv3.infer.decode.keys): a lone sequence whose
  blocks are consecutive in the pool (the usual case: the allocator hands out increasing ids)
  attends over a slice of the pool and writes its new row in place; otherwise each layer attends
  through the block tables (decode and verification with the native kernels: one pass over the
  pool, csrc/paged_attention.cpp; else, and for prefill chunks, its keys gathered by one
  index_select into one buffer the layers share), and the new rows of all layers go to the pool in
  one write at the end of the step;
- MoE: one matmul for the gate logits and the shared experts' gate | up, then dsv3.infer.decode.moe
  (Python routing and only the K selected experts for one token, grouped GEMMs for more).
- matmuls of up to `KERNEL_ROWS` rows run on dsv3.infer.decode.kernels (native C++ on AVX2 CPUs:
  weights streamed once, FP32 or BF16 storage, FP32 accumulation), more rows on ATen's GEMM; and a
  lone sequence's new tokens (one in plain decoding, 1 + k in verification) go through the whole
  stack in ONE native call (`RowDecoder`: the steps of `_attention` and `_ffn` in C++, its keys
  read through the block table, so its blocks need not be consecutive) whenever the kernels are
  native, on any geometry: where W_UK / W_UV are not folded (V3's shapes) it applies them per head
  to the query and to the attention output, as `_attention` does; it streams whichever attention
  layout has fewer bytes (`dsv3.infer.decode.rows.row_attention`: the few- or many-row folds, or,
  for a BF16 checkpoint, its attention unfolded in BF16, exact, `AttnWeights.stored`). That removes the ~200 operator
  launches per token that otherwise cost as much as the weights, and it splits its work across
  torch's threads (dsv3.infer.decode.kernels).
Prefill chunks run here too where this path's GEMMs beat the model's (`prefill`, `prefill_pays`;
ModelRunner.prefill_hidden): BF16 GEMMs (a BF16 checkpoint on a CPU with BF16 arithmetic), or FP32
ones on oneDNN-packed weights (dsv3.infer.decode.gemm: ~2.5x ATen's FP32 GEMM here); the same fused
projections and grouped experts, and, where the many-row weights keep W_UK / W_UV apart (V3's
shapes: `AttnWeights.w_kvb`), the naive MLA of the model's prefill (K and V per head from the
gathered latents in one GEMM, then SDPA); elsewhere the absorbed attention when it costs little
more. Otherwise (ATen's FP32 GEMMs, the same as the model's) the model's forward runs prefill.
`mixed` runs a step's plain decodes and prefill chunks as one forward: every projection and expert
GEMM over all their rows at once, the attention per part (`_attention`'s parts).
`MoE.last_counts` is set for every MoE layer through `MoE.record`, as the model's forward does
(EPLB statistics).
The same code runs speculative verification (T new tokens per row, causal among themselves) and
MTP module 1 for drafting (`mtp_forward`: eh_proj with enorm / hnorm folded in, then its block over
the MTP layer's cache; `mtp_latents`: the cache rows alone, for positions whose output nobody reads).
The model's forward stays the reference; tests hold this path to it
(greedy tokens identical, logits within 1e-5 in FP32).

Shapes: B rows, D dim, H heads, R kv_lora_rank, P qk_rope_head_dim, W = R + P cache width,
Qw per-head query width, S key positions, L layers, Vo vocabulary.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from dsv3.infer.decode import moe as decode_moe
from dsv3.infer.decode.draft import MtpDraft
from dsv3.infer.decode.gemm import AMX_ROWS, STRIP_ROWS, AmxPacked, Packed, Strips, many_row_gemm
from dsv3.infer.decode.kernels import Kernels, Native, Reference, kernels, plan_kernels
from dsv3.infer.decode.keys import GatheredKeys, SliceKeys, consecutive_start
from dsv3.infer.decode.limits import (
    GEMM_GAIN,
    KERNEL_ROWS,
    STREAMED_HEAD_ROWS,
    expert_rows,
    prefill_pays,
)
from dsv3.infer.decode.rows import row_attention, row_decoder
from dsv3.infer.decode.weights import AttnWeights, DecodeWeights, FfnWeights, rotated_pairs
from dsv3.infer.paged_cache import PagedLatentCache
from dsv3.model.transformer import Transformer

_ATEN = Reference()
log = logging.getLogger(__name__)


class FastDecoder(MtpDraft):
    """The main model on T new tokens per row (1 in plain decoding) over the engine's paged cache.
    weight_dtype: storage dtype of the feed-forward matrices and the head (dsv3.infer.decode.weights);
    native: use the C++ few-row kernels when they build (dsv3.infer.decode.kernels); bf16_gemm: run
    more than KERNEL_ROWS rows through BF16 GEMMs on the BF16-stored matrices (None: where the CPU
    has BF16 arithmetic and weight_dtype is BF16, `plan_kernels`); packed: run those on weights packed
    once for oneDNN where it runs here (dsv3.infer.decode.gemm). The choice is logged once."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedLatentCache,
        fold: bool | None = None,
        weight_dtype: torch.dtype | None = None,
        native: bool = True,
        bf16_gemm: bool | None = None,
        packed: bool = True,
    ) -> None:
        cfg = model.config
        self.model, self.cache = model, cache
        fp32_cpu = model.embed_tokens.weight.dtype == torch.float32 and cache.data.device.type == "cpu"
        self.kernels: Kernels = kernels(native) if fp32_cpu else _ATEN
        plan = plan_kernels()
        bf16 = weight_dtype == torch.bfloat16 and fp32_cpu
        self.bf16_gemm = bf16 and (plan.bf16_gemm if bf16_gemm is None else bf16_gemm)
        # BF16 weights: the attention unfolded in BF16 too (`AttnWeights.stored`, exact: the one-row
        # decoder's layout), with BF16 GEMMs also the many-row one
        self.weights = DecodeWeights(model, fold, weight_dtype, torch.bfloat16 if self.bf16_gemm else None)
        # more than KERNEL_ROWS rows: oneDNN GEMMs on packed weights (BF16 with BF16 GEMMs), or ATen's
        self._aten = many_row_gemm(bf16, self.bf16_gemm, packed and fp32_cpu, self.kernels)
        self._packed = isinstance(self._aten, Packed)
        # many rows' routed experts on the strips too (DSV3_STRIP_EXPERTS=0: the row-major loop)
        self._strips_experts = (
            isinstance(self._aten, Strips) and os.environ.get("DSV3_STRIP_EXPERTS", "1") != "0"
        )
        self._gemm_kind = "bf16_gemm" if self.bf16_gemm else "fp32"  # the key of the STREAMED_*_ROWS limits
        if fp32_cpu:
            attention = self.kernels.attention if isinstance(self.kernels, Native) else "torch"
            stream = getattr(self.kernels, "stream", False)
            log.info(
                plan.line(
                    self.kernels.name + (" (a lone row on weights packed for streaming)" if stream else ""),
                    bf16,
                    self.bf16_gemm,
                    self._packed,
                    attention,
                    cache.data.dtype,
                    amx_rows=AMX_ROWS if isinstance(self._aten, AmxPacked) else 0,
                    kernel_rows=KERNEL_ROWS,
                    strip_rows=STRIP_ROWS if isinstance(self._aten, Strips) else 0,
                )
            )
        self._rows: tuple | None = None  # native one-row decoders: (main layers, MTP module 1)
        self.H, self.R, self.P = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.n_layers, self.n_experts = cfg.n_layers, cfg.n_routed_experts
        self.dtype = model.embed_tokens.weight.dtype  # the activations' (the cache may be BF16 under FP32)
        self.data = cache.data[: cfg.n_layers]  # the main layers' pools (not the MTP layer's)
        self.pools = list(self.data.unbind(0))  # per layer [slots + 1, W]
        self.mtp_data = cache.data[cfg.n_layers : cfg.n_layers + 1]  # MTP module 1's pool, if cached
        self.mtp_pools = list(self.mtp_data.unbind(0))
        self._rope = torch.empty(0)  # [positions, 2, P]: cos, sin per position, pairs repeated
        self._eps: dict[float, torch.Tensor] = {}

    def usable(self) -> bool:
        """False while a module is swapped or forward hooks are set (the model's forward runs then)."""
        return not (self.weights.swapped() or self.weights.hooked())

    @torch.no_grad()
    def forward(self, tokens: list[list[int]], starts: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Token ids [B, T] placed at positions starts[b] + 0..T-1 of sequences with block tables ->
        the last layer's output [B*T, D] (before the final norm: see `logits`, `hidden`). Writes
        the tokens' latents into the cache and sets every MoE layer's `last_counts`."""
        self._fresh()
        row = self._row_decoders()[0] if len(tokens) == 1 else None
        if row is None:
            return self._batched(tokens, starts, tables, naive=False)
        # one sequence: every layer in one native call, which counts experts
        x, positions = self._embed(tokens[0]), [starts[0] + t for t in range(len(tokens[0]))]
        x, counts = row.forward(x, *self._rope_rows(positions), tables[0], self.cache.block_size, starts[0])
        self._record(counts)
        return x

    def _batched(self, tokens: list[list[int]], starts: list[int], tables: list[list[int]], naive: bool):
        """`forward` through the many-row operators, layer by layer (naive: `_attention`'s prefill
        form where the weights have it)."""
        keys, x, positions = self._inputs(self.data, self.pools, tokens, starts, tables, gather=naive)
        cos, sin = self._rope_rows(positions)
        routed: list = []
        row = self._streamed(0)
        for layer, (aw, fw) in enumerate(zip(self.weights.attn, self.weights.ffn)):
            x = self._attention(x, aw, layer, [(x.shape[0], keys, naive)], cos, sin, row)
            x = self._ffn(x, fw, routed, row, layer)
        keys.finish()
        self._record(decode_moe.counts(routed, self.n_experts).unbind(0) if routed else [])
        return x

    def _record(self, counts) -> None:
        for moe, c in zip((f.moe for f in self.weights.ffn if f.moe is not None), counts):
            moe.record(c)  # this path routes on its own: it records what `MoE.route` would

    def prefill_pays(self, B: int, T: int, S: int) -> bool:
        """Whether a prefill chunk of B rows x T new tokens, S key positions (the longest row's
        context), runs on this path (`prefill`) rather than the model's forward: where this path's
        GEMMs are faster than the model's (BF16 GEMMs; FP32 on oneDNN-packed weights) and the chunk's
        attention costs little more (dsv3.infer.decode.limits.prefill_pays)."""
        cfg = self.model.config
        dims = (self.H, self.R, self.P, cfg.qk_nope_head_dim, cfg.v_head_dim)
        gain = GEMM_GAIN["bf16"] if self.bf16_gemm else GEMM_GAIN["packed"] if self._packed else None
        many = self.weights.attn[0].many
        return prefill_pays(B, T, S, dims, gain, many is not None and many.w_kvb is not None)

    @torch.no_grad()
    def prefill(self, tokens: list[list[int]], starts: list[int], tables: list[list[int]]) -> torch.Tensor:
        """A prefill chunk, tokens [B, T] at positions starts[b] + 0..T-1 -> the model's final hidden
        states [B, T, D] (after the final norm, as `Transformer.hidden_states`): the absorbed
        attention over the paged cache, causal among the chunk's tokens, with this path's fused
        projections, grouped expert GEMMs and, on CPUs with BF16 arithmetic and BF16 weights, BF16
        GEMMs; the same cache rows and `last_counts` as the model's forward."""
        self._fresh()
        x = self._batched(tokens, starts, tables, naive=True)
        return self.hidden(x).view(len(tokens), len(tokens[0]), -1)

    @torch.no_grad()
    def mixed(
        self, decode: tuple | None, prefills: list[tuple]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Plain decodes and prefill chunks in ONE forward, each given as (tokens, starts, tables):
        decode tokens [Bd, 1] (or None), each prefill chunk [G, C] (chunks `prefill` would take:
        `prefill_pays`; chunks of different lengths are separate entries). Their rows share every
        projection and expert GEMM, so the weights are read once for all, and each part attends
        over its own keys (the decodes as `forward` does, each chunk as `prefill`). -> (the decodes'
        last-layer output [Bd, D] (see `logits`) or None, each chunk's final hidden states
        [G, C, D]); the same cache rows and tokens as the forwards apart."""
        self._fresh()
        parts, xs, positions = [], [], []
        for i, rows in enumerate(([decode] if decode is not None else []) + list(prefills)):
            prefill = decode is None or i > 0
            keys, x, pos = self._inputs(self.data, self.pools, *rows, gather=prefill)
            parts.append((x.shape[0], keys, prefill))
            xs.append(x)
            positions += pos
        x, (cos, sin) = torch.cat(xs), self._rope_rows(positions)
        routed: list = []
        row = self._streamed(0)
        for layer, (aw, fw) in enumerate(zip(self.weights.attn, self.weights.ffn)):
            x = self._ffn(self._attention(x, aw, layer, parts, cos, sin, row), fw, routed, row, layer)
        for _, keys, _ in parts:
            keys.finish()
        self._record(decode_moe.counts(routed, self.n_experts).unbind(0) if routed else [])
        outs = list(x.split([rows for rows, _, _ in parts]))
        decoded = outs.pop(0) if decode is not None else None
        return decoded, [self.hidden(o).view(len(c[0]), len(c[0][0]), -1) for o, c in zip(outs, prefills)]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Last layer's output [N, D] -> logits [N, Vo] (the final norm, then the head)."""
        return self._head(x, self.model.norm)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's final hidden states [N, D] (after the final norm, as `prefill` returns them)
        -> logits [N, Vo], on this path's head (BF16-stored with BF16 weights)."""
        return self._mm(h, self.weights.head)

    def _head(self, x: torch.Tensor, norm, vocab: int | None = None) -> torch.Tensor:
        xn = torch.mul(x * self._inv_rms(x, norm.eps), norm.weight)
        head = self.weights.head  # (D, Vo)
        if vocab is None or vocab >= head.shape[1]:
            row = self._row_decoders()[0] if x.shape[0] <= KERNEL_ROWS and xn.dtype == torch.float32 else None
            return self._mm(xn, head) if row is None else row.logits(xn)  # the row decoder's (streamed) head
        out = xn.new_full((x.shape[0], head.shape[1]), float("-inf"))
        out[:, :vocab] = self._mm(xn, head[:, :vocab])
        return out

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Last layer's output [N, D] -> the model's final hidden state [N, D] (what MTP reads)."""
        return self.model.norm(x)

    # ---- pieces -------------------------------------------------------------------------------------
    def _fresh(self) -> DecodeWeights:
        """The decode weights, rebuilt (and the widened copies dropped) when the model changed."""
        if self.weights.stale():
            self.weights.build()
            self._aten.clear()
        return self.weights

    def _row_decoders(self) -> tuple:
        """The native one-row decoders (main layers, MTP module 1), None where they cannot run (no
        native kernels); any geometry, W_UK / W_UV folded or not. Rebuilt with the weights, and when
        a routing bias tensor was replaced (the decoders hold the tensors, not the modules)."""
        w, built = self.weights, self._rows
        if (
            built is not None
            and built[2] is w.attn
            and all(g.e_score_correction_bias is b for g, b in built[3])
        ):
            return built
        ffns = [*w.ffn, *([w.mtp.ffn] if w.mtp else [])]
        gates = [(f.moe.gate, f.moe.gate.e_score_correction_bias) for f in ffns if f.moe is not None]
        dims = (self.H, self.R, self.P)
        main = row_decoder(self.kernels, dims, w.attn, w.ffn, self.pools, w.head)
        mtp = (
            row_decoder(self.kernels, dims, [w.mtp.attn], [w.mtp.ffn], self.mtp_pools)
            if self.can_draft()
            else None
        )
        self._rows = (main, mtp, w.attn, gates)
        return self._rows

    def _native_expert_rows(self) -> int:
        """Up to this many rows the native kernels run the routed experts, more: grouped GEMMs."""
        stream_rows = getattr(self.kernels, "stream_rows", False)
        return expert_rows(
            self._gemm_kind, stream_rows, isinstance(self._aten, AmxPacked), self._strips_experts
        )

    def _streamed(self, which: int):
        """The one-row decoder (0: main layers, 1: MTP module 1) whose streamed copies the many-row
        step reads for the native few-row routed experts and the per-head W_UK / W_UV (csrc/streamed.h:
        contiguous slabs of 64 columns, sums in registers; v3-mini at 16 rows: the experts ~2x faster
        than the row-major loop and ~3x than oneDNN's grouped GEMMs, the per-head products ~2x
        than ATen's bmm), or None where many rows do not read them (`Native.stream_rows`: no
        AVX-512F, DSV3_ROW_STREAM=0, the torch reference). Built here when a batch comes before any
        lone sequence: one set of copies serves both."""
        if not getattr(self.kernels, "stream_rows", False):
            return None
        return self._row_decoders()[which]

    def _few(self, rows: int) -> Kernels:
        return self.kernels if rows <= KERNEL_ROWS else self._aten

    def _mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] @ w [K, N] (+ bias [M, N]): the few-row kernel for a few rows, else ATen."""
        return self._few(x.shape[0]).mm(x, w, bias)

    def _inputs(
        self, data, pools, tokens: list[list[int]], starts: list[int], tables: list[list[int]], gather=False
    ):
        """The keys of this step over `data` (layers [L, slots, W]), the token embeddings [B*T, D]
        and the positions of the B*T new tokens (gather: `GatheredKeys` even for a lone sequence)."""
        bs, T = self.cache.block_size, len(tokens[0])
        alone = len(tokens) == 1 and not gather
        start = consecutive_start(tables[0], starts[0] + T - 1, bs) if alone else None
        if start is not None:
            x = self._embed(tokens[0])
            return SliceKeys(pools, start, starts[0], self.R, T), x, [starts[0] + t for t in range(T)]
        # decode / verification: the native attention reads the pool directly (one row per thread);
        # a prefill chunk's many queries per row stay on torch's GEMMs, which split them across threads
        attend = self.kernels.paged_attend if isinstance(self.kernels, Native) and not gather else None
        keys = GatheredKeys(data, tables, starts, T, bs, self.H, self.R, attend, self.dtype)
        x = self.model.embed_tokens.weight[torch.tensor(tokens).flatten()]  # (B*T, D)
        return keys, x, [p + t for p in starts for t in range(T)]

    def _embed(self, tokens: list[int]) -> torch.Tensor:
        """The embeddings [T, D] of one sequence's new tokens (a view for one token)."""
        if len(tokens) == 1:
            return self.model.embed_tokens.weight[tokens[0] : tokens[0] + 1]
        return self.model.embed_tokens.weight[torch.tensor(tokens)]

    def _rope_rows(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, P] at the positions, each frequency repeated for its pair (a table grown on
        demand from the model's frequencies)."""
        if max(positions) >= self._rope.shape[0]:
            n = max(max(positions) + 1, 2 * self._rope.shape[0], 256)
            angles = torch.arange(n, dtype=torch.float32)[:, None] * self.model.rotary.inv_freq
            table = torch.stack([angles.cos(), angles.sin()], dim=1)  # (n, 2, P/2)
            self._rope = table.repeat_interleave(2, dim=-1).to(self.dtype)  # (n, 2, P)
        if len(positions) == 1:
            rows = self._rope[positions[0] : positions[0] + 1]
        else:
            rows = self._rope[torch.tensor(positions)]
        return rows[:, 0], rows[:, 1]

    def _inv_rms(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """1 / sqrt(mean(x^2) + eps) per row: [B, n] -> [B, 1] (RMSNorm without its weight)."""
        if x.shape[0] == 1:  # x x^T: one small matmul
            if eps not in self._eps:
                self._eps[eps] = torch.full((1, 1), eps, dtype=x.dtype)
            return torch.addmm(self._eps[eps], x, x.T, alpha=1 / x.shape[1]).rsqrt_()
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().mul_(1 / x.shape[1])
        return ms.add_(eps).rsqrt_()

    def _attention(self, x, w: AttnWeights, layer: int, parts: list, cos, sin, streamed=None) -> torch.Tensor:
        """x [B, D] -> x + MLA(norm(x)) [B, D], writing the new cache rows. parts: consecutive row
        ranges as (rows, keys, naive), each attending over its own keys (`mixed`: plain decodes, then
        prefill chunks); naive (prefill, with `GatheredKeys`): K and V per head from the latents
        where the weights have `w_kvb`. The projections run once over all rows. streamed: the one-row
        decoder holding this layer (`_streamed`), whose streamed W_UK / W_UV per head the absorbed
        products read where it was built from the same weights, or None."""
        B, R, P = x.shape[0], self.R, self.P
        given = w
        if B > KERNEL_ROWS and w.many is not None:  # the folds that pay for many rows
            w = w.many
        if streamed is not None and (
            row_attention(given) is not w  # the one-row decoder streams the other layout
            or B > STREAMED_HEAD_ROWS[self._gemm_kind]
        ):
            streamed = None
        xn = x * self._inv_rms(x, w.norm_eps)
        a = self._mm(xn if w.norm_w is None else xn * w.norm_w, w.w_in)  # (B, C)
        if w.q_rank:
            cq, a = a[:, : w.q_rank], a[:, w.q_rank :]
            cq = cq * self._inv_rms(cq, w.q_eps)
            q = self._mm(cq if w.q_norm_w is None else cq * w.q_norm_w, w.w_q)
        else:
            q = a[:, R + 2 * P :]
        q = q.reshape(B, self.H, -1)  # (B, H, Qw): q_lat (or q_nope) | q_pe
        if w.q_scale != 1.0:  # the softmax scale, where not folded into the query's columns
            q = q * w.q_scale
        n = q.shape[-1] - P
        q_pe = q[..., n:]
        torch.addcmul(q_pe * cos[:, None], rotated_pairs(q_pe), sin[:, None], out=q_pe)  # RoPE in place
        outs, lo = [], 0
        for rows, keys, naive in parts:
            hi, naive = lo + rows, naive and w.w_kvb is not None
            row = keys.new_rows(layer)  # (rows, W): kv_a_layernorm(c_kv) | rope(k_pe)
            self._latent_rows(a[lo:hi], w, cos[lo:hi], sin[lo:hi], row)
            qs = q[lo:hi]  # [q_lat | q_pe], or [q_nope | q_pe] where W_UK is apart
            if naive:
                outs.append(keys.attend_naive(layer, qs, w.w_kvb, self._mm))  # (rows, H * V)
            else:
                if w.w_uk is not None:  # W_UK per head: (H, rows, N) @ (H, N, R)
                    qn = qs[..., :n].transpose(0, 1)
                    qn = (
                        streamed.heads(layer, False, qn)
                        if streamed is not None
                        else self._aten.bmm(qn, w.w_uk)
                    )
                    qs = torch.cat([qn.transpose(0, 1), qs[..., n:]], -1)
                o = keys.attend(layer, qs)  # (rows, H, R)
                if w.w_uv is not None:  # W_UV per head: (H, rows, R) @ (H, R, V)
                    o = o.transpose(0, 1)
                    o = (
                        streamed.heads(layer, True, o) if streamed is not None else self._aten.bmm(o, w.w_uv)
                    ).transpose(0, 1)
                outs.append(o.reshape(rows, -1))
            lo = hi
        return self._mm(outs[0] if len(outs) == 1 else torch.cat(outs), w.w_o, x)  # residual + o_proj

    def _latent_rows(self, a: torch.Tensor, w: AttnWeights, cos, sin, out: torch.Tensor) -> None:
        """w_in's output a [N, C] (its c_kv | k_pe | rot(k_pe) columns first, after q_a's) -> the cache
        rows kv_a_layernorm(c_kv) | rope(k_pe), written into out [N, W]."""
        R, P = self.R, self.P
        kv, pe = a[:, :R], a[:, R : R + 2 * P]
        torch.mul(kv * self._inv_rms(kv, w.kv_eps), w.kv_norm, out=out[:, :R])
        torch.addcmul(pe[:, :P] * cos, pe[:, P:], sin, out=out[:, R:])

    def _ffn(self, x: torch.Tensor, w: FfnWeights, routed: list, row=None, layer: int = -1) -> torch.Tensor:
        """x [B, D] -> x + FFN(norm(x)); appends the MoE's expert ids to `routed`. row, layer: the
        one-row decoder holding this layer (number `layer` in it) whose streamed expert copies the
        native few-row experts read (`_streamed`), or None."""
        xn = x * self._inv_rms(x, w.norm_eps)  # the gate reads xn (its norm weight folded in)
        xg = xn if w.norm_w is None else xn * w.norm_w  # the other matrices, when not folded
        a = self._mm(xg, w.w_in) if w.w_in is not None else None  # gate logits | shared gate | up
        E = 0 if w.moe is None or w.gate_w is not None else w.moe.n_experts
        if w.hidden:
            x = self._mm(F.silu(a[:, E : E + w.hidden]) * a[:, E + w.hidden :], w.w_down, x)
        else:
            x = x.clone()  # the routed experts add into it in place
        if w.moe is None:
            return x
        logits = a[:, :E] if w.gate_w is None else xn.float() @ w.gate_w
        B, native = x.shape[0], self.kernels is not _ATEN
        weights, idx, _ = w.moe.gate.route_logits(logits)
        few = self._native_expert_rows() if isinstance(self.kernels, Native) else decode_moe.FEW_ROWS
        if B <= few:  # the routing to Python once, then the few selected experts
            routes = list(zip(idx.tolist(), weights.tolist()))
            if native:  # every row's experts in one call
                ids, gates = [e for r, _ in routes for e in r], [g for _, gs in routes for g in gs]
                if row is not None:
                    row.experts_(layer, x, xg, ids, gates)
                elif self._strips_experts and B > KERNEL_ROWS:
                    self._aten.experts_(x, xg, w.w13_all, w.w2_all, ids, gates)
                else:
                    self.kernels.experts_(x, xg, w.w13_all, w.w2_all, ids, gates)
            elif B == 1:
                decode_moe.experts_one(x, xg, w, *routes[0])
            else:
                decode_moe.experts_few(x, xg, w, routes)
            routed.append(routes[0][0] if B == 1 else idx)
        else:
            decode_moe.experts(x, xg, w, weights, idx, self._aten)
            routed.append(idx)
        return x
