"""Few-row matrix products for the fast decode path, native on x86 CPUs (DESIGN §8).

Decoding one token reads every weight of the step once; on a CPU the time is the bytes read plus
the operators launched. ATen's matmul for one row against a [256, 256] expert matrix runs at
~7 GB/s from memory here, a loop written for streaming runs at ~2x that, and BF16 weights halve
the bytes again. So this module offers three operations with one contract and two implementations:
- `mm(x, w, bias)`: x [M, K] @ w [K, N] (+ bias [M, N]) -> new [M, N];
- `addmm_(out, x, w, alpha)`: out += alpha * x @ w, in place;
- `experts_(out, xn, w13, w2, ids, gates)`: out [M, D] += sum_j gates[m][j] *
  w2[e] (silu(xn[m] @ w1[e]) * (xn[m] @ w3[e])) with e = ids[m][j], w13 [E, D, 2I] = w1 | w3,
  w2 [E, I, D]: the routed experts of a few tokens in one call;
- `RowDecoder` (native only): a whole single-sequence decode step, every layer's attention over its
  cache slice and its feed-forward with routing, in one call (dsv3.infer.decode builds it).
x, out and the activations are FP32; w may be FP32 or BF16 (widened to FP32 when loaded, which is
exact), accumulation is FP32, so a BF16 weight gives the same products as its FP32 copy.

`Native` is the C++ kernel in csrc/few_rows.cpp, with csrc/paged_attention.cpp (the many-row attention
of dsv3.infer.decode.keys) built into it (AVX2 + FMA; the output columns of a product, and
the heads of the attention, split across torch's intra-op threads through at::parallel_for, with
results independent of the thread count), compiled on first use by
torch.utils.cpp_extension into torch's extension cache (~30 s once per machine; set
DSV3_NATIVE_KERNELS=0 to skip it). The extension's name, and so its build directory in that cache,
carries a hash of the source, the compiler flags and the torch version (`build_name`): torch keys
the cache by name only, so under one fixed name two checkouts (or two torch versions) on a machine
would rebuild over each other's build at every start. `Reference` is the same contract in plain
torch: used where the kernel cannot be built (no compiler, not x86, no AVX2) and the reference the
tests hold it to.

Shapes: M rows (a few), K inputs, N outputs, E experts, D dim, I expert hidden size, J experts per row.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).parent / "csrc" / "few_rows.cpp"
PAGED_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"  # GatheredKeys' native attend
HEADER = Path(__file__).parent / "csrc" / "widen.h"  # the loads and the BF16 rounding the sources include
ATTEND = Path(__file__).parent / "csrc" / "attend_impl.h"  # paged_attention.cpp's row loop, both widths
AMX_SOURCE = Path(__file__).parent / "csrc" / "amx_gemm.cpp"  # dsv3.infer.decode.gemm.AmxPacked's GEMMs
STREAMED = Path(__file__).parent / "csrc" / "streamed.h"  # the one-row decoder's packed matrices
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")  # OpenMP: at::parallel_for runs on torch's threads
LDFLAGS = ("-fopenmp",)  # libgomp.so.1: the runtime torch has already loaded (one thread pool)
BASE_NAME = "dsv3_few_rows"


class Kernels(Protocol):
    name: str

    def mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...

    def addmm_(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> None: ...

    def experts_(
        self,
        out: torch.Tensor,
        xn: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        ids: list[int],
        gates: list[float],
    ) -> None: ...


class Reference:
    """The contract in plain torch (weights widened to the activations' dtype per call)."""

    name = "torch"

    def mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = w.to(x.dtype)
        return x @ w if bias is None else torch.addmm(bias, x, w)

    def addmm_(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> None:
        out.addmm_(x, w.to(x.dtype), alpha=alpha)

    def experts_(self, out, xn, w13, w2, ids, gates) -> None:
        J, hid = len(ids) // xn.shape[0], w2.shape[1]
        for i, (e, g) in enumerate(zip(ids, gates)):
            m = i // J
            t = xn[m : m + 1] @ w13[e].to(xn.dtype)  # (1, 2I)
            out[m : m + 1].addmm_(F.silu(t[:, :hid]) * t[:, hid:], w2[e].to(xn.dtype), alpha=g)


@dataclass(frozen=True)
class KernelPlan:
    """The decode kernels chosen for this CPU at start-up (`plan_kernels`):
    - `kind`: amx-bf16 / avx512-bf16 (BF16 arithmetic), avx2-fp32, or generic-fp32;
    - a lone sequence and up to KERNEL_ROWS rows: the native kernels where they build (FP32 compute,
      weights stored in FP32 or BF16 and widened exactly), on every kind;
    - more rows (batched decode, verification of many rows): with `bf16_gemm`, matrices stored in
      BF16 are multiplied by BF16 GEMMs (`Bf16Gemm`: activations and outputs rounded to BF16, so
      logits move by ~1e-2 relative instead of 1e-5); else FP32 GEMMs (ATen) on widened weights."""

    kind: str
    bf16_gemm: bool
    flags: tuple[str, ...]

    def line(
        self,
        native: str,
        bf16_weights: bool,
        bf16_gemm: bool,
        packed: bool = False,
        attention: str = "",
        cache: torch.dtype | None = None,
        amx_rows: int = 0,
        kernel_rows: int = 4,
        strip_rows: int = 0,
    ) -> str:
        """The one log line stating the choice (native: the few-row kernels' name, which run up to
        `kernel_rows` rows; packed: the many-row GEMMs run on oneDNN-packed weights,
        dsv3.infer.decode.gemm; attention: the batched attention's kernel; cache: the latent cache's
        dtype; amx_rows: products of up to this many rows, the routed experts and the per-head W_UK /
        W_UV on dsv3's AMX kernel, dsv3.infer.decode.gemm.AmxPacked; strip_rows: products of up to
        this many rows and the per-head W_UK / W_UV on dsv3's AVX2 strip kernel,
        dsv3.infer.decode.gemm.Strips; 0: not used)."""
        lib = "oneDNN, packed weights" if packed else "oneDNN" if bf16_gemm else "ATen"
        if amx_rows:
            lib = (
                f"AMX tiles up to {amx_rows} rows, for the routed experts and per-head W_UK / W_UV, else "
                + lib
            )
        if strip_rows:
            lib = f"AVX2 register-tiled strips up to {strip_rows} rows, per-head W_UK / W_UV too, else " + lib
        many = f"BF16 GEMMs ({lib}) on the BF16 weights" if bf16_gemm else f"FP32 GEMMs ({lib})"
        stored = "BF16" if bf16_weights else "model-dtype"
        return (
            f"dsv3 decode kernels: {self.kind} (CPU flags: {' '.join(self.flags) or 'none read'}); "
            f"up to {kernel_rows} rows: {native} kernels, FP32 compute on {stored} feed-forward weights; more rows: {many}"
            + (f"; batched attention: {attention}" if attention else "")
            + (f"; KV cache: {_DTYPE_NAMES.get(cache, str(cache))}" if cache is not None else "")
        )


def plan_kernels(flags: list[str] | None = None) -> KernelPlan:
    """The kernel plan for a CPU with these flags (default: this CPU's, `cpu_flags`)."""
    f = cpu_flags() if flags is None else flags
    if "amx_bf16" in f:
        kind, bf16 = "amx-bf16", True
    elif "avx512_bf16" in f:
        kind, bf16 = "avx512-bf16", True
    elif "avx2" in f and "fma" in f:
        kind, bf16 = "avx2-fp32", False
    else:
        kind, bf16 = "generic-fp32", False
    return KernelPlan(kind, bf16, tuple(f))


_DTYPE_NAMES = {torch.float32: "FP32", torch.bfloat16: "BF16"}


class Native:
    """The C++ kernel (csrc/few_rows.cpp). `wide`: the paged attention runs its AVX-512 width
    (16 FP32 lanes: the attention 1.17-1.20x faster than AVX2's 8 on v3-mini's geometry, batch 8-64,
    100-1,000 keys; a decode step ~1.05x), and the streamed products their AVX-512F loops, where the
    CPU has AVX-512F. `stream`: the one-row decoder (`RowDecoder`) keeps its matrices packed for
    streaming (csrc/streamed.h: one contiguous slab per 64 output columns; BF16 GEMVs from memory
    1.7-2.7x the row-major loop's on the AMD EPYC Zen 4, 1.3-1.85x with the AVX2 loops on Zen 3), a
    second copy of the feed-forward and attention weights; DSV3_ROW_STREAM=0 turns it off."""

    name = "native"

    def __init__(self, module, wide: bool | None = None) -> None:
        self.mm, self.addmm_, self.experts_ = module.mm, module.addmm_, module.experts_
        self.RowDecoder = module.RowDecoder
        self._paged = module.paged_attend  # csrc/paged_attention.cpp (dsv3.infer.decode.keys)
        self.wide = "avx512f" in cpu_flags() if wide is None else wide
        self.stream = os.environ.get("DSV3_ROW_STREAM", "1") != "0"
        # csrc/amx_gemm.cpp (dsv3.infer.decode.gemm.AmxPacked): where the CPU has AMX-BF16 and the
        # OS grants this process the tile state
        self.amx = "amx_bf16" in cpu_flags() and module.amx_ready()
        self.amx_pack, self.amx_mm, self.amx_grouped = module.amx_pack, module.amx_mm, module.amx_grouped
        # csrc/streamed.h's strips of 16 columns, for many rows on AVX2 (dsv3.infer.decode.gemm.Strips)
        self.pack_strips, self.strips_mm, self.strips_bmm, self.strips_experts_ = (
            module.pack_strips,
            module.strips_mm,
            module.strips_bmm,
            module.strips_experts_,
        )

    @property
    def stream_rows(self) -> bool:
        """Whether many-row decoding reads the one-row decoder's streamed copies too (routed experts,
        per-head W_UK / W_UV; dsv3.infer.decode.step): with the AVX-512F loops, where they were
        measured faster than the alternatives. With AVX2's, v3-mini batch 16 and 64 (Zen 3, 1-2
        threads, alternating) ran 0.97-1.11x the row-major kernels and GEMMs: noise, so not there."""
        return self.stream and self.wide

    @property
    def attention(self) -> str:
        """The batched attention's kernel and width, for the kernel plan's log line."""
        return f"native, {'AVX-512 (16 lanes)' if self.wide else 'AVX2 (8 lanes)'}"

    def paged_attend(self, q, pool, new, table, block: int, starts: list[int], rank: int, wide=None):
        """softmax(q . keys) @ keys[:, :rank] per row, keys read through the block table
        (csrc/paged_attention.cpp); wide: the AVX-512 width (default: where this CPU has it)."""
        return self._paged(q, pool, new, table, block, starts, rank, self.wide if wide is None else wide)


_loaded: dict[str, Kernels] = {}  # the build is per process: load once, keep the reason if it failed
why_not_native: str | None = None


def _unavailable() -> str | None:
    if os.environ.get("DSV3_NATIVE_KERNELS", "1") == "0":
        return "DSV3_NATIVE_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    return None


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what kernel choice reads


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The flags of CPU_FLAGS this CPU has, from /proc/cpuinfo's first `flags` line (or the given
    text); empty where there is no such file (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return [f for f in CPU_FLAGS if f in have]


def describe_cpu() -> str:
    """One line naming the CPU, its vector extensions and torch's view of them (benchmark headers)."""
    name = "unknown CPU"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                name = ln.partition(":")[2].strip()
                break
    except OSError:
        name = platform.processor() or name
    flags = " ".join(cpu_flags()) or "no flags read"
    return f"{name}; flags: {flags}; torch capability {torch.backends.cpu.get_cpu_capability()}"


def _ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; the pip package's copy is not there when
    the virtual environment is not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def build_name(
    source: bytes,
    cflags: tuple[str, ...] = CFLAGS,
    torch_version: str = torch.__version__,
    ldflags: tuple[str, ...] = LDFLAGS,
    path: Path = SOURCE,
) -> str:
    """The extension name for this source, these compiler / linker flags, this torch and this
    source file's location: `dsv3_few_rows_<hash>`.
    Everything that changes the build goes into the hash, so a build is reused exactly when it is
    the same build (a valid Python identifier: the name is the module's PyInit_ symbol). The path
    counts because torch writes it into the build's build.ninja: two checkouts of the same source
    sharing one build directory would each see the other's command line and rebuild."""
    h = hashlib.sha256()
    where = str(Path(path).resolve()).encode()
    for part in (
        source,
        "\0".join(cflags).encode(),
        torch_version.encode(),
        "\0".join(ldflags).encode(),
        where,
    ):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return f"{BASE_NAME}_{h.hexdigest()[:16]}"


def build_directory(name: str) -> Path:
    """Where the extension `name` is built: TORCH_EXTENSIONS_DIR or torch's default root, per
    Python version (as torch lays it out)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[Path]:
    """Hold an OS file lock on `directory` while torch builds or loads the extension there.

    torch's own build lock is a plain file (`lock`) that every other process waits on until it is
    deleted: a build killed half-way (Ctrl-C, kill -9, a test's timeout) leaves it behind and every
    later start waits forever. Our flock is released by the kernel when its holder dies, and every
    dsv3 build of this directory takes it first, so a `lock` file found while holding it belongs to
    a dead build and is removed."""
    import fcntl  # POSIX; the native kernel is only built on x86-64 Linux/macOS anyway

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "dsv3.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                warnings.warn(f"dsv3: removing {stale}, left by an interrupted kernel build", stacklevel=3)
                stale.unlink(missing_ok=True)
            yield directory
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def kernels(native: bool = True) -> Kernels:
    """The native kernel when `native` and it builds here, else the torch reference (the reason
    the native one is not used is in `why_not_native`)."""
    global why_not_native
    if not native:
        return Reference()
    if "native" not in _loaded:
        why_not_native = _unavailable()
        if why_not_native is None:
            try:
                from torch.utils.cpp_extension import load

                _ninja_on_path()

                name = build_name(
                    b"".join(
                        p.read_bytes() for p in (SOURCE, PAGED_SOURCE, HEADER, ATTEND, AMX_SOURCE, STREAMED)
                    )
                )
                with build_lock(build_directory(name)) as directory:
                    module = load(
                        name,
                        [str(SOURCE), str(PAGED_SOURCE), str(AMX_SOURCE)],
                        extra_cflags=list(CFLAGS),
                        extra_ldflags=list(LDFLAGS),
                        build_directory=str(directory),
                        verbose=False,
                    )
                _loaded["native"] = Native(module)
            except Exception as e:  # no compiler, no ninja, a build error: decode still works
                why_not_native = f"the kernel did not build: {type(e).__name__}: {str(e)[:300]}"
                warnings.warn(
                    f"dsv3: native decode kernels unavailable, using torch ({why_not_native})", stacklevel=2
                )
        if "native" not in _loaded:
            _loaded["native"] = Reference()
    return _loaded["native"]
