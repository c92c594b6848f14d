"""The offline API, in the style users know from vLLM:

    from dsv3.infer import LLM, SamplingParams
    llm = LLM("path/to/ckpt")                                  # config.json + safetensors (+ tokenizer.json)
    outs = llm.generate(["def fib(n):", [0, 17, 42]], SamplingParams(temperature=0, max_tokens=32))
    middle = llm.complete(prefix="def add(a, b):\\n    return ", suffix="\\n")   # FIM, DESIGN §6

Prompts are strings (needs a tokenizer) or token-id lists (always accepted). Strings are encoded as
they are, without bos: a document in training starts with bos, so pass it yourself, or use `chat`
and `complete`, which build the training-time layouts (the chat format and PSM FIM of DESIGN §6).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dsv3.checkpoint import load_pretrained
from dsv3.infer.engine import Engine, EngineConfig
from dsv3.infer.outputs import RequestFailed, RequestOutput
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.scheduler import RequestError
from dsv3.model.transformer import Transformer

Prompt = str | list[int]


def load_tokenizer(path: str | Path):
    """The tokenizer.json of a checkpoint directory, or None if it has none."""
    if not (Path(path) / "tokenizer.json").exists():
        return None
    from dsv3.data.tokenizer import Tokenizer

    return Tokenizer.load(path)


def text(value: object, what: str) -> str:
    """`value` if it is text the tokenizer can take: a str that is valid Unicode (a lone surrogate,
    e.g. from a file read with errors="surrogateescape", is not) -> else RequestError naming `what`."""
    if not isinstance(value, str):
        raise RequestError(f"{what}: expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"{what}: not valid text ({e.reason} {value[e.start : e.end]!r} at position {e.start})"
        ) from e
    return value


def bf16_checkpoint(path: str | Path) -> bool:
    """True when a checkpoint directory's weights are BF16: its config.json declares bfloat16
    (`torch_dtype`, or transformers 5's `dtype`) and no quantization (an FP8 checkpoint declares
    bfloat16 too, but its dequantised weights are not BF16 values)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return dtype == "bfloat16" and "quantization_config" not in cfg


class LLM:
    def __init__(
        self,
        model: str | Path | Transformer,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tokenizer=None,
        speculative: bool = False,
        fp8_weights: bool = False,
        verify: bool = True,
        **engine_options,
    ) -> None:
        """model: a checkpoint directory (official HF layout, BF16/FP32 or FP8 + weight_scale_inv,
        dequantised to `dtype` on load) or a Transformer. fp8_weights: keep an FP8 checkpoint's
        projections in FP8 and run them through the block-scaled GEMM (dsv3.infer.fp8_weights).
        verify: check a training checkpoint's files against its manifest.json (SHA-256) and warn on
        NaN/inf weights (dsv3.checkpoint.load_pretrained); False skips both for a faster start.
        engine_options: fields of EngineConfig. A BF16 checkpoint computed in FP32 keeps the fast
        decode path's feed-forward matrices and head in BF16 (`weight_dtype`, exact: the values are
        BF16) and its latent KV cache in BF16 (`kv_cache_dtype`: each cached value rounded once, twice
        the tokens per byte, as vLLM's "auto" for a BF16 model) unless those are given."""
        if isinstance(model, Transformer):
            self.model = model
        else:
            if fp8_weights:
                from dsv3.infer.fp8_weights import load_fp8_model

                self.model = load_fp8_model(model, dtype=dtype, device=device, verify=verify)
            else:
                self.model = load_pretrained(model, dtype=dtype, device=device, verify=verify)
                if dtype == torch.float32 and bf16_checkpoint(model):
                    engine_options.setdefault("weight_dtype", torch.bfloat16)
                    engine_options.setdefault("kv_cache_dtype", torch.bfloat16)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.tokenizer = tokenizer
        self.engine = Engine(self.model, EngineConfig(speculative=speculative, **engine_options), tokenizer)

    # ---- prompts ----------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, index: int = 0) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(
                    f"prompts[{index}]: a string prompt needs a tokenizer (no tokenizer.json in the "
                    "checkpoint); pass token ids instead"
                )
            return self.tokenizer.encode(text(prompt, f"prompts[{index}]"))
        # bytes iterate as ints: refuse them rather than read b"hi" as the token ids [104, 105];
        # the ids themselves are checked by the engine
        if not isinstance(prompt, (list, tuple)):
            raise RequestError(
                f"prompts[{index}]: expected a string or a list of token ids, got {type(prompt).__name__}"
            )
        return list(prompt)

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise RequestError(f"{what}: needs a tokenizer (no tokenizer.json in the checkpoint)")
        return self.tokenizer

    # ---- generation -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_update: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (batched continuously); outputs in prompt order.
        on_update(output) is called whenever one of these requests receives tokens (streaming).

        All or nothing at the door: every prompt is encoded and validated before any is queued (a
        RequestError names `prompts[i]`). If the loop is left early (an exception, Ctrl-C, a raising
        on_update), the call's unfinished requests are aborted and their cache blocks freed, so
        nothing of this call reaches a later one. A request that fails inside the engine fails
        alone; once the others finish, RequestFailed names the failed prompts (its `outputs` holds
        every output, the failed ones with finish_reason "error")."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError(f"params: {len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = [self.encode(p, i) for i, p in enumerate(prompts)]
        ids = self.engine.add_requests(encoded, plist)
        mine, done = set(ids), {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.request_id not in mine:
                        continue  # a request queued on the engine directly, not by this call
                    if on_update is not None:
                        on_update(out)
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)
        outputs = [done[i] for i in ids]
        failed = [i for i, out in enumerate(outputs) if out.finish_reason == "error"]
        if failed:
            raise RequestFailed(failed, outputs)
        return outputs

    def chat(
        self, messages: list[dict[str, str]], params: SamplingParams | None = None, on_update=None
    ) -> RequestOutput:
        """One assistant turn in the chat format of the released chat models (DESIGN §6)."""
        tok = self._require_tokenizer("chat")
        for i, m in enumerate(messages):
            text(m.get("content"), f"messages[{i}].content")
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([prompt], params, on_update)[0]

    def complete(self, prefix: str, suffix: str, params: SamplingParams | None = None) -> str:
        """Fill in the middle: PSM layout `<bos><｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>`;
        the model writes the middle and ends it with eos (DESIGN §6)."""
        from dsv3.data.fim import fim_prompt

        tok = self._require_tokenizer("complete")
        params = params or SamplingParams(temperature=0.0, max_tokens=64)
        out = self.generate([fim_prompt(tok, text(prefix, "prefix"), text(suffix, "suffix"))], params)[0]
        return out.text if out.text is not None else tok.decode(out.token_ids)

    @property
    def spec_stats(self):
        return self.engine.spec_stats
