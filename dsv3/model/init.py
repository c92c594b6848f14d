"""Weight initialisation that any slice of the model reproduces exactly (§4.2: N(0, 0.006)).

Every weight draws from its own generator, seeded by (the model's seed, the weight's name), and
each routed expert of a fused expert stack [E, ...] by (seed, name, expert). So the value of a
weight does not depend on which other weights were built before it: a rank that materialises
only its pipeline stages and its block of experts (dsv3.parallel.materialize) holds exactly the
values the whole single-process model has, without ever building the rest. Norm weights are 1,
routing biases 0 (buffers, see `Transformer.init_weights`).
"""

from __future__ import annotations

import hashlib
import re

import torch

EXPERT_STACK = re.compile(r"(^|\.)experts\.w[123]$")  # GroupedExperts' fused [E, ...] weights
SEED_BITS = 62


def param_seed(seed: int, name: str, expert: int | None = None) -> int:
    """A 62-bit seed for weight `name` (and one expert row of it): the same in every process."""
    key = f"{seed}:{name}" if expert is None else f"{seed}:{name}:{expert}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def initial_value(
    name: str, shape: tuple[int, ...], std: float, seed: int, rows: range | None = None
) -> torch.Tensor:
    """The FP32 initial value of weight `name` of full shape `shape`; for a fused expert stack,
    only the experts in `rows` (default all): shape [len(rows), *shape[1:]]."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if EXPERT_STACK.search(name):
        rows = range(shape[0]) if rows is None else rows
        out = torch.empty(len(rows), *shape[1:])
        for i, e in enumerate(rows):
            out[i].normal_(0.0, std, generator=torch.Generator().manual_seed(param_seed(seed, name, e)))
        return out
    if rows is not None:
        raise ValueError(f"{name}: rows are only for fused expert stacks, got {rows}")
    return torch.empty(shape).normal_(
        0.0, std, generator=torch.Generator().manual_seed(param_seed(seed, name))
    )


def draw_seed() -> int:
    """A model seed from torch's global generator (so `torch.manual_seed(s)` fixes the model)."""
    return int(torch.randint(0, 2**SEED_BITS, (), device="cpu"))
