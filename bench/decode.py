"""Decode throughput of the dsv3 engine against transformers' `generate()`, MTP speculative decoding,
and KV-cache bytes per token (DESIGN §3.2, §3.6, §8).

Both sides hold identical weights (dsv3 saves the checkpoint, transformers loads it) and decode the
same random prompts greedily for the same number of new tokens (eos ignored); time covers prefill
and decode, as a user of either would see it. transformers runs its fastest implementation (SDPA
attention, grouped_mm experts) with its default dynamic KV cache. dsv3 runs three ways: the default
engine (plain decoding on the eager fast path, dsv3.infer.decode), `reference` (fast_decode=False:
the model's own forward, as before the fast path) and `compiled` (compile=True, fast_decode=False:
the model's forward under torch.compile). Measurements interleave the sides within each repeat and
report medians (best in brackets) and the load average, because the machine is shared; FP32
throughout (this CPU has no BF16 units, a BF16 matmul is ~100x slower).

    python bench/decode.py                          # random `small` model saved to a temp dir
    python bench/decode.py --ckpt DIR               # e.g. the model `make demo` trains
    python bench/decode.py --batches 1 --repeats 5 --threads 2
    python bench/decode.py --thread-scaling                   # small and v3-mini, 1 vs 2 threads

`--thread-scaling` measures only dsv3's decode rate (random models of the given presets, no
transformers): output tokens/s of the decode steps (the time spent in the runner's decode forward
and head, so prefill, scheduling and sampling are excluded) at each thread count of
`--scaling-threads`, the speed-up over the first, and whether the greedy tokens are the same at
every thread count; the table header
names the CPU and its flags (AVX2 / AVX-512 / AVX512_BF16 / AMX) and whether the native kernels
run. `671b-layer` is one layer of DeepSeek-V3 671B (its attention, 8 of 16 routed experts of its
size and the shared one: a token's per-layer cost; ~8 GB in FP32) with an 8192-token vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import load_pretrained, save_pretrained
from dsv3.infer.llm import LLM
from dsv3.infer.paged_cache import cache_bytes_per_token
from dsv3.infer.sampling import SamplingParams


def time_dsv3(llm: LLM, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t, [o.token_ids for o in outs]


def preset_config(name: str) -> ModelConfig:
    """A preset by name, or `671b-layer`: one MoE layer of the 671B geometry (see the docstring)."""
    if name == "671b-layer":
        return ModelConfig.from_preset("671b").replace(
            n_layers=1, n_dense_layers=0, n_routed_experts=16, vocab_size=8192, n_mtp_layers=0
        )
    return ModelConfig.from_preset(name)


def decode_rate(
    llm: LLM, spent: list[float], prompts: list[list[int]], new: int
) -> tuple[float, list[list[int]]]:
    """Output tokens/s of the decode steps alone (time in the runner's `decode_logits`, accumulated
    in `spent` = [seconds, calls] by `time_calls`: no prefill, scheduling or sampling), and the tokens."""
    spent[:] = [0.0, 0]
    _, tokens = time_dsv3(llm, prompts, new)
    return len(prompts) * spent[1] / max(spent[0], 1e-9), tokens


def thread_scaling(args) -> None:
    """dsv3's decode tok/s per preset, batch and thread count, interleaved; speed-up over the first count."""
    from dsv3.infer.decode import kernels as cpu_kernels

    counts = [int(n) for n in args.scaling_threads.split(",")]
    native = cpu_kernels.kernels().name == "native"
    print(f"CPU: {cpu_kernels.describe_cpu()}")
    print(
        f"native kernels: {'yes' if native else 'no (' + str(cpu_kernels.why_not_native) + ')'}; "
        f"torch {torch.__version__}; prompts {args.prompt_len} tokens, {args.new} new tokens each, "
        f"greedy; decode steps only; medians of {args.repeats} (best)"
    )
    cells = " | ".join(f"{n} thr tok/s" for n in counts)
    ratios = " | ".join(f"{n} / {counts[0]}" for n in counts[1:])
    print(f"\n| model | weights | batch | {cells} | {ratios} | same tokens | load |")
    print("|---|---|---:|" + "---:|" * (2 * len(counts) - 1) + "---|---|")
    threads = torch.get_num_threads()
    try:
        for preset in args.presets.split(","):
            torch.manual_seed(0)
            model = Transformer(preset_config(preset)).eval()
            vocab = model.config.vocab_size
            for wd in args.scaling_weights.split(","):
                dtype = {"fp32": None, "bf16": torch.bfloat16}[wd]
                llm = LLM(model, weight_dtype=dtype, max_num_seqs=64, max_num_batched_tokens=8192)
                spent = time_calls(llm.engine.runner, ["decode_logits"])["decode_logits"]
                for B in map(int, args.batches.split(",")):
                    prompts = torch.randint(0, vocab, (B, args.prompt_len)).tolist()
                    load = os.getloadavg()[0]
                    rates: dict[int, list[float]] = {n: [] for n in counts}
                    outs: dict[int, list[list[int]]] = {}
                    time_dsv3(llm, prompts, 2)  # warm-up
                    for _ in range(args.repeats):  # interleaved: each count sees the same load
                        for n in counts:
                            torch.set_num_threads(n)
                            rate, outs[n] = decode_rate(llm, spent, prompts, args.new)
                            rates[n].append(rate)
                    med = {n: statistics.median(r) for n, r in rates.items()}
                    row = " | ".join(f"{med[n]:.1f} ({max(rates[n]):.1f})" for n in counts)
                    up = " | ".join(f"{med[n] / med[counts[0]]:.2f}x" for n in counts[1:])
                    same = "yes" if all(outs[n] == outs[counts[0]] for n in counts) else "NO"
                    load = f"{load:.1f}-{os.getloadavg()[0]:.1f}"
                    print(f"| {preset} | {wd} | {B} | {row} | {up} | {same} | {load} |", flush=True)
            del model, llm
    finally:
        torch.set_num_threads(threads)


def time_hf(hf, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - t, out[:, ids.shape[1] :].tolist()


def load_hf(path):
    import transformers

    return transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", experts_implementation="grouped_mm"
    ).eval()


def throughput(sides: dict, hf, batches: list[int], vocab: int, args) -> None:
    """tok/s of each dsv3 side and of transformers (tf) on the same random prompts, interleaved."""
    names = list(sides) + ["tf"]
    head = " | ".join(f"{n} tok/s" for n in names)
    print(f"\ntok/s: median of {args.repeats} (best); ratios of medians against transformers (tf)")
    print(
        f"| batch | {head} | "
        + " | ".join(f"{n} / tf" for n in names[:-1])
        + " | same greedy tokens | load |"
    )
    print("|---:|" + "---:|" * (2 * len(names) - 1) + "---|---|")
    for B in batches:
        prompts = torch.randint(0, vocab, (B, args.prompt_len)).tolist()
        load = os.getloadavg()[0]
        t = time.perf_counter()
        for side in sides.values():  # warm-up (compiles the decode graph for this batch shape)
            time_dsv3(side, prompts, 4)
        time_hf(hf, prompts, 4)
        warm = time.perf_counter() - t
        rates: dict[str, list[float]] = {n: [] for n in names}
        outs: dict[str, list[list[int]]] = {}
        for _ in range(args.repeats):  # interleaved: every side sees the same machine load
            for name, side in sides.items():
                dt, outs[name] = time_dsv3(side, prompts, args.new)
                rates[name].append(B * args.new / dt)
            dt, outs["tf"] = time_hf(hf, prompts, args.new)
            rates["tf"].append(B * args.new / dt)
        med = {k: statistics.median(v) for k, v in rates.items()}
        cells = " | ".join(f"{med[n]:.0f} ({max(rates[n]):.0f})" for n in names)
        ratios = " | ".join(f"{med[n] / med['tf']:.2f}x" for n in names[:-1])
        same = ", ".join(f"{n} {sum(a == b for a, b in zip(outs[n], outs['tf']))}/{B}" for n in sides)
        load = f"{load:.1f}-{os.getloadavg()[0]:.1f}"
        print(f"| {B} | {cells} | {ratios} | {same} | {load} |  warm-up {warm:.0f}s")


def time_calls(obj, names: list[str]) -> dict[str, list[float]]:
    """Wrap methods of `obj` (an instance) to accumulate [seconds, calls] per name, in place."""
    spent = {n: [0.0, 0] for n in names}
    for name in names:
        method = getattr(obj, name)

        def timed(*args, _method=method, _acc=spent[name], **kwargs):
            t = time.perf_counter()
            out = _method(*args, **kwargs)
            _acc[0] += time.perf_counter() - t
            _acc[1] += 1
            return out

        setattr(obj, name, timed)
    return spent


def hf_cache_bytes_per_token(hf, vocab: int, n: int = 32) -> int:
    """Bytes of transformers' KV cache after a forward over n tokens, divided by n."""
    with torch.no_grad():
        cache = hf(torch.randint(0, vocab, (1, n)), use_cache=True).past_key_values
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total // n


def held_out_prompts(ckpt: str, batch: int, length: int, seed: int = 0) -> list[list[int]] | None:
    """Windows of the validation split of the run that wrote a training checkpoint (None when `ckpt`
    is not one): speculative acceptance on real text rather than on random token ids."""
    meta = Path(ckpt) / "trainer.json"
    if not meta.exists():
        return None
    from dsv3.data.dataset import DataConfig, prepare_data

    saved = json.loads(meta.read_text())["config"]
    data = prepare_data(DataConfig(data=saved["data"], tokenizer=str(ckpt), seed=saved["seed"],
                                   val_fraction=saved["val_fraction"], fim_rate=saved["fim_rate"]))  # fmt: skip
    tokens = torch.from_numpy(np.array(data.val.tokens))  # a writable copy of the memory map
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length, (batch,), generator=gen)
    return [tokens[s : s + length].tolist() for s in starts]


@torch.no_grad()
def make_synthetic_drafter(model: Transformer, scale: float = 0.03, head_gain: float = 30.0) -> None:
    """NOT a trained model: shrink every block's output so the residual stream is dominated by the
    current token's embedding, and make MTP's eh_proj pass the embedding through. Then the MTP module
    at i (reading t_{i+1}) mostly predicts what the main model predicts at i+1: high acceptance, to
    show what speculative decoding buys at a given acceptance rate."""
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
            p.mul_(scale)
    model.lm_head.weight.mul_(head_gain)  # peaked distributions, as a trained model has
    dim = model.config.dim
    for mtp in model.mtp:
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :dim] = torch.eye(dim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint directory; default: a random `small` model in a temp dir")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--spec-k", default="1,2", help="speculative tokens to try (MTP drafts per step)")
    ap.add_argument("--spec-batches", default="1,16")
    ap.add_argument(
        "--spec-prompts",
        type=int,
        default=1,
        help="batch 1: this many different prompts, decoded one after another (their total rate)",
    )
    ap.add_argument(
        "--prompts-from",
        help="training checkpoint whose held-out documents give the prompts (default: --ckpt)",
    )
    ap.add_argument("--draft-vocabs", default="all,2048",
                    help="draft vocabularies to try (EngineConfig.draft_vocab; 'all' = the full vocabulary)")  # fmt: skip
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled reference decode")
    ap.add_argument("--checkpoint-dtypes", default="fp32,bf16",
                    help="throughput on the checkpoint as given (fp32) and saved as BF16 (bf16)")  # fmt: skip
    ap.add_argument("--skip-throughput", action="store_true", help="only the speculative and cache tables")
    ap.add_argument("--synthetic-draft", action="store_true",
                    help="speculative table on a synthetic model whose MTP agrees (not trained)")  # fmt: skip
    ap.add_argument("--thread-scaling", action="store_true",
                    help="only dsv3's decode tok/s at each of --scaling-threads on random --presets models")  # fmt: skip
    ap.add_argument("--presets", default="small,v3-mini", help="--thread-scaling: presets (or 671b-layer)")
    ap.add_argument("--scaling-threads", default="1,2", help="--thread-scaling: thread counts")
    ap.add_argument("--scaling-weights", default="fp32",
                    help="--thread-scaling: fast-path weight storage, fp32 and/or bf16")  # fmt: skip
    args = ap.parse_args()
    if args.thread_scaling:
        torch.manual_seed(0)
        return thread_scaling(args)
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.ckpt
        if path is None:
            save_pretrained(Transformer(ModelConfig.from_preset("small")), tmp)
            path = tmp
        cfg = ModelConfig.from_hf(path)
        what = args.ckpt or "a RANDOMLY INITIALISED `small` model (pass --ckpt for a trained one)"
        print(f"model: {what}; fp32, {args.threads} thread(s), torch {torch.__version__}, "
              f"transformers {transformers.__version__}")  # fmt: skip
        print(
            f"prompts {args.prompt_len} tokens, {args.new} new tokens each, greedy; medians of {args.repeats}"
        )
        seats = dict(max_num_seqs=max(64, *map(int, args.batches.split(","))), max_num_batched_tokens=8192)
        llm = LLM(path, **seats)  # the default engine: plain decoding on the eager fast path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = load_hf(path)
        sides = {"dsv3": llm}
        if not args.skip_throughput:  # each its own copy of the weights: `compile` swaps the MoE in place
            sides["reference"] = LLM(path, fast_decode=False, **seats)  # the model's forward, eager
            if not args.no_compile:
                sides["compiled"] = LLM(path, compile=True, fast_decode=False, **seats)
        if not args.skip_throughput:
            batches = list(map(int, args.batches.split(",")))
            if "fp32" in args.checkpoint_dtypes.split(","):
                throughput(sides, hf, batches, cfg.vocab_size, args)
            if "bf16" in args.checkpoint_dtypes.split(","):
                bf16_path = Path(tmp) / "bf16"  # the same model saved as a BF16 checkpoint
                save_pretrained(load_pretrained(path), bf16_path, dtype=torch.bfloat16)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hf16 = load_hf(bf16_path)  # FP32 compute on the BF16 values: its faster choice here
                print(
                    "\nthe same model as a BF16 checkpoint: dsv3 keeps the fast path's feed-forward "
                    "matrices and head in BF16 (FP32 arithmetic),\ntransformers loads it in FP32 "
                    "(its faster choice on this CPU); identical weight values on both sides"
                )
                throughput({"dsv3": LLM(bf16_path, **seats)}, hf16, batches, cfg.vocab_size, args)

        if cfg.n_mtp_layers:
            if args.synthetic_draft:
                make_synthetic_drafter(llm.model)
                print(
                    "\nspeculative decoding on a SYNTHETIC drafter (see make_synthetic_drafter), not trained"
                )
            head = "| batch | drafts k | draft vocab | plain tok/s | speculative tok/s | speed-up |"
            costs = "decode step ms | verify ms | draft ms | break-even accept length"
            print(f"\n{head} acceptance per position | accept length | {costs} |")
            print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
            vocabs = [None if v == "all" else int(v) for v in args.draft_vocabs.split(",")]
            plain_calls = time_calls(llm.engine.runner, ["decode_logits"])
            source = args.prompts_from or args.ckpt
            for B in [int(b) for b in args.spec_batches.split(",") if b]:
                n = args.spec_prompts if B == 1 else B  # batch 1: several prompts, one at a time
                prompts = held_out_prompts(source, n, args.prompt_len) if source else None
                if prompts is None:
                    prompts = torch.randint(0, cfg.vocab_size, (n, args.prompt_len)).tolist()
                else:
                    print(f"batch {B}: {n} prompts, windows of the held-out documents of {source}")
                groups = [[q] for q in prompts] if B == 1 else [prompts]
                for k, vocab in [(k, v) for k in map(int, args.spec_k.split(",")) for v in vocabs]:
                    spec = LLM(  # the plain side's weight storage: a BF16 checkpoint's BF16 matrices
                        llm.model,
                        speculative=True,
                        num_speculative_tokens=k,
                        draft_vocab=vocab,
                        max_num_batched_tokens=8192,
                        weight_dtype=llm.engine.config.weight_dtype,
                    )
                    # with BF16 arithmetic, [B, k + 1] verification rounds differently from [B, 1]
                    # steps, so near-tied greedy picks may differ: counted, not asserted
                    exact = spec.engine.runner.fast is None or not spec.engine.runner.fast.bf16_gemm
                    time_dsv3(spec, prompts[:1], 4)
                    spec.engine.spec_stats.__init__(k)  # count the measured runs only
                    # per forward: plain decode step, verification ([B, k + 1]) and drafting (MTP
                    # module and its head, including the MTP pass over the prompt at prefill)
                    spec_calls = time_calls(spec.engine.runner, ["verify", "mtp_hidden", "mtp_logits"])
                    for acc in plain_calls.values():
                        acc[:] = [0.0, 0]
                    plain, fast, same = [], [], 0
                    for _ in range(args.repeats):
                        for group in groups:  # the sides in turn, per group of prompts
                            dt, ref = time_dsv3(llm, group, args.new)
                            plain.append((len(group) * args.new, dt))
                            dt, got = time_dsv3(spec, group, args.new)
                            fast.append((len(group) * args.new, dt))
                            assert got == ref or not exact, (
                                "speculative greedy output differs from plain greedy"
                            )
                            same += sum(a == b for a, b in zip(got, ref))
                    # per repeat: all groups' tokens over their time; the median of the repeats
                    per = len(groups)
                    plain = [sum(t for t, _ in plain[i : i + per]) / sum(d for _, d in plain[i : i + per])
                             for i in range(0, len(plain), per)]  # fmt: skip
                    fast = [sum(t for t, _ in fast[i : i + per]) / sum(d for _, d in fast[i : i + per])
                            for i in range(0, len(fast), per)]  # fmt: skip
                    p, f = statistics.median(plain), statistics.median(fast)
                    st = spec.spec_stats
                    rates = ", ".join(f"{r:.0%}" for r in st.acceptance_rates)
                    row = f"| {B} | {k} | {vocab or 'all'} | {p:.0f} | {f:.0f} | {f / p:.2f}x | {rates} |"
                    step = plain_calls["decode_logits"][0] / max(plain_calls["decode_logits"][1], 1)
                    n_ver = max(spec_calls["verify"][1], 1)
                    ver = spec_calls["verify"][0] / n_ver
                    draft = (spec_calls["mtp_hidden"][0] + spec_calls["mtp_logits"][0]) / n_ver
                    cost = (
                        f"{step * 1e3:.1f} | {ver * 1e3:.1f} | {draft * 1e3:.1f} | {(ver + draft) / step:.2f}"
                    )
                    agree = (
                        "" if exact else f" (BF16 GEMMs: {same}/{n * args.repeats} sequences as plain greedy)"
                    )
                    print(f"{row} {st.mean_accept_length:.2f} | {cost} |{agree}")

        ours_b = llm.engine.bytes_per_token
        hf_b = hf_cache_bytes_per_token(hf, cfg.vocab_size)
        v3 = ModelConfig.from_preset("671b")
        mla = cache_bytes_per_token(v3, torch.bfloat16, with_mtp=False)
        mha = v3.n_layers * v3.n_heads * (v3.qk_head_dim + v3.v_head_dim) * 2
        print("\n| KV cache bytes per token | dsv3 (latent) | transformers | ratio |")
        print("|---|---:|---:|---:|")
        print(f"| this model, fp32, measured | {ours_b:,} | {hf_b:,} | {hf_b / ours_b:.1f}x |")
        label = "671b, bf16, formula (61 x 576 vs 61 x 128 x (192 + 128))"
        print(f"| {label} | {mla:,} | {mha:,} | {mha / mla:.1f}x |")


if __name__ == "__main__":
    main()
