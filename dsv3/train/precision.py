"""`precision=auto`: BF16 or FP32, whichever trains this model faster on this machine.

A GPU takes BF16. On a CPU a 512 x 512 matmul first rules out BF16 where the CPU has no BF16
arithmetic (it runs ~100x slower there). Where BF16 matmul is fast (AVX512_BF16, AMX) that is not
enough: a training step is also elementwise work, dtype conversions and many small expert GEMMs.
On a 2-core Xeon with AMX the `small` preset once trained 1.5x slower in BF16 than in FP32 although
its BF16 matmul was 3.6x faster (oneDNN compiled new expert GEMM kernels every step, since fixed by
`dsv3.model.moe.pad_rows`), a cost no matmul probe sees. So there the forward + backward of the
model itself is timed in both dtypes, from a copy with one block of each kind, and the faster wins.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from dsv3.config import ModelConfig
from dsv3.train.metrics import decided_by_rank0, matmul_peak, train_flops_per_token

PROBE_TOKENS = 2048  # tokens per probed forward (fewer sequences of the run's length when it has more)
PROBE_MAX_PARAMS = 300_000_000  # above these the probe copy is not built: memory, and minutes of
PROBE_MAX_FLOPS = 1e12  # timing while the other ranks wait (a pass of v3-mini's probe: 0.4 TFLOP)


def pick_precision(requested: str, model: ModelConfig, micro_batch: int, seq_len: int) -> tuple[str, str]:
    """Resolve `auto` for training `model` on micro-batches of `micro_batch` x `seq_len` tokens.
    Returns (precision, reason). Under torch.distributed rank 0 measures and every rank takes its
    choice (`decided_by_rank0`): ranks that chose differently would build different models."""
    if requested != "auto":
        return requested, "requested"
    batch = max(1, min(micro_batch, PROBE_TOKENS // seq_len))
    with torch.random.fork_rng():  # the probes draw random inputs: the run's seeded stream is untouched
        return decided_by_rank0(lambda: _measure(model, batch, seq_len))


def _measure(model: ModelConfig, batch: int, seq_len: int) -> tuple[str, str]:
    if torch.cuda.is_available():
        return "bf16", "GPU"
    fp32, bf16 = matmul_peak(torch.float32, 512, 0.1), matmul_peak(torch.bfloat16, 512, 0.1)
    if bf16 < 0.5 * fp32:
        return "fp32", f"BF16 matmul {bf16 / 1e9:.1f} GF/s is slow here (FP32 {fp32 / 1e9:.0f} GF/s)"
    matmul = f"BF16 matmul {bf16 / 1e9:.0f} GF/s vs FP32 {fp32 / 1e9:.0f} GF/s"
    probe = probe_config(model)
    flops = train_flops_per_token(probe, seq_len) * batch * seq_len
    if probe.param_counts()["total_with_mtp"] > PROBE_MAX_PARAMS or flops > PROBE_MAX_FLOPS:
        return "bf16", f"{matmul} (the model is too large to time a step of)"
    t = {"fp32": float("inf"), "bf16": float("inf")}
    for _ in range(2):  # alternated, the best of each: a neighbour's burst hits both sides
        for precision in t:
            t[precision] = min(t[precision], step_time(model, probe, precision, batch, seq_len))
        if max(t.values()) > 1.2 * min(t.values()):  # clear after one round: start-up time saved
            break
    pick = "bf16" if t["bf16"] <= t["fp32"] else "fp32"
    return pick, (
        f"forward + backward of {batch} x {seq_len} tokens: BF16 {t['bf16']:.2f} s vs FP32 {t['fp32']:.2f} s "
        f"({matmul})"
    )


def probe_config(model: ModelConfig) -> ModelConfig:
    """`model` with at most one dense and one MoE layer (and its MTP modules)."""
    dense, moe = min(model.n_dense_layers, 1), min(model.n_moe_layers, 1)
    return dataclasses.replace(model, n_layers=dense + moe, n_dense_layers=dense)


def step_time(model: ModelConfig, probe: ModelConfig, precision: str, batch: int, seq_len: int) -> float:
    """Seconds of one forward + backward of the training loss of `model` in `precision`, estimated
    from `probe` (`probe_config`): its own loss pass (embedding, its layers, head, MTP) plus, for
    every further layer of `model`, the time of the probe's block of that kind. Each timing is the
    second of two passes (the first allocates, and builds the oneDNN kernels)."""
    from dsv3 import Transformer
    from dsv3.parallel.parallelize import Parallelization, parallelize
    from dsv3.train.strategy import Strategy

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = parallelize(Transformer(probe).to(dtype), Parallelization(precision), Strategy())
        ids = torch.randint(0, probe.vocab_size, (batch, seq_len + 1))
        x = torch.randn(batch, seq_len, probe.dim, dtype=dtype)

    def loss() -> None:
        net.loss(ids).total.backward()

    positions, cos, sin, _ = net._prepare(ids[:, :-1], None, None, False)

    def block(layer: torch.nn.Module):
        def run() -> None:
            h = x.detach().requires_grad_()
            layer(h, cos, sin, positions).float().square().mean().backward()

        return run

    total = _timed(loss)
    extra = {0: model.n_dense_layers - probe.n_dense_layers, 1: model.n_moe_layers - probe.n_moe_layers}
    for layer in net.layers:
        kind = int(layer.layer_id >= probe.n_dense_layers)  # 0 dense, 1 MoE
        if extra[kind] > 0:
            total += extra[kind] * _timed(block(layer))
    return total


def _timed(fn) -> float:
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
