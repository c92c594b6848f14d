"""Many-row FP32 products on AVX2: dsv3's register-tiled strip kernel (csrc/streamed.h
`strips_product`, dsv3.infer.decode.gemm.Strips) against oneDNN's packed linear (gemm.Packed, what
those rows ran on before), side by side in one process, alternating (the order flipping every
repeat), medians; per matrix shape and row count, with the max difference from ATen's x @ w.

    python bench/strips_vs_onednn.py [--threads 1] [--rows 5,8,16,32,64] [--repeats 5] [--out F.json]
    python bench/strips_vs_onednn.py --experts [--rows 8,16,64,128,256,512]

--experts: one MoE layer's routed experts instead (Strips.experts_: each chosen expert's rows
through its w1 | w3 and w2 strips) against the two paths those rows ran on before: the native
row-major loop (`experts_`, up to NATIVE_EXPERT_ROWS rows) and oneDNN's grouped GEMMs
(decode.moe.experts on gemm.Packed, more rows); v3-mini's 16 experts (top 4) and, unless --no-v3,
8 experts of V3's shape ([7168, 4096] and [2048, 7168], top 2), random routing.

Matrices: v3-mini's (the preset of docs/benchmarks.md) and one layer of the real DeepSeek-V3
geometry (q_a | kv_a fused [7168, 2112], w_q [1536, 24576], o_proj [16384, 7168], a routed expert's
w1 | w3 [7168, 4096], the head at V3's width and 16,384 of its ids), random, each shape in enough
copies to exceed the last-level cache (the weights come from memory, as in decoding). Needs the
native kernels; meant for CPUs without AVX-512F (where `Strips` is used), runs on any AVX2 CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

V3_MINI = {
    "w_in [512, 2176]": (512, 2176),
    "w_q [1536, 1536]": (1536, 1536),
    "w_o [1024, 512]": (1024, 512),
    "dense w13 [512, 2816]": (512, 2816),
    "head [512, 8192]": (512, 8192),
}
V3 = {
    "V3 w_in [7168, 2112]": (7168, 2112),
    "V3 w_q [1536, 24576]": (1536, 24576),
    "V3 w_o [16384, 7168]": (16384, 7168),
    "V3 expert w13 [7168, 4096]": (7168, 4096),
    "V3 head [7168, 16384]": (7168, 16384),
}
OUT_OF_CACHE = 96e6  # bytes of copies per shape (more than the L3 of the machines measured)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="5,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-v3", action="store_true", help="v3-mini's shapes only")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--experts", action="store_true", help="a MoE layer's routed experts instead")
    args = ap.parse_args(argv)

    import torch

    from dsv3.infer.decode.gemm import Packed, why_not_packed
    from dsv3.infer.decode.kernels import cpu_flags, kernels

    torch.set_num_threads(args.threads)
    native = kernels()
    if native.name != "native":
        sys.exit(f"strips_vs_onednn: needs the native kernels (CPU flags: {' '.join(cpu_flags())})")
    if why_not_packed() is not None:
        sys.exit(f"strips_vs_onednn: oneDNN's packed linear does not run here: {why_not_packed()}")
    onednn = Packed()
    g = torch.Generator().manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    flags = " ".join(cpu_flags())
    print(
        f"CPU flags: {flags}; {args.threads} thread(s); FP32; ms per matrix or layer (medians of {args.repeats})"
    )
    if args.experts:
        return experts_main(args, native, onednn, rows, flags, g)
    print(
        f"{'matrix':<28} {'rows':>4} {'strips':>8} {'oneDNN':>8} {'ratio':>6} {'GB/s':>6} {'max |diff|':>10}"
    )
    results = []
    shapes = {**V3_MINI, **({} if args.no_v3 else V3)}
    for name, (K, N) in shapes.items():
        count = max(1, round(OUT_OF_CACHE / (K * N * 4)))
        ws = [torch.randn(K, N, generator=g) * K**-0.5 for _ in range(count)]
        strips = [native.pack_strips(w) for w in ws]
        for M in rows:
            x = torch.randn(M, K, generator=g)
            sides = {
                "strips": lambda x=x, N=N, strips=strips: [native.strips_mm(x, s, N) for s in strips],
                "onednn": lambda x=x, ws=ws: [onednn.mm(x, w) for w in ws],
            }
            times: dict[str, list[float]] = {k: [] for k in sides}
            for f in sides.values():
                f()  # oneDNN packs on first use
            for r in range(args.repeats):
                for side in sides if r % 2 == 0 else reversed(list(sides)):
                    t = time.perf_counter()
                    sides[side]()
                    times[side].append((time.perf_counter() - t) / count * 1e3)
            a, b = statistics.median(times["strips"]), statistics.median(times["onednn"])
            diff = (native.strips_mm(x, strips[0], N) - x @ ws[0]).abs().max().item()
            gbs = K * N * 4 / a / 1e6
            print(
                f"{name:<28} {M:>4} {a:>8.3f} {b:>8.3f} {b / a:>5.2f}x {gbs:>6.1f} {diff:>10.1e}", flush=True
            )
            results.append(
                {
                    "matrix": name,
                    "K": K,
                    "N": N,
                    "rows": M,
                    "strips_ms": a,
                    "onednn_ms": b,
                    "max_abs_diff": diff,
                }
            )
        onednn.clear()  # the next shape's copies only
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu_flags": flags, "threads": args.threads, "results": results}, f, indent=1)


EXPERTS = {  # name: (experts, dim, expert hidden, experts per token)
    "v3-mini MoE layer (16 x [512, 512 | 256])": (16, 512, 256, 4),
    "V3-shaped experts (8 x [7168, 4096 | 2048])": (8, 7168, 2048, 2),
}


def experts_main(args, native, onednn, rows: list[int], flags: str, g) -> None:
    """The --experts comparison (see the module docstring)."""
    import types

    import torch

    from dsv3.infer.decode.gemm import Strips

    strips = Strips(native)
    print(
        f"{'experts':<44} {'rows':>4} {'strips':>8} {'row loop':>8} {'grouped':>8} {'vs loop':>7} {'vs grouped':>10}"
    )
    results = []
    for name, (E, D, hid, K) in EXPERTS.items():
        if args.no_v3 and name.startswith("V3"):
            continue
        count = max(1, round(OUT_OF_CACHE / (E * 3 * D * hid * 4)))  # layers, to exceed the last-level cache
        layers = []
        for _ in range(count):
            w13 = torch.randn(E, D, 2 * hid, generator=g) * D**-0.5
            w2 = torch.randn(E, hid, D, generator=g) * hid**-0.5
            layers.append(types.SimpleNamespace(w13=list(w13), w2=list(w2), w13_all=w13, w2_all=w2))
        for M in rows:
            xn = torch.randn(M, D, generator=g)
            idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)])
            gate = torch.rand(M, K, generator=g)
            (a, b, c), diff = _time_experts(args.repeats, layers, xn, idx, gate, strips, native, onednn)
            print(
                f"{name:<44} {M:>4} {a:>8.2f} {b:>8.2f} {c:>8.2f} {b / a:>6.2f}x {c / a:>9.2f}x", flush=True
            )
            results.append(
                {
                    "experts": name,
                    "E": E,
                    "D": D,
                    "I": hid,
                    "K": K,
                    "rows": M,
                    "strips_ms": a,
                    "row_loop_ms": b,
                    "grouped_onednn_ms": c,
                    "max_abs_diff": diff,
                }  # fmt: skip
            )
        strips.clear()
        onednn.clear()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu_flags": flags, "threads": args.threads, "experts": results}, f, indent=1)


def _time_experts(repeats: int, layers, xn, idx, gate, strips, native, onednn):
    """ms per layer of the three sides (strips, row loop, grouped oneDNN), medians, alternating; and
    the largest difference of the strips' output from the other two's."""
    import torch

    from dsv3.infer.decode import moe as decode_moe

    ids, gates = idx.flatten().tolist(), gate.flatten().tolist()
    sides = {
        "strips": lambda o, w: strips.experts_(o, xn, w.w13_all, w.w2_all, ids, gates),
        "loop": lambda o, w: native.experts_(o, xn, w.w13_all, w.w2_all, ids, gates),
        "grouped": lambda o, w: decode_moe.experts(o, xn, w, gate, idx, onednn),
    }

    def run(f):
        outs = [torch.zeros_like(xn) for _ in layers]
        for out, w in zip(outs, layers):
            f(out, w)
        return outs

    outs = {k: run(f) for k, f in sides.items()}  # packs on first use
    diff = max((outs["strips"][0] - outs[k][0]).abs().max().item() for k in ("loop", "grouped"))
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(repeats):
        for side in sides if r % 2 == 0 else reversed(list(sides)):
            t = time.perf_counter()
            run(sides[side])
            times[side].append((time.perf_counter() - t) / len(layers) * 1e3)
    return [statistics.median(times[k]) for k in sides], diff


if __name__ == "__main__":
    main()
