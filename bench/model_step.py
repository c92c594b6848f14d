"""Forward+backward throughput of the `small` preset: dsv3 against transformers' DeepseekV3ForCausalLM.

Both models hold identical weights (dsv3 saves, transformers loads) and see the same batch; both
run the same computation: main-model logits and next-token cross-entropy, then backward. transformers
runs in two settings: eager (its reference kernels) and its fastest available (SDPA attention,
grouped_mm experts). dsv3's full V3 training loss (with the MTP module and the balance loss) is
timed as an extra row. MFU is against the dense matmul throughput measured in the same run (for
BF16 on a CPU without BF16 arithmetic: the FP32 kernel's, which computes BF16 numerics fastest).

In BF16 on a CPU without BF16 arithmetic (no AVX512-BF16 / AMX), dsv3 runs its GEMMs through
`dsv3.bf16` (BF16 operands widened to FP32 kernels: the numerics of a BF16 GEMM, 20-40x faster than
ATen's BF16 fallback here), as its trainer does; the row "ATen BF16 kernels" times the same dsv3
model without that swap, i.e. on the kernels transformers uses.

    python bench/model_step.py                     # fp32 and bf16, batch 8 x 256
    python bench/model_step.py --dtypes fp32 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from dsv3 import ModelConfig, Transformer, bf16
from dsv3.checkpoint import load_pretrained, save_pretrained

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """Dense n^3 matmul FLOP/s on this machine, now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x activated matmul parameters (embedding lookup excluded) + causal attention (avg context T/2)."""
    c = cfg.param_counts()
    dense = c["activated"] - c["embedding"] - c["norms"]
    attn = 6 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6 * dense + attn


def time_interleaved(steps: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each callable, the callables taking turns within each repeat so a
    change of machine load hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def profile_step(step, top: int) -> None:
    """Where one training step's time goes, by operator (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per implementation (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--profile", type=int, default=0, help="print the top N operators of a dsv3 step")
    args = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    base = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    tokens = args.batch * args.seq
    flops_tok = train_flops_per_token(cfg, args.seq)
    print(f"preset {args.preset}, batch {args.batch} x {args.seq}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    header = f"{'dtype':<5} {'implementation':<38} {'tokens/s':>9}"
    print(f"{header} {'vs HF eager':>11} {'vs HF fast':>10} {'MFU':>7}")
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(base, d)
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            peak = matmul_peak(dtype)
            if dtype == torch.bfloat16 and bf16.needed():  # BF16 numerics run at FP32 kernel speed here
                peak = max(peak, matmul_peak(torch.float32))
            ours = load_pretrained(d, dtype=dtype).train()
            native = None
            if dtype == torch.bfloat16 and bf16.needed():
                native = load_pretrained(d, dtype=dtype).train()  # ATen's BF16 kernels
                bf16.convert(ours)  # what dsv3 runs (and trains with) on a CPU without BF16 units

            def ours_full(model=ours):
                model.loss(ids).total.backward()

            hf_models = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for label, attn, experts in (("eager", "eager", "eager"), ("fast", "sdpa", "grouped_mm")):
                    hf_models[label] = transformers.DeepseekV3ForCausalLM.from_pretrained(
                        d, dtype=dtype, attn_implementation=attn, experts_implementation=experts
                    ).train()

            def main_ce(model, hf: bool):
                def run():
                    logits = model(inputs).logits if hf else model(inputs)
                    F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()

                return run

            runs = [
                ("transformers eager (eager attn/experts)", main_ce(hf_models["eager"], hf=True)),
                ("transformers fast (sdpa, grouped_mm)", main_ce(hf_models["fast"], hf=True)),
                ("dsv3 (same loss: main CE)", main_ce(ours, hf=False)),
                ("dsv3 full V3 loss (+MTP, +balance)", ours_full),
            ]
            if native is not None:
                runs.append(("dsv3 main CE, ATen BF16 kernels", main_ce(native, hf=False)))
            secs = time_interleaved(dict(runs), args.steps, args.warmup)
            rows = {label: tokens / secs[label] for label, _ in runs}
            hf_e, hf_f = rows[runs[0][0]], rows[runs[1][0]]
            for label, tps in rows.items():
                mfu = tps * flops_tok / peak
                print(
                    f"{name:<5} {label:<38} {tps:>9.0f} {tps / hf_e:>10.2f}x {tps / hf_f:>9.2f}x {mfu:>6.1%}"
                )
            print(f"{name:<5} dense matmul peak measured now (MFU basis): {peak / 1e9:.1f} GFLOP/s")
            if args.profile:
                print(f"{name}: dsv3 main-CE step, top {args.profile} operators by self CPU time")
                profile_step(runs[2][1], args.profile)


if __name__ == "__main__":
    main()
