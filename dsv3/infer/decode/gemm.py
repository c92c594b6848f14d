"""Many-row GEMMs of the fast decode path: batched decoding, the verification of many rows, prefill
chunks (DESIGN §8).

Above KERNEL_ROWS rows (dsv3.infer.decode.step) the few-row kernels of dsv3.infer.decode.kernels no
longer pay and the step's matrices go through a GEMM library. Which one matters more than anything
else in a batched step: the weights are read once per call, from memory (a v3-mini model is ~100 MB
of matrices, far more than the caches), and how a library streams them sets the rate. Measured on
the AMD EPYC of docs/benchmarks.md (Zen 4: AVX-512 and AVX512_BF16, no AMX; 1 thread, 16 rows
through a [1536, 2048] matrix not in cache): ATen's FP32 GEMM (MKL) 1.94 ms, 52 GFLOP/s; the same
weights packed once into oneDNN's blocked layout 0.78 ms (2.5x); in BF16, ATen's GEMM (oneDNN on
the plain layout) 1.20 ms and packed 0.40 ms (3x). Packed FP32 is 2.1-2.5x faster than ATen's from
1 to 1,024 rows, and differs from it only in the order of the sums (~1e-6 relative).

One contract, four implementations:
- `mm(x, w, bias)`: x [M, K] @ w [K, N] (+ bias [M, N]) -> new [M, N], x FP32;
- `addmm_(out, x, w, alpha)`: out += alpha * x @ w, in place;
- `grouped(x, w, starts)`: rows x [M, K] sorted by expert, w [E, K, N], starts [E + 1] the rows'
  boundaries -> [M, N], row block e times w[e] (the routed experts of many tokens);
- `bmm(x, w)`: x [G, M, K] @ w [G, K, N] -> [G, M, N], one matrix per group (MLA's W_UK and W_UV
  per head where they are not folded: the real V3 geometry's batched decode);
- `clear()`: drop what was kept (the weights were rebuilt).
`Aten`: ATen's GEMMs in the activations' dtype (weights `.to` per call). `WidenOnce`: the same on
BF16-stored weights widened once and kept (CPUs without BF16 arithmetic). `Bf16Gemm`: BF16 weights
multiplied in BF16 (activations rounded to BF16, FP32 accumulation, outputs rounded to BF16).
`Packed`: every weight packed once into oneDNN's layout (`torch.ops.mkldnn`, the path inductor's
CPU weight freezing takes), FP32, or BF16 for BF16-stored weights where BF16 GEMMs run; the packed
copy is kept beside the plain one (which the few-row kernels read), so the many-row matrices cost a
second copy of their bytes. `AmxPacked` (AMX CPUs, BF16 GEMMs) and `Strips` (AVX2 CPUs without
AVX-512F, FP32) are `Packed` with the products of fewer rows on dsv3's own kernels. `many_row_gemm`
picks: one of those where oneDNN packing runs on this machine (a probe at first use;
DSV3_ONEDNN_PACKED=0 turns it off; DSV3_AMX=0 and DSV3_STRIPS=0 leave plain `Packed`), else the
ATen classes.

Shapes: M rows, K inputs, N outputs, E experts.
"""

from __future__ import annotations

import os

import torch

from dsv3.infer.decode.kernels import Reference
from dsv3.model.moe import bucket, grouped_linear, pad_rows, unpad_rows


def kept(store: dict, w: torch.Tensor, make) -> torch.Tensor:
    """w's copy in `store` (a packed layout), made by make() on first use; keyed by w's storage,
    shape, strides and dtype (a view taken again finds its copy), w held beside it so that its
    storage is not reused while the copy is kept."""
    key = (w.data_ptr(), tuple(w.shape), w.stride(), w.dtype)
    if key not in store:
        store[key] = (w, make())
    return store[key][1]


class Aten(Reference):
    """ATen's GEMMs in the activations' dtype (the few-row reference, plus `grouped`)."""

    name = "torch"

    def wide(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return w.to(dtype)

    def grouped(self, x: torch.Tensor, w: torch.Tensor, starts: list[int]) -> torch.Tensor:
        offsets = torch.tensor(starts[1:], dtype=torch.int32, device=x.device)
        return grouped_linear(x, self.wide(w, x.dtype), offsets)

    def bmm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.wide(w, x.dtype))

    def clear(self) -> None:
        pass


class WidenOnce(Aten):
    """ATen's GEMMs, but a weight stored in another dtype than the activations' (BF16 weights, FP32
    compute: CPUs without BF16 arithmetic) is widened once and the copy kept, instead of on every
    call (at batch 64 the per-call widening cost ~30% of a step; ATen's FP32 GEMM on a fresh copy
    runs at about half its rate on a kept one). The copies are keyed by the weight's storage,
    shape and strides (a view taken again, like the head's first columns, finds its copy); they
    cost a second, FP32 copy of those matrices. `clear` drops them (the weights were rebuilt)."""

    name = "torch-widened"

    def __init__(self) -> None:
        self._wide: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (weight, its copy)

    def wide(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w in `dtype`: w itself, or its kept copy (made on first use)."""
        if w.dtype == dtype:
            return w
        key = (w.data_ptr(), tuple(w.shape), w.stride(), dtype)  # the weight is held: no reuse of ptr
        if key not in self._wide:
            self._wide[key] = (w, w.to(dtype))
        return self._wide[key][1]

    def clear(self) -> None:
        self._wide.clear()

    def mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return super().mm(x, self.wide(w, x.dtype), bias)

    def addmm_(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> None:
        super().addmm_(out, x, self.wide(w, x.dtype), alpha)


class Bf16Gemm(Aten):
    """ATen's GEMMs, but BF16 weights are multiplied in BF16: the activations rounded to BF16,
    oneDNN's BF16 GEMM through ATen (FP32 accumulation; the output rounded to BF16, then widened).
    For many rows on CPUs with BF16 arithmetic (AVX512_BF16, AMX), where it is several times faster
    than widening the weights to FP32 per call; not exact (see `KernelPlan`). FP32 weights as `Aten`."""

    name = "torch-bf16"

    def mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if w.dtype != torch.bfloat16:
            return super().mm(x, w, bias)
        y = (x.to(w.dtype) @ w).to(x.dtype)
        return y if bias is None else y.add_(bias)

    def addmm_(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> None:
        if w.dtype != torch.bfloat16:
            return super().addmm_(out, x, w, alpha)
        out.add_((x.to(w.dtype) @ w).to(out.dtype), alpha=alpha)

    def grouped(self, x: torch.Tensor, w: torch.Tensor, starts: list[int]) -> torch.Tensor:
        if w.dtype != torch.bfloat16:
            return super().grouped(x, w, starts)
        counts = torch.tensor([b - a for a, b in zip(starts, starts[1:])])
        xp, counts, rows = pad_rows(x.to(w.dtype), counts)  # oneDNN: a kernel per row count
        offsets = counts.cumsum(0).to(device=x.device, dtype=torch.int32)
        return unpad_rows(grouped_linear(xp, w, offsets), rows).to(x.dtype)

    def bmm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if w.dtype != torch.bfloat16:
            return super().bmm(x, w)
        return torch.bmm(x.to(w.dtype), w).to(x.dtype)


class Packed:
    """Every weight packed once into oneDNN's blocked layout and multiplied there (see the module
    docstring for why). bf16: BF16-stored weights are packed and multiplied in BF16 (as `Bf16Gemm`:
    activations and outputs rounded to BF16, FP32 accumulation); otherwise every weight is packed in
    FP32 (BF16-stored ones widened once, exactly), and the products are FP32 ones in another order
    of summation. The packed copies are keyed by the weight's storage, shape and strides, as
    `WidenOnce`'s (the weight is held with its copy, so its storage is not reused)."""

    def __init__(self, bf16: bool = False) -> None:
        self.bf16 = bf16
        self.name = "onednn-packed-bf16" if bf16 else "onednn-packed"
        self._packed: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.dtype]] = {}
        self._widened = WidenOnce()  # `bmm`'s kept FP32 copies of BF16 weights (without BF16 GEMMs)

    def packed(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """w [K, N] packed for `linear` ([N, K] in oneDNN's layout) and the dtype it computes in."""
        key = (w.data_ptr(), tuple(w.shape), w.stride(), w.dtype)
        hit = self._packed.get(key)
        if hit is None:
            dtype = torch.bfloat16 if self.bf16 and w.dtype == torch.bfloat16 else torch.float32
            hit = self._packed[key] = (w, _pack(w.to(dtype)), dtype)
        return hit[1], hit[2]

    def clear(self) -> None:
        self._packed.clear()
        self._widened.clear()

    def mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        p, dtype = self.packed(w)
        m = bucket(x.shape[0])
        if m > x.shape[0]:  # a bucketed row count: a prompt of a new length compiles no new kernels
            y = _linear(torch.cat([x.to(dtype), x.new_zeros(m - x.shape[0], x.shape[1], dtype=dtype)]), p)
            y = y[: x.shape[0]].to(x.dtype)
            return y if bias is None else y.add_(bias)
        if dtype == x.dtype:
            if bias is not None and bias.is_contiguous():  # the residual added inside oneDNN's GEMM
                return torch.ops.mkldnn._linear_pointwise.binary(x, bias, p, None, "add")
            y = _linear(x, p)
        else:
            y = _linear(x.to(dtype), p).to(x.dtype)
        return y if bias is None else y.add_(bias)

    def addmm_(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> None:
        out.add_(self.mm(x, w), alpha=alpha)

    def grouped(self, x: torch.Tensor, w: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """One packed GEMM per expert that has rows (CPU grouped_mm is a loop of GEMMs too), the rows
        converted to the GEMMs' dtype once and the output once (not per expert: with BF16 GEMMs on
        AMX the per-expert conversions cost more than the GEMMs). Each GEMM takes a bucketed number
        of rows (`dsv3.model.moe.bucket`: oneDNN compiles a kernel per new row count, a quarter of
        a BF16 prefill's time on AMX before), the extra ones the next expert's or zeros, dropped."""
        n = [b - a for a, b in zip(starts, starts[1:])]
        rows = [bucket(c) for c in n]
        xd = x.to(self.packed(w[0])[1])  # every expert's weights compute in the same dtype
        tail = max(a + m for a, m in zip(starts, rows)) - x.shape[0]
        src = torch.cat([xd, xd.new_zeros(tail, x.shape[1])]) if tail > 0 else xd
        out = xd.new_empty(x.shape[0], w.shape[-1])
        for e in range(w.shape[0]):
            a, b = starts[e], starts[e + 1]
            if b > a:
                out[a:b] = _linear(src[a : a + rows[e]], self.packed(w[e])[0])[: b - a]
        return out.to(x.dtype)

    def bmm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """ATen's batched GEMM (not packed: a per-head product is small), in BF16 for BF16-stored
        weights with `bf16`, else in FP32 on a kept FP32 copy (BF16 products on CPUs without BF16
        arithmetic run at ~1 GFLOP/s)."""
        if self.bf16 and w.dtype == torch.bfloat16 and x.dtype != w.dtype:
            return torch.bmm(x.to(w.dtype), w).to(x.dtype)
        return self._widened.bmm(x, w)


# up to this many rows Strips multiplies on its own AVX2 kernel; more: oneDNN's. Measured on the AMD
# EPYC (Zen 3, AVX2 only, FP32, 1 thread, weights out of cache, alternating, bench/strips_vs_onednn.py,
# docs/data/strips_vs_onednn_s22_epyc_avx2.json): against oneDNN's packed linear, v3-mini's matrices
# 1.5-2.1x faster at 5-16 rows, 1.2-1.9x at 32-64, 0.97-1.22x at 128; one layer of the real V3
# geometry 1.4-1.8x at 5-16, 0.98-1.4x at 32-64, 0.96-1.15x at 128 (a first run, older prefetch:
# mixed at 256 rows, 0.92-1.14x). Per-head W_UK / W_UV against ATen's bmm: 1.4-1.5x at 8 rows,
# 1.0-1.07x at 128.
STRIP_ROWS = 128


class Strips(Packed):
    """`Packed` (oneDNN, FP32), but the products of KERNEL_ROWS + 1 .. STRIP_ROWS rows and the per-head
    W_UK / W_UV run on dsv3's AVX2 register-tiled kernel (csrc/streamed.h `strips_product`, through
    dsv3.infer.decode.kernels.Native), on weights packed once into strips of 16 columns: for CPUs with
    AVX2 and no AVX-512F, whose oneDNN FP32 GEMM streams a few rows' weights at ~8 GB/s there (the
    sums of a strip's rows in registers, its weight rows read front to back and prefetched: 11-19
    GB/s). BF16-stored weights stay BF16 in the strips (half the bytes), widened exactly in the
    kernel. Arithmetic: FP32, each output a chain of FMAs over k in order. A matrix used at both row
    counts is kept packed twice (strips and oneDNN), beside its plain copy. `experts_` runs many rows'
    routed experts on the experts' strips (dsv3.infer.decode.step: up to STRIP_EXPERT_ROWS rows)."""

    def __init__(self, native) -> None:
        super().__init__(bf16=False)
        self.name = "avx2-strips + onednn-packed"
        self._native = native
        self._strips: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def strips(self, w: torch.Tensor) -> torch.Tensor:
        """w [K, N] or [G, K, N] (FP32 or BF16) in the kernel's strips, packed on first use."""
        return kept(self._strips, w, lambda: self._native.pack_strips(w if w.dim() == 2 else w.contiguous()))

    def clear(self) -> None:
        super().clear()
        self._strips.clear()

    def mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[0] > STRIP_ROWS or x.stride(-1) != 1:
            return super().mm(x, w, bias)
        exact = bias is not None and bias.dtype == x.dtype and bias.shape == (x.shape[0], w.shape[1])
        y = self._native.strips_mm(x, self.strips(w), w.shape[1], bias if exact else None)
        return y if bias is None or exact else y.add_(bias)

    def experts_(
        self, out: torch.Tensor, xn: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: list, gates: list
    ) -> None:
        """The native `experts_` (out [M, D] += each row's routed experts, each chosen expert once for
        all its rows) with the products on w13's and w2's strips: the experts' weights are read once
        per step, where the row-major loop reads them once per four of their rows."""
        self._native.strips_experts_(out, xn, w13, w2, self.strips(w13), self.strips(w2), ids, gates)

    def bmm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[1] > STRIP_ROWS or not x.numel():
            return super().bmm(x, w)
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self._native.strips_bmm(x, self.strips(w), w.shape[-1])


AMX_ROWS = 32  # up to this many rows AmxPacked multiplies on its own AMX kernel; more: oneDNN's


class AmxPacked(Packed):
    """`Packed` in BF16, but the products of up to AMX_ROWS rows and the routed experts' grouped
    GEMMs (all experts of a layer in one call) run on dsv3's AMX kernel (csrc/amx_gemm.cpp, through
    dsv3.infer.decode.kernels.Native), on weights packed once into the tiles' layout. oneDNN's BF16
    linear pays ~50-100 us a call on top of its bytes; measured here (Xeon with AMX, 1 thread,
    weights out of cache, FP32 rows in, FP32 out, medians of 5): 8-32 rows against v3-mini's
    matrices 1.25-1.9x faster than oneDNN's packed linear, a routed expert's 16 rows x [512, 512]
    ~2x; at 64 rows and more oneDNN is as fast or faster (0.7-1.0x), so it keeps those (grouped
    experts excepted: one call instead of one per expert). Arithmetic: rows rounded to BF16 (nearest
    even), FP32 sums, FP32 output (oneDNN's rounds its output to BF16 too). A matrix used at both
    row counts is kept packed twice (tiles and oneDNN), beside its plain copy."""

    def __init__(self, native) -> None:
        super().__init__(bf16=True)
        self.name = "amx + onednn-packed-bf16"
        self._native = native
        self._tiles: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tiles(self, w: torch.Tensor) -> torch.Tensor:
        """w [K, N] or [E, K, N] (BF16) in the AMX kernel's layout, packed on first use."""
        return kept(self._tiles, w, lambda: self._native.amx_pack(w))

    def clear(self) -> None:
        super().clear()
        self._tiles.clear()

    def mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if w.dtype != torch.bfloat16 or x.dtype != torch.float32 or x.shape[0] > AMX_ROWS:
            return super().mm(x, w, bias)
        exact = bias is not None and bias.dtype == x.dtype and bias.shape == (x.shape[0], w.shape[1])
        y = self._native.amx_mm(x, self.tiles(w), w.shape[1], bias if exact else None)
        return y if bias is None or exact else y.add_(bias)

    def grouped(self, x: torch.Tensor, w: torch.Tensor, starts: list[int]) -> torch.Tensor:
        if w.dtype != torch.bfloat16 or x.dtype != torch.float32:
            return super().grouped(x, w, starts)
        return self._native.amx_grouped(x, self.tiles(w), starts, w.shape[-1])

    def bmm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The per-group products as one grouped GEMM on the tiles (group g's M rows times w[g]):
        per head, W_UK and W_UV of the real V3 geometry are [128, 512] and [512, 128], which ATen's
        BF16 batched GEMM ran at ~90 GFLOP/s here."""
        if w.dtype != torch.bfloat16 or x.dtype != torch.float32 or not x.numel():
            return super().bmm(x, w)
        G, M, K = x.shape
        y = self._native.amx_grouped(
            x.reshape(G * M, K), self.tiles(w), list(range(0, G * M + 1, M)), w.shape[-1]
        )
        return y.view(G, M, -1)


def _pack(w: torch.Tensor) -> torch.Tensor:
    """w [K, N] -> oneDNN's packed [N, K] weight for `_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), None)


def _linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


_probed: dict[bool, str | None] = {}  # bf16 -> why oneDNN packing does not run here (None: it does)


def why_not_packed(bf16: bool = False) -> str | None:
    """None when oneDNN's packed linear runs here (in BF16 too, with `bf16`) and gives x @ w, else why not.
    Probed once per process."""
    if os.environ.get("DSV3_ONEDNN_PACKED", "1") == "0":
        return "DSV3_ONEDNN_PACKED=0"
    if bf16 not in _probed:
        _probed[bf16] = _probe(bf16)
    return _probed[bf16]


def _probe(bf16: bool) -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 24, generator=g), torch.randn(24, 40, generator=g)
    if bf16:
        x, w = x.bfloat16(), w.bfloat16()
    try:
        y = _linear(x, _pack(w)).float()
    except Exception as e:  # an op missing from this torch build, or not runnable on this CPU
        return f"oneDNN's packed linear failed: {type(e).__name__}: {str(e)[:200]}"
    want = x.float() @ w.float()
    if not torch.allclose(y, want, rtol=1e-2 if bf16 else 1e-5, atol=1e-2 if bf16 else 1e-4):
        return "oneDNN's packed linear gave a wrong product"
    return None


def many_row_gemm(bf16_weights: bool, bf16_gemm: bool, packed: bool = True, native=None):
    """The many-row GEMMs for these weights: `AmxPacked` with BF16 GEMMs where oneDNN packing runs
    (and `packed`) and `native` (dsv3.infer.decode.kernels.Native) has AMX here (DSV3_AMX=0 turns
    it off), else `Packed` where oneDNN packing runs, else `Bf16Gemm` (bf16_gemm), `WidenOnce`
    (BF16-stored weights, FP32 compute) or `Aten`."""
    if packed and why_not_packed(bf16_gemm) is None:
        amx = getattr(native, "amx", False) and os.environ.get("DSV3_AMX", "1") != "0"
        if bf16_gemm:
            return AmxPacked(native) if amx else Packed(True)
        strips = (
            hasattr(native, "pack_strips") and not native.wide and os.environ.get("DSV3_STRIPS", "1") != "0"
        )
        return Strips(native) if strips else Packed()
    return Bf16Gemm() if bf16_gemm else WidenOnce() if bf16_weights else Aten()
