"""Expert load distributions and the GPU balance they give, with and without EPLB (DESIGN §8).

A distribution is [L, E] expected tokens per expert (only the shares matter): `uniform`, `zipf:S`
(expert shares proportional to 1 / rank^S, the ranks shuffled per layer with a fixed seed), or a
recorded statistics file (`loads.safetensors` of `dsv3.infer.eplb.stats`, or its JSON form).

The balance of a layout is max GPU load / mean GPU load, averaged over layers. "Without EPLB" places
expert e on GPU floor(e P / E) (`placement.unreplicated_counts`); "with EPLB" runs the real planner
(`dsv3.infer.eplb.planner.plan`) on the loads with R physical slots, exactly what `dsv3 plan eplb`
prints as "after". A finite batch adds sampling noise on top: a GPU expecting lam copies gets a
Poisson count, and the busiest of P GPUs sits about sqrt(2 lam ln P) above the mean
(`sampling_imbalance`), which is what makes small decode batches less even than their loads.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dsv3.config import ConfigError
from dsv3.infer.eplb.placement import balancedness, loads_from_counts, unreplicated_counts
from dsv3.infer.eplb.planner import check_args, plan


def make_loads(spec: str, n_layers: int, n_experts: int, seed: int = 0) -> torch.Tensor:
    """[L, E] FP64 loads from `uniform`, `zipf:S` or a statistics file path."""
    if spec == "uniform":
        return torch.ones(n_layers, n_experts, dtype=torch.float64)
    if spec.startswith("zipf"):
        _, _, raw = spec.partition(":")
        try:
            s = float(raw or "1.0")
        except ValueError:
            raise ConfigError(
                f"loads: zipf exponent must be a number, got {spec!r} (e.g. zipf:1.0)"
            ) from None
        g = torch.Generator().manual_seed(seed)
        base = 1.0 / torch.arange(1, n_experts + 1, dtype=torch.float64) ** s
        return torch.stack([base[torch.randperm(n_experts, generator=g)] for _ in range(n_layers)])
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"loads: {spec!r} is neither uniform, zipf:S nor an existing statistics file")
    from dsv3.infer.eplb.stats import read_loads

    try:
        w = read_loads(path).double()
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"loads {path}: cannot read it ({e})") from None
    if w.shape[1] != n_experts:
        raise ConfigError(f"loads {path}: {w.shape[1]} experts per layer, the model has {n_experts}")
    return w


def balance(
    weight: torch.Tensor, gpus: int, slots: int | None = None, groups: int = 1, nodes: int = 1
) -> float:
    """Mean over layers of max/mean GPU load: `slots` None = no EPLB, else the real planner's
    placement with that many physical expert slots (redundant experts = slots - E)."""
    L, E = weight.shape
    if slots is None:
        if E % gpus and gpus < E:
            raise ConfigError(f"ep: {gpus} GPUs do not divide the {E} experts evenly")
        return float(balancedness(loads_from_counts(weight, unreplicated_counts(L, E, gpus))).mean())
    try:
        check_args(weight, slots, groups, nodes, gpus)
        p = plan(weight, slots, groups, nodes, gpus)
    except ValueError as e:
        raise ConfigError(f"eplb: {e}") from None
    return float(balancedness(p.gpu_loads(weight)).mean())


def sampling_imbalance(mean_per_gpu: float, gpus: int) -> float:
    """Expected max/mean of `gpus` Poisson counts of mean `mean_per_gpu` (Gaussian tail estimate)."""
    if gpus <= 1 or mean_per_gpu <= 0:
        return 1.0
    return 1.0 + math.sqrt(2.0 * math.log(gpus) / mean_per_gpu)
