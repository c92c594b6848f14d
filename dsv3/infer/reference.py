"""A minimal greedy decoder on the contiguous latent cache.

Prefill with the naive MLA path, then one token per step with the absorbed path. It is the
reference the batched engine is held to, and what `dsv3 demo` uses to show a few tokens.
"""

from __future__ import annotations

import torch

from dsv3.model.cache import LatentCache
from dsv3.model.transformer import Transformer


@torch.no_grad()
def greedy_generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """prompt [B, T] (equal lengths) -> generated ids [B, max_new_tokens]."""
    B, T = prompt.shape
    param = next(model.parameters())
    cache = LatentCache(model.config, B, T + max_new_tokens, dtype=param.dtype, device=param.device)
    logits = model(prompt, cache=cache, absorb=False)
    out = []
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        out.append(token)
        if step + 1 < max_new_tokens:
            logits = model(token, positions=torch.full_like(token, T + step), cache=cache)
    return torch.cat(out, dim=1)
