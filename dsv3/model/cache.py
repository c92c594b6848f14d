"""A contiguous latent KV cache: the reference implementation of the cache protocol of MLA.

Per layer (main blocks, then MTP blocks) one [B, max_len, R + P] tensor: the latent c_kv and the
rotated shared key of every token, kv_lora_rank + qk_rope_head_dim values (576 for V3). Token at
position p of sequence b lives in row p. The paged, block-table cache of the inference engine
(`dsv3.infer`) implements the same `update` protocol.
"""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig


class LatentCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        n_layers: int | None = None,
    ) -> None:
        self.rank = cfg.kv_lora_rank
        n = cfg.n_layers + cfg.n_mtp_layers if n_layers is None else n_layers
        self.data = torch.zeros(n, batch_size, max_len, cfg.kv_cache_dim, dtype=dtype, device=device)
        self.filled = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens written, per row

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers."""
        n_layers, _, _, width = self.data.shape
        return n_layers * width * self.data.element_size()

    def update(
        self, layer_id: int, kv: torch.Tensor, pe: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T = positions.shape
        if int(positions.max()) >= self.data.shape[2]:
            raise ValueError(
                f"positions: {int(positions.max())} is beyond the cache length {self.data.shape[2]}"
            )
        layer = self.data[layer_id, :B]
        idx = positions[..., None].expand(B, T, layer.shape[-1])
        layer.scatter_(1, idx, torch.cat([kv, pe], dim=-1).to(layer.dtype))
        self.filled[:B] = torch.maximum(self.filled[:B], positions.max(dim=1).values + 1)
        S = int(self.filled[:B].max())
        key_pos = torch.arange(S, device=layer.device).expand(B, S)
        key_pos = key_pos.masked_fill(key_pos >= self.filled[:B, None], -1)
        cached = layer[:, :S]
        return cached[..., : self.rank], cached[..., self.rank :], key_pos
