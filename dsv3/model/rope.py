"""Rotary position embedding with YaRN context extension (§2.1.1, §4.3; Peng et al. 2023).

DeepSeek-V3 rotates interleaved pairs (x0, x1), (x2, x3), ... of the rope part of queries and the
shared rope key, each pair by one frequency, as the official code does with complex numbers.
YaRN (active iff max_seq_len > original_seq_len, as in the official code) keeps the high-frequency
dimensions, interpolates the low-frequency ones by `rope_factor`, and blends linearly in between;
the attention logits get a factor mscale^2 (see `softmax_scale`).

Shapes: B batch, T tokens, H heads, P = qk_rope_head_dim (P/2 frequencies).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config import ModelConfig


def _correction_dim(n_rotations: float, dim: int, base: float, seq_len: int) -> float:
    """The rotary dimension whose wavelength completes `n_rotations` turns over `seq_len` tokens."""
    return dim * math.log(seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """[P/2] FP32 angular frequencies, with YaRN blending when the context is extended."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not cfg.yarn_active:
        return freqs
    low = max(math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (fast dims), 0: interpolate (slow dims)
    return freqs / cfg.rope_factor * (1 - keep) + freqs * keep


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times mscale^2 with YaRN (mscale = 0.1 * mscale_arg * ln(factor) + 1)."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.yarn_active and cfg.rope_factor > 1:
        m = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0
        scale *= m * m
    return scale


class Rotary(nn.Module):
    """Holds the frequencies; turns positions into (cos, sin) shared by every layer of a forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", inv_frequencies(cfg), persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq = inv_frequencies(self.cfg).to(self.inv_freq.device)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # A dtype cast of the model (.to(bfloat16), .half()) must not reach the frequencies: in BF16
        # they are 0.18 rad off at position 1023 (`small`), and `from_pretrained` rebuilds them in
        # FP32, so a model cast after construction would train on other angles than every later load.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.inv_freq = inv_frequencies(self.cfg).to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int) -> cos, sin [B, T, P/2] in FP32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (B, T, P/2)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x [B, T, H, P] or [B, T, P]; cos/sin [B, T, P/2]. Computed in FP32."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., P/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
