"""The precision policy: which GEMMs of a dsv3 model run in FP8 (§3.3, DESIGN §4), by module swaps.

`convert(model)` replaces, in place:
    MLA  q_a_proj, q_b_proj (or q_proj), kv_a_proj_with_mqa, kv_b_proj   -> Fp8Linear
    MLA  o_proj (the linear after attention)   -> Fp8Linear, pow2 scales, input cached in E5M6
    MLP  (dense layers, shared experts)        -> Fp8MLP: fused SwiGLU, its input cached, output recomputed
    GroupedExperts (routed experts)            -> Fp8GroupedExperts, pow2 scales on the dispatched input
                                                  and on the gradient before the down-projection
    MTP  eh_proj                               -> Fp8Linear
and leaves alone the embedding, the output head, the MoE gate, the norms and the attention core
(softmax and the score/value products), which stay in the model's dtype (BF16, or FP32 on CPU).

Swapped modules are subclasses of the originals holding the same Parameter objects, so state-dict
keys (`...o_proj.weight`, `...experts.w1`), checkpoint loading, `MLA.kv_b_weight()` and optimizers
built before or after the swap are unaffected.

`recipe="bf16"` swaps the same modules to the same code with BF16 GEMMs (emulated on CPU: BF16
operands, FP32 accumulation, BF16 output) and BF16 caches. It is the baseline of
`bench/fp8_vs_bf16.py`: the two recipes differ in the precision of exactly these GEMMs and caches.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from dsv3.fp8.linear import Fp8Linear
from dsv3.fp8.mlp import Fp8GroupedExperts, Fp8MLP
from dsv3.fp8.operand import GemmConfig
from dsv3.model.attention import MLA
from dsv3.model.layers import MLP
from dsv3.model.moe import GroupedExperts
from dsv3.model.mtp import MTPModule

RECIPES = ("fp8", "bf16")
_MLA_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def recipe_configs(recipe: str) -> dict[str, GemmConfig]:
    """The GemmConfig of each swapped role under `recipe` ('fp8' or 'bf16')."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe: {recipe!r} is not one of {RECIPES}")
    base = GemmConfig(fp8=recipe == "fp8")
    return {
        "linear": base,
        "attn_out": dataclasses.replace(base, pow2_input=True, cache_e5m6=True),
        "mlp": base,
        "routed": dataclasses.replace(base, pow2_input=True, pow2_grad=True),
    }


def convert(model: nn.Module, recipe: str = "fp8") -> nn.Module:
    """Swap the FP8 GEMMs of DESIGN §4 into `model` in place (see the module docstring); returns it.
    Modules that are already swapped are left as they are."""
    cfgs = recipe_configs(recipe)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _swap(parent, name, child, cfgs)
            if new is not None:
                setattr(parent, name, new)
    return model


def _swap(parent: nn.Module, name: str, child: nn.Module, cfgs: dict[str, GemmConfig]) -> nn.Module | None:
    if isinstance(child, (Fp8Linear, Fp8MLP, Fp8GroupedExperts)):
        return None
    if isinstance(parent, MLA) and name == "o_proj":
        return Fp8Linear.from_linear(child, cfgs["attn_out"])
    if isinstance(parent, MLA) and name in _MLA_LINEARS:
        return Fp8Linear.from_linear(child, cfgs["linear"])
    if isinstance(parent, MTPModule) and name == "eh_proj":
        return Fp8Linear.from_linear(child, cfgs["linear"])
    if type(child) is MLP:
        return Fp8MLP.from_mlp(child, cfgs["mlp"])
    if type(child) is GroupedExperts:
        return Fp8GroupedExperts.from_experts(child, cfgs["routed"])
    return None


def fp8_gemm_modules(model: nn.Module) -> dict[str, GemmConfig]:
    """Qualified name -> GemmConfig of every swapped module (for reports and tests)."""
    return {
        name: m.cfg
        for name, m in model.named_modules()
        if isinstance(m, (Fp8Linear, Fp8MLP, Fp8GroupedExperts))
    }
