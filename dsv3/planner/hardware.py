"""Hardware and cluster profiles for the planners: one validated dataclass, JSON/YAML in and out.

A `Hardware` profile holds what the cost model (`dsv3.planner.cost`) needs to turn FLOPs and bytes
into seconds: per GPU the dense peak rates (BF16, FP8), HBM bandwidth and size; per node the GPU
count and the NVLink bandwidth; the scale-out (InfiniBand) bandwidth per GPU; fixed latencies; the
price per GPU-hour. Rates are the vendors' dense (no-sparsity) peaks; what a real kernel reaches is
a separate *efficiency* field, so a profile states the hardware and the efficiencies state the
software, and one set of efficiencies serves every row of the validation (docs/planning.md).

Default efficiencies, and where they come from (published kernel benchmarks, never the figures the
planner is validated against):
  gemm_eff 0.70   DeepGEMM's FP8 GEMMs reach ~1350-1550 of the H800's 1979 TFLOPS on large shapes
  attn_eff 0.55   FlashMLA's compute-bound decode reaches ~580 of 989 BF16 TFLOPS; prefill attention
                  kernels (FlashAttention-3) report similar fractions
  hbm_eff  0.85   FlashMLA's memory-bound decode reaches ~3000 of the 3350 GB/s of HBM3
  elt_eff  0.85   the element-wise passes (norms, RoPE, SwiGLU, FP8 casts, the MoE permutation), as
                  HBM-bound as FlashMLA's decode in a kernel benchmark; DeepSeek's own training trace
                  (deepseek-ai/profile-data, `bench/planner_trace.py`) shows them far slower in a real
                  step, which is why they have their own field
  net_eff  0.90   DeepEP reaches ~153 of 160 GB/s over NVLink and ~43-58 of 50 GB/s over IB
`seq_us` is the serving engine's host work per sequence per decode step (scheduling, sampling,
the cache's bookkeeping) that the device does not hide: 0 on GPUs, where an engine schedules the
next step while the GPU runs this one (an assumption, not a measurement); on this CPU the host is
the device, and `dsv3 plan calibrate` fits it. `block_us` is the host work per block of a forward
pass that the cost model's kernels do not count (the many small operators of routing, the losses,
autograd's graph), independent of the batch; the backward pays it twice, like the element-wise
passes. 0 on GPUs, on the same assumption as `seq_us`; `dsv3 plan calibrate` fits it on this CPU
from one training run.
The NVLink and IB figures of the H800 are the paper's (§3.2.2, "NVLink 160 GB/s, IB 50 GB/s"); the
other presets scale NVLink by their vendors' NVLink-to-H800 ratio.

`group_us` is the cost per group (expert) of a grouped GEMM beyond its one `kernel_us`: 0 on GPUs
(one grouped kernel runs every expert, as DeepGEMM's do); on CPUs ATen's `grouped_mm` runs a GEMM
per expert with rows, and `dsv3 plan calibrate` fits it from a third decode run (the model's decode
step on `small` grows by ~120 us per expert it touches from batch 1 to 16, where 3.6 -> 15.6 of the
16 experts per layer run, and by ~0.23 ms per sequence after that).

`cpu` is a placeholder for this machine: run `dsv3 plan calibrate --out cpu.json` to measure it and
pass `--hardware cpu.json` to the planners.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from dsv3.config import ConfigError, check_known_fields, check_typed, parse_typed


@dataclass(frozen=True)
class Hardware:
    name: str = "H800"
    # per GPU
    bf16_tflops: float = 989.5  # dense BF16 peak
    fp8_tflops: float = 1979.0  # dense FP8 peak
    hbm_gbps: float = 3350.0  # HBM bandwidth, GB/s
    hbm_gb: float = 80.0  # HBM size, GB
    # per node and scale-out (GB/s per GPU, one direction)
    gpus_per_node: int = 8
    nvlink_gbps: float = 160.0  # achievable NVLink bandwidth per GPU (paper §3.2.2)
    ib_gbps: float = 50.0  # InfiniBand bandwidth per GPU (paper §3.2.2: 400 Gb/s NICs)
    # achievable fractions (see the module docstring for how they were chosen)
    gemm_eff: float = 0.70  # of the GEMM peak (BF16 or FP8) on large shapes
    attn_eff: float = 0.55  # of the BF16 peak, attention cores (softmax(QK^T)V)
    hbm_eff: float = 0.85  # of the HBM bandwidth, streaming kernels (weights, the KV cache)
    elt_eff: float = 0.85  # of the HBM bandwidth, the element-wise passes (norms, casts, SwiGLU, ...)
    net_eff: float = 0.90  # of the NVLink and IB bandwidths
    # the attention backward recomputes Q K^T (flash kernels: 2.6x the forward's FLOPs for V3's
    # head widths) or keeps P (the math path: 2x), `cost.attention_backward_ratio`
    flash_attention: bool = True
    # fixed latencies
    kernel_us: float = 5.0  # launch + tail of one kernel (a layer runs ~10)
    group_us: float = 0.0  # per group (expert) a grouped GEMM runs, beyond its one kernel_us
    net_latency_us: float = 10.0  # one all-to-all round (RDMA setup, synchronisation)
    seq_us: float = 0.0  # host work per sequence per decode step not hidden behind the device
    block_us: float = 0.0  # host work per block per forward pass not hidden behind the device
    # money
    price_per_gpu_hour: float = 2.0  # $ per GPU-hour (the paper's rental price, Table 1)

    def __post_init__(self) -> None:
        hints = get_type_hints(Hardware)
        for f in dataclasses.fields(self):
            check_typed(f.name, getattr(self, f.name), hints[f.name])
        for name in ("bf16_tflops", "fp8_tflops", "hbm_gbps", "hbm_gb", "nvlink_gbps", "ib_gbps"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name}: must be a positive rate or size, got {v!r}")
        for name in ("gemm_eff", "attn_eff", "hbm_eff", "elt_eff", "net_eff"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"{name}: an efficiency must be in (0, 1], got {v!r}")
        for name in ("kernel_us", "group_us", "net_latency_us", "seq_us", "block_us", "price_per_gpu_hour"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.gpus_per_node < 1:
            raise ConfigError(f"gpus_per_node: must be >= 1, got {self.gpus_per_node}")

    # ---- derived rates, in units per second -----------------------------------------------------
    def gemm_flops(self, fp8: bool) -> float:
        """Achievable GEMM FLOP/s at the given precision."""
        return (self.fp8_tflops if fp8 else self.bf16_tflops) * 1e12 * self.gemm_eff

    @property
    def attn_flops(self) -> float:
        return self.bf16_tflops * 1e12 * self.attn_eff

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gbps * 1e9 * self.hbm_eff

    @property
    def elt_bytes(self) -> float:
        return self.hbm_gbps * 1e9 * self.elt_eff

    @property
    def nvlink_bytes(self) -> float:
        return self.nvlink_gbps * 1e9 * self.net_eff

    @property
    def ib_bytes(self) -> float:
        return self.ib_gbps * 1e9 * self.net_eff

    # ---- files and overrides --------------------------------------------------------------------
    def replace(self, **changes: Any) -> Hardware:
        check_known_fields(Hardware, changes, "hardware field")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON, or YAML when the file name ends in .yaml/.yml."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "hardware") -> Hardware:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of hardware fields, got {type(d).__name__}")
        check_known_fields(cls, d, f"hardware field in {where}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> Hardware:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such hardware profile")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except Exception as e:  # both parsers' errors: the file is not a profile
            raise ConfigError(
                f"{path}: cannot parse it ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
        return cls.from_dict(d, str(path))


PRESETS: dict[str, Hardware] = {
    # DeepSeek-V3's cluster (§3.1): H800 SXM, NVLink cut to 400 GB/s bidirectional, 8 x 400 Gb/s IB
    "H800": Hardware(),
    # H100 SXM: the same chip with the full 900 GB/s NVLink (160 x 900/400 = 360 achievable)
    "H100": Hardware(name="H100", nvlink_gbps=360.0),
    # H200: H100 compute, 141 GB of HBM3e at 4.8 TB/s
    "H200": Hardware(name="H200", hbm_gbps=4800.0, hbm_gb=141.0, nvlink_gbps=360.0),
    # B200 (HGX): 2.25 / 4.5 PFLOPS dense BF16 / FP8, 8 TB/s HBM3e, 180 GB, NVLink 5 (1.8 TB/s bidirectional)
    "B200": Hardware(
        name="B200", bf16_tflops=2250.0, fp8_tflops=4500.0, hbm_gbps=8000.0, hbm_gb=180.0, nvlink_gbps=720.0
    ),
    # this machine, uncalibrated guesses: replace with `dsv3 plan calibrate --out cpu.json`. One
    # "GPU" is one process on one core; FP8 runs emulated, no faster than BF16; gloo over shared memory.
    "cpu": Hardware(
        name="cpu",
        bf16_tflops=0.05,
        fp8_tflops=0.05,
        hbm_gbps=10.0,
        hbm_gb=8.0,
        gpus_per_node=2,
        nvlink_gbps=1.0,
        ib_gbps=1.0,
        gemm_eff=1.0,
        attn_eff=1.0,
        hbm_eff=1.0,
        elt_eff=1.0,
        net_eff=1.0,
        flash_attention=False,
        kernel_us=20.0,
        net_latency_us=200.0,
        price_per_gpu_hour=0.05,
    ),
}


def resolve_hardware(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> Hardware:
    """A preset name or a profile file (JSON/YAML), then `field=value` overrides (CLI `--set`)."""
    if spec in PRESETS:
        hw = PRESETS[spec]
    elif Path(spec).suffix in (".json", ".yaml", ".yml") or Path(spec).exists():
        hw = Hardware.load(spec)
    else:
        raise ConfigError(f"hardware: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a profile file")
    changes: dict[str, Any] = {}
    hints = get_type_hints(Hardware)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected field=value")
        check_known_fields(Hardware, {key: None}, "hardware field")
        changes[key] = parse_typed(key, raw, hints[key])
    return hw.replace(**changes) if changes else hw
