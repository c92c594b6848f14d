"""Key mapping between dsv3's module names and the official Hugging Face layout (DESIGN §3.7).

Keys are `model.`-prefixed module names, `lm_head.weight` for the head, routed experts one per key
(`mlp.experts.{j}.{gate,up,down}_proj.weight`, [out, in]; dsv3 keeps them fused as [E, in, out]),
and MTP module k (k = 1..D) at layer index n_layers + k - 1 with its extra `enorm`, `hnorm`,
`eh_proj`, `shared_head.norm`, plus copies of the shared `embed_tokens` and `shared_head.head`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from dsv3.model.transformer import Transformer

_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")


def _hf_prefix(name: str, n_layers: int) -> str:
    """Our module path -> the HF key prefix (without the expert split)."""
    if name.startswith("lm_head."):
        return name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        rest = rest[len("block.") :] if rest.startswith("block.") else rest
        return f"model.layers.{n_layers + k}.{rest}"
    return "model." + name


def hf_state_dict(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF key, tensor) for every weight, experts split per expert, MTP copies included."""
    cfg = model.config
    for name, t in model.state_dict().items():
        prefix = _hf_prefix(name, cfg.n_layers)
        short = name.rsplit(".", 1)[-1]
        if ".mlp.experts." in name and short in _EXPERT_NAMES:
            base = prefix.rsplit(".", 1)[0]
            for j in range(t.shape[0]):
                yield f"{base}.{j}.{_EXPERT_NAMES[short]}.weight", t[j].T  # [in, out] -> [out, in]
        else:
            yield prefix, t
    for k in range(cfg.n_mtp_layers):
        yield f"model.layers.{cfg.n_layers + k}.embed_tokens.weight", model.embed_tokens.weight.detach()
        yield f"model.layers.{cfg.n_layers + k}.shared_head.head.weight", model.lm_head.weight.detach()


def _our_target(hf_key: str, n_layers: int) -> tuple[str | None, int | None]:
    """HF key -> (our state-dict key, expert index or None). (None, None): a shared MTP copy."""
    expert = None
    m = _EXPERT_RE.match(hf_key)
    if m:
        hf_key = f"{m.group(1)}.{ {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}[m.group(3)] }"
        expert = int(m.group(2))
    if hf_key == "lm_head.weight":
        return hf_key, None
    m = _LAYER_RE.match(hf_key)
    if m and int(m.group(1)) >= n_layers:
        k, rest = int(m.group(1)) - n_layers, m.group(2)
        if rest in _MTP_SHARED:
            return None, None
        if not rest.startswith(_MTP_OWN):
            rest = "block." + rest
        return f"mtp.{k}.{rest}", expert
    if not hf_key.startswith("model."):
        return f"<unknown>{hf_key}", None
    return hf_key[len("model.") :], expert


def _expected_targets(model: Transformer) -> set[tuple[str, int | None]]:
    out: set[tuple[str, int | None]] = set()
    for name, t in model.state_dict().items():
        if ".mlp.experts." in name and name.rsplit(".", 1)[-1] in _EXPERT_NAMES:
            out.update((name, j) for j in range(t.shape[0]))
        else:
            out.add((name, None))
    return out


def _is_mtp_copy(key: str, n_layers: int) -> bool:
    """The MTP layers' copies of the shared embedding/head (safetensors refuses shared storage)."""
    m = _LAYER_RE.match(key)
    return bool(m) and int(m.group(1)) >= n_layers and m.group(2) in _MTP_SHARED
