"""Decode-time weights, built once from the model when the engine starts (DESIGN §3.2, §3.4).

A decode step on a small batch is bound by the number of operators and by reading each weight
once, not by FLOPs, so the fast decode path (dsv3.infer.decode) reads weights laid out for as few
matmuls as possible, each [in, out] contiguous (a row-vector product against that layout is up to
2x faster on CPU than against nn.Linear's [out, in]):
- projections that read the same input are concatenated: q_a_proj | kv_a_proj_with_mqa (plus the
  rope key with its pairs rotated, below); the gate | shared experts' gate_proj | up_proj; a dense
  MLP's gate_proj | up_proj; each routed expert's w1 | w3;
- RMSNorm weights are folded into the rows of the matmul that follows the norm (input, q_a,
  post-attention norms, MTP's enorm / hnorm; not kv_a's, whose output is cached, nor the final
  norm, since the head is shared with MTP's own norm), so a norm is x * 1/rms(x);
- the absorbed MLA weights are folded once: W_UK into the query projection (q_b_proj, or q_proj)
  and W_UV into o_proj, each only when the folded matrix costs at most `FOLD_MAX_GROWTH` times the
  multiply-adds of the two it replaces (true for the small presets, where it saves an operator per
  layer; for V3 the folded matrices would be 3-4x larger, so the per-head products stay); for many
  rows, where the GEMMs are bound by multiply-adds rather than operators, only when it costs no
  more (`FOLD_MAX_GROWTH_MANY`, `AttnWeights.many`: v3-mini's folded o_proj is 2x the pair);
- the softmax scale is folded into the query projection;
- RoPE's pair rotation x -> (-x1, x0) is linear: for the one rope key it is folded in as extra
  output columns of w_in (`rotated_pairs`), so rope(k_pe) = k_pe * cos + rot(k_pe) * sin is two
  elementwise operators; the query's, over H heads, would be a quarter of V3's w_q multiply-adds
  (its P rot columns beside each head's N + P), so rot(q_pe) is taken from q_pe after the product.
Folding is done in FP64 and rounded once. With `weight_dtype` (BF16 for a BF16 checkpoint) the
feed-forward matrices and the head are stored in that dtype instead, and exactly: nothing is folded
into them (the norm weight is applied to the activations, `FfnWeights.norm_w`), the router stays a
separate FP32 matrix (routing never sees the storage dtype). The attention's folded matrices keep
the model's dtype; beside them `AttnWeights.stored` holds the attention unfolded in that dtype,
exactly as well (q_a | kv_a | rot(k_pe), q_b, W_UK, W_UV and o_proj as the checkpoint has them,
the norm weights and the softmax scale applied to the activations: `norm_w`, `q_norm_w`,
`q_scale`; a BF16 checkpoint's values are BF16, so nothing is rounded): the one-row decoder
streams it (half the bytes of the FP32 layouts, on every CPU), and where BF16 GEMMs run many rows
it is their layout too (`many_dtype`). The routing bias and the experts' w2 are used in place (w2
copied when `weight_dtype` differs);
the copies are checked against the parameters they came from (`stale`) and rebuilt when the model
was changed in place. The model's modules and checkpoint keys are untouched.

Shapes: D dim, Qr q_lora_rank, H heads, N qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim,
R kv_lora_rank, W = R + P cache width, E routed experts, I expert hidden size, Is shared hidden,
Vo vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from operator import attrgetter

import torch
from torch import nn

from dsv3.model.attention import MLA
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.moe import MoE
from dsv3.model.transformer import Transformer

FOLD_MAX_GROWTH = 2.0  # fold W_UK / W_UV when the folded product costs at most this many times more
FOLD_MAX_GROWTH_MANY = 1.0  # the same for many rows (ATen GEMMs, bound by multiply-adds: no growth)
_VERSION = attrgetter("_version")
F64 = torch.float64


def rotated_pairs(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """RoPE's pair rotation along `dim` (interleaved pairs): (x0, x1) -> (-x1, x0). On the rows
    [P, in] of a projection whose output RoPE rotates (dim 0) it gives the rows of rot(output); on
    activations [..., P] (dim -1), rot(x) itself."""
    d = dim % x.dim()
    pairs = x.unflatten(d, (-1, 2))
    return torch.stack((-pairs.select(d + 1, 1), pairs.select(d + 1, 0)), dim=d + 1).flatten(d, d + 1)


def folds(
    q_in: int, dim: int, nope: int, v: int, rank: int, growth: float = FOLD_MAX_GROWTH
) -> tuple[bool, bool]:
    """Whether to fold W_UK into the query projection (q_in inputs per head) and W_UV into o_proj:
    only when the folded matrix costs at most `growth` times the multiply-adds of the pair."""
    fold_q = q_in * rank <= growth * (q_in * nope + nope * rank)
    fold_o = rank * dim <= growth * (rank * v + v * dim)
    return fold_q, fold_o


def _in_out(rows: list[torch.Tensor], norm: RMSNorm | None, dtype: torch.dtype) -> torch.Tensor:
    """nn.Linear weights [out_i, in] stacked and transposed to [in, sum out_i], the preceding
    norm's weight folded into the rows: (x / rms(x) * g) @ W = (x / rms(x)) @ (diag(g) W)."""
    w = torch.cat([r.to(F64) for r in rows]).T  # (in, out)
    if norm is not None:
        w = w * norm.weight.to(F64)[:, None]
    return w.to(dtype).contiguous()


@dataclass
class AttnWeights:
    w_in: torch.Tensor  # [D, C] q_a (Qr) | c_kv (R) | k_pe (P) | rot(k_pe) (P) [| query without q_lora]
    w_q: torch.Tensor  # [Qr, H * Qw]: per head q_lat (R, or N) | q_pe (P); empty without q_lora
    kv_norm: torch.Tensor  # kv_a_layernorm weight [R] (live: its output is cached)
    w_uk: torch.Tensor | None  # [H, N, R] when W_UK is not folded into w_q
    w_uv: torch.Tensor | None  # [H, R, V] when W_UV is not folded into w_o
    w_o: torch.Tensor  # [H * R, D] W_UV folded into o_proj, else o_proj [H * V, D]
    q_rank: int  # Qr, 0 without q_lora (the query is then the last columns of w_in)
    norm_eps: float
    q_eps: float
    kv_eps: float
    # the weights for many rows (more than the few-row kernels take), where the folds that save
    # multiply-adds there differ from the few-row ones (`FOLD_MAX_GROWTH_MANY`); None: these
    many: AttnWeights | None = None
    # [R, H * (N + V)] kv_b_proj as [in, out] (per head k_nope | v), set where neither W_UK nor W_UV
    # is folded: prefill chunks then compute K and V per head from the latents (the naive MLA)
    w_kvb: torch.Tensor | None = None
    # where the norms' weights and the softmax scale are not folded into the matrices (`stored`):
    # the input norm's weight [D], q_a_layernorm's [Qr] (applied to the activations) and the scale
    # the query is multiplied by after its projection (1.0 where folded)
    norm_w: torch.Tensor | None = None
    q_norm_w: torch.Tensor | None = None
    q_scale: float = 1.0
    # the same attention unfolded in the feed-forward's storage dtype, exactly (`_attention_stored`),
    # where that differs from the model's: the one-row decoder's layout (dsv3.infer.decode.rows)
    stored: AttnWeights | None = None


@dataclass
class FfnWeights:
    w_in: torch.Tensor | None  # [D, C] MoE: gate (E, when fused) | shared gate | shared up; MLP: gate | up
    w_down: torch.Tensor | None  # [Is, D] shared or dense down_proj
    hidden: int  # Is: shared experts' or the dense MLP's hidden size (0: no shared experts)
    norm_eps: float
    norm_w: torch.Tensor | None  # [D] the norm weight to apply to x / rms(x) (None: folded into w_in, w13)
    moe: MoE | None  # the layer's MoE (gate settings, routing bias, last_counts); None: dense MLP
    gate_w: torch.Tensor | None  # [D, E] FP32 gate (norm folded) when its logits are not in w_in
    w13: list[torch.Tensor]  # per expert [D, 2I]: w1 | w3 (one [E, D, 2I] tensor)
    w2: list[torch.Tensor]  # per expert [I, D] (views of the model's w2)
    w13_all: torch.Tensor | None  # [E, D, 2I]
    w2_all: torch.Tensor | None  # [E, I, D] (the model's)


def _attention(
    mla: MLA,
    norm: RMSNorm,
    fold: bool | None,
    many_dtype: torch.dtype | None = None,
    weight_dtype: torch.dtype | None = None,
) -> AttnWeights:
    """The attention's decode weights; with `fold` None the folds are chosen per row count (few rows:
    `FOLD_MAX_GROWTH`; many rows: `FOLD_MAX_GROWTH_MANY`, in `many` where they differ). weight_dtype:
    the feed-forward's storage dtype, in which `stored` keeps the attention unfolded where it differs
    from the model's; many_dtype: the storage dtype of the many-row matrices (BF16 for BF16 GEMMs, whose
    layout is then `stored`; None: the model's)."""
    N, V, R = mla.nope_dim, mla.v_dim, mla.kv_lora_rank
    q_in = (mla.q_proj if hasattr(mla, "q_proj") else mla.q_b_proj).weight.shape[1]
    D = mla.o_proj.weight.shape[0]
    few = folds(q_in, D, N, V, R) if fold is None else (fold, fold)
    w = _attention_folded(mla, norm, *few)
    model_dtype = w.w_o.dtype
    stored = next((d for d in (weight_dtype, many_dtype) if d is not None and d != model_dtype), None)
    if stored is not None:
        w.stored = _attention_stored(mla, norm, stored)
        if many_dtype == stored:  # BF16 GEMMs: many rows on the stored matrices
            w.many = w.stored
            return w
    many = folds(q_in, D, N, V, R, FOLD_MAX_GROWTH_MANY) if fold is None else few
    if many != few:  # rebuild only the parts whose fold differs (the others are shared)
        m = _attention_folded(mla, norm, *many, query=many[0] != few[0], output=many[1] != few[1])
        w.many = replace(
            w,
            **({"w_in": m.w_in, "w_q": m.w_q, "w_uk": m.w_uk} if many[0] != few[0] else {}),
            **({"w_o": m.w_o, "w_uv": m.w_uv} if many[1] != few[1] else {}),
        )
    base = w.many or w
    if base.w_uk is not None and base.w_uv is not None:  # unfolded for many rows: naive prefill
        w.many = replace(base, w_kvb=_kv_b(mla).contiguous())
    return w


def _kv_b(mla: MLA) -> torch.Tensor:
    """kv_b_proj as [in, out]: [R, H * (N + V)], per head k_nope | v (a view)."""
    return mla.kv_b_weight().flatten(0, 1).T


def _in_rows(mla: MLA, q_rows: torch.Tensor) -> list[torch.Tensor]:
    """w_in's rows [out, D]: q_a | kv_a (c_kv | k_pe) | rot(k_pe), or without q_lora kv_a | rot(k_pe)
    | the query's rows `q_rows`."""
    R, kv_a = mla.kv_lora_rank, mla.kv_a_proj_with_mqa.weight  # (R + P, D)
    rows = [kv_a, rotated_pairs(kv_a[R:], 0)]
    return [mla.q_a_proj.weight, *rows] if not hasattr(mla, "q_proj") else [*rows, q_rows]


def _attention_stored(mla: MLA, norm: RMSNorm, dtype: torch.dtype) -> AttnWeights:
    """The attention unfolded, its matrices in `dtype` as the module holds them (a transpose, a
    concatenation, a pair rotation, a reshape: nothing multiplied, so exact where the values are of
    `dtype`, a BF16 checkpoint's in BF16): W_UK and W_UV per head (`w_kvb` for the naive prefill),
    the input norm's and q_a_layernorm's weights and the softmax scale applied to the activations."""
    N = mla.nope_dim
    lora = not hasattr(mla, "q_proj")
    q_lin = mla.q_b_proj if lora else mla.q_proj  # rows per head: q_nope (N) | q_pe (P)
    w_ukv = mla.kv_b_weight()  # (H, N + V, R)
    to = dict(dtype=dtype, memory_format=torch.contiguous_format)
    return AttnWeights(
        w_in=torch.cat(_in_rows(mla, q_lin.weight)).T.to(**to),
        w_q=q_lin.weight.T.to(**to) if lora else torch.empty(0),
        kv_norm=mla.kv_a_layernorm.weight,
        w_uk=w_ukv[:, :N].to(**to),
        w_uv=w_ukv[:, N:].transpose(1, 2).to(**to),
        w_o=mla.o_proj.weight.T.to(**to),
        q_rank=mla.q_a_proj.weight.shape[0] if lora else 0,
        norm_eps=norm.eps,
        q_eps=mla.q_a_layernorm.eps if lora else 0.0,
        kv_eps=mla.kv_a_layernorm.eps,
        w_kvb=_kv_b(mla).to(**to),
        norm_w=norm.weight.float().contiguous(),
        q_norm_w=mla.q_a_layernorm.weight.float().contiguous() if lora else None,
        q_scale=float(mla.softmax_scale),
    )


def _attention_folded(
    mla: MLA, norm: RMSNorm, fold_q: bool, fold_o: bool, query: bool = True, output: bool = True
) -> AttnWeights:
    """The weights with W_UK folded into the query (fold_q) and W_UV into o_proj (fold_o); the query
    side (w_in, w_q, w_uk) is built only with `query`, the output side (w_o, w_uv) with `output`."""
    H, N, P, V = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.v_dim
    dtype = mla.kv_a_proj_with_mqa.weight.dtype
    w_ukv = mla.kv_b_weight().to(F64)  # (H, N + V, R)
    w_uk, w_uv = w_ukv[:, :N], w_ukv[:, N:]  # (H, N, R), (H, V, R)
    lora = not hasattr(mla, "q_proj")
    none = torch.empty(0)
    w_in = w_q = w_o = none
    if query:
        q_lin = mla.q_b_proj if lora else mla.q_proj
        wq = q_lin.weight.to(F64).view(H, N + P, -1) * mla.softmax_scale  # (H, N + P, in)
        q_lat = torch.einsum("hnr,hni->hri", w_uk, wq[:, :N]) if fold_q else wq[:, :N]  # (H, R or N, in)
        q_rows = torch.cat([q_lat, wq[:, N:]], dim=1).flatten(0, 1)  # (H * Qw, in)
        w_in = _in_out(_in_rows(mla, q_rows), norm, dtype)
        w_q = _in_out([q_rows], mla.q_a_layernorm, dtype) if lora else none
    if output:
        D = mla.o_proj.weight.shape[0]
        w_o = mla.o_proj.weight.T  # (H * V, D): as it is when not folded (no FP64 round trip: V3's is 117M)
        if fold_o:
            w_o = torch.einsum("hvr,hvd->hrd", w_uv, w_o.to(F64).view(H, V, D)).flatten(0, 1)  # (H * R, D)
        w_o = w_o.to(dtype).contiguous()
    return AttnWeights(
        w_in=w_in,
        w_q=w_q,
        kv_norm=mla.kv_a_layernorm.weight,
        w_uk=None if fold_q else w_uk.to(dtype).contiguous(),
        w_uv=None if fold_o else w_uv.transpose(1, 2).to(dtype).contiguous(),
        w_o=w_o,
        q_rank=mla.q_a_proj.weight.shape[0] if lora else 0,
        norm_eps=norm.eps,
        q_eps=mla.q_a_layernorm.eps if lora else 0.0,
        kv_eps=mla.kv_a_layernorm.eps,
    )


def _ffn(mlp: nn.Module, norm: RMSNorm, weight_dtype: torch.dtype | None = None) -> FfnWeights:
    dtype = weight_dtype or norm.weight.dtype
    exact = weight_dtype is not None and weight_dtype != norm.weight.dtype  # stored as given, unfolded
    fold = None if exact else norm  # the norm folded into the rows of w_in and w13
    norm_w = norm.weight if exact else None
    if isinstance(mlp, MLP):
        w_in = _in_out([mlp.gate_proj.weight, mlp.up_proj.weight], fold, dtype)
        w_down = _in_out([mlp.down_proj.weight], None, dtype)
        return FfnWeights(
            w_in, w_down, mlp.gate_proj.weight.shape[0], norm.eps, norm_w, None, None, [], [], None, None
        )
    shared = mlp.shared_experts
    rows = [] if shared is None else [shared.gate_proj.weight, shared.up_proj.weight]
    fused_gate = mlp.gate.weight.dtype == torch.float32 and not exact  # fuse the FP32 gate only
    if fused_gate:
        rows.insert(0, mlp.gate.weight)
    e = mlp.experts
    w13 = torch.cat([e.w1, e.w3], dim=2).to(F64)  # (E, D, 2I)
    if fold is not None:
        w13 = w13 * norm.weight.to(F64)[:, None]
    w13 = w13.to(dtype).contiguous()
    w2 = e.w2 if e.w2.dtype == dtype else e.w2.to(dtype).contiguous()
    return FfnWeights(
        w_in=_in_out(rows, fold, dtype) if rows else None,
        w_down=None if shared is None else _in_out([shared.down_proj.weight], None, dtype),
        hidden=0 if shared is None else shared.gate_proj.weight.shape[0],
        norm_eps=norm.eps,
        norm_w=norm_w,
        moe=mlp,
        gate_w=None if fused_gate else _in_out([mlp.gate.weight], norm, torch.float32),
        w13=list(w13.unbind(0)),
        w2=list(w2.unbind(0)),
        w13_all=w13,
        w2_all=w2,
    )


@dataclass
class MtpWeights:
    """MTP module 1 for drafting: eh_proj split by input half, enorm / hnorm folded into its rows."""

    w_emb: torch.Tensor  # [D, D] eh_proj's columns for enorm(Emb(t)), enorm's weight folded in
    w_hid: torch.Tensor  # [D, D] its columns for hnorm(h), hnorm's weight folded in
    e_eps: float
    h_eps: float
    attn: AttnWeights
    ffn: FfnWeights


def _mtp(
    module: nn.Module, fold: bool | None, weight_dtype: torch.dtype | None, many_dtype: torch.dtype | None
) -> MtpWeights:
    w, D = module.eh_proj.weight, module.eh_proj.weight.shape[0]  # (D, 2D): [embedding | hidden]
    block = module.block
    return MtpWeights(
        w_emb=_in_out([w[:, :D]], module.enorm, w.dtype),
        w_hid=_in_out([w[:, D:]], module.hnorm, w.dtype),
        e_eps=module.enorm.eps,
        h_eps=module.hnorm.eps,
        attn=_attention(block.self_attn, block.input_layernorm, fold, many_dtype, weight_dtype),
        ffn=_ffn(block.mlp, block.post_attention_layernorm, weight_dtype),
    )


def _unsupported(prefix: str, block: nn.Module) -> str | None:
    mla, ffn = block.self_attn, block.mlp
    linears = [mla.kv_a_proj_with_mqa, mla.kv_b_proj, mla.o_proj]
    linears += [mla.q_proj] if hasattr(mla, "q_proj") else [mla.q_a_proj, mla.q_b_proj]
    if type(ffn) is MLP:
        linears += [ffn.gate_proj, ffn.up_proj, ffn.down_proj]
    elif isinstance(ffn, MoE):  # MoE or a subclass that only changes how experts run
        s = ffn.shared_experts
        linears += [] if s is None else [s.gate_proj, s.up_proj, s.down_proj]
    else:
        return f"{prefix}.mlp: {type(ffn).__name__} is neither MoE nor MLP"
    if any(type(m) is not nn.Linear for m in linears):
        return f"{prefix}: a projection is not nn.Linear (FP8 weights?)"
    return None


def mtp_supported(model: Transformer) -> str | None:
    """Why the fast path cannot draft with MTP module 1 (None: it can)."""
    if len(model.mtp) == 0:
        return "the model has no MTP module"
    if type(model.mtp[0].eh_proj) is not nn.Linear:
        return "mtp.0.eh_proj: not nn.Linear"
    return _unsupported("mtp.0.block", model.mtp[0].block)


def supported(model: Transformer) -> str | None:
    """Why the fast decode path cannot run this model (None: it can). It knows the plain modules
    only: a swapped projection (FP8 weights) or MoE (EPLB replicas) runs on the reference path."""
    for i, block in enumerate(model.layers):
        why = _unsupported(f"layers.{i}", block)
        if why is not None:
            return why
    if type(model.lm_head) is not nn.Linear:
        return "lm_head: not nn.Linear"
    return None


class DecodeWeights:
    """Decode weights of the main model (layers, and the head as [D, Vo]) and,
    when the fast path can run it, of MTP module 1 (`mtp`, else None). weight_dtype: the storage
    dtype of the feed-forward matrices and the head (None: the model's), and of the attention's
    unfolded copy (`AttnWeights.stored`); many_dtype: that of the attention's many-row matrices
    (`AttnWeights.many`: BF16 where BF16 GEMMs run them, on the stored copy)."""

    def __init__(
        self,
        model: Transformer,
        fold: bool | None = None,
        weight_dtype: torch.dtype | None = None,
        many_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.fold, self.weight_dtype, self.many_dtype = model, fold, weight_dtype, many_dtype
        self.build()

    @torch.no_grad()
    def build(self) -> None:
        model = self.model
        self.attn = [
            _attention(b.self_attn, b.input_layernorm, self.fold, self.many_dtype, self.weight_dtype)
            for b in model.layers
        ]
        self.ffn = [_ffn(b.mlp, b.post_attention_layernorm, self.weight_dtype) for b in model.layers]
        # the head [D, Vo] unfolded: the final norm and MTP's shared_head.norm both read it
        self.head = _in_out([model.lm_head.weight], None, self.weight_dtype or model.lm_head.weight.dtype)
        mtp_ok = mtp_supported(model) is None
        self.mtp = _mtp(model.mtp[0], self.fold, self.weight_dtype, self.many_dtype) if mtp_ok else None
        mtp = [model.mtp[0]] if self.mtp is not None else []
        self._params = [p for n, p in model.named_parameters() if not n.startswith("mtp.") or mtp]
        self._versions = sum(map(_VERSION, self._params))
        layers = model.layers
        # (children dict, name, module) of the modules the copies came from: a swap shows here
        self._modules = [
            (parent._modules, name, child)
            for parent in [model, layers, *layers.modules(), *(m for t in mtp for m in t.modules())]
            for name, child in parent._modules.items()
        ]
        blocks = [*layers, *(t.block for t in mtp)]
        self._hookable = [model, *mtp, *blocks, *(m for b in blocks for m in (b.self_attn, b.mlp))]

    def stale(self) -> bool:
        """True when a parameter of the main model was changed in place since `build` (changes
        through `.data`, and parameters replaced by new ones, are invisible: call `build` then)."""
        return sum(map(_VERSION, self._params)) != self._versions

    def swapped(self) -> bool:
        """True when a module of the main model was replaced (e.g. FP8 or EPLB module swaps)."""
        return any(d.get(name) is not child for d, name, child in self._modules)

    def hooked(self) -> bool:
        """True when forward hooks expect the model's modules to run."""
        g = nn.modules.module
        if g._global_forward_hooks or g._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._hookable)
