"""Inference: paged latent cache, continuous-batching engine, MTP speculative decoding, EPLB.

`from dsv3.infer import LLM, SamplingParams` is the offline API (see dsv3.infer.llm). The names
are resolved lazily so that importing a submodule (e.g. dsv3.infer.eplb) stays light.
"""

from __future__ import annotations

__all__ = ["LLM", "Engine", "EngineConfig", "RequestFailed", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from dsv3.infer.llm import LLM

        return LLM
    if name == "SamplingParams":
        from dsv3.infer.sampling import SamplingParams

        return SamplingParams
    if name in ("Engine", "EngineConfig", "RequestFailed", "RequestOutput"):
        from dsv3.infer import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'dsv3.infer' has no attribute {name!r}")
