"""The latent KV cache in BF16 under an FP32 model (`EngineConfig.kv_cache_dtype`, vLLM's
kv_cache_dtype): half the bytes per token, each cached value the FP32 one rounded once, the fast
path (the native one-row decoder, the native paged attention, the torch forms) equal to the model's
own forward over the same rounded cache, logits near the FP32 cache's; LLM picks it for a BF16
checkpoint, the command lines take --kv-cache-dtype, a bad value is a one-line error."""

import copy

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.config import ConfigError
from dsv3.infer import LLM, SamplingParams
from dsv3.infer.decode import kernels as cpu_kernels
from dsv3.infer.decode import step as decode
from dsv3.infer.engine import Engine, EngineConfig
from dsv3.serve.cli import build_parser, engine_options

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
BF16 = torch.bfloat16


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def _run(engine: Engine, prompts: list[list[int]]) -> dict:
    for p in prompts:
        engine.add_request(p, GREEDY)
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    return outs


def _max_logprob_gap(a: dict, b: dict) -> float:
    gap = 0.0
    for rid in a:
        for la, lb in zip(a[rid].logprobs, b[rid].logprobs):
            gap = max(gap, *(abs(la[t] - lb[t]) for t in la.keys() & lb.keys()))
    return gap


def test_bf16_cache_takes_half_the_bytes(tiny):
    model = _model(tiny)
    e32 = Engine(model, EngineConfig(cache_memory=2**20))
    e16 = Engine(model, EngineConfig(cache_memory=2**20, kv_cache_dtype=BF16))
    assert e32.cache.data.dtype == torch.float32 and e16.cache.data.dtype == BF16
    assert 2 * e16.bytes_per_token == e32.bytes_per_token == e32.formula_bytes_per_token()
    assert e16.formula_bytes_per_token() == e16.bytes_per_token
    assert e16.cache.num_blocks in (2 * e32.cache.num_blocks, 2 * e32.cache.num_blocks + 1)


def test_bf16_cache_rows_are_the_fp32_rows_rounded(tiny):
    """After the same prefill, the first layer's cache rows (computed before any attention read a
    rounded value) are exactly the FP32 engine's rows rounded to BF16."""
    model = _model(tiny)
    prompt = torch.randint(0, tiny.vocab_size, (11,)).tolist()
    rows = {}
    for dtype in (torch.float32, BF16):
        engine = Engine(model, EngineConfig(num_blocks=16, block_size=4, kv_cache_dtype=dtype))
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        seq = next(iter(engine.scheduler.live.values()))
        engine.step()  # the prefill
        table = torch.tensor(seq.block_table, dtype=torch.long)
        slots = (table[:, None] * 4 + torch.arange(4)).flatten()[: len(prompt)]
        rows[dtype] = engine.cache.data[0, slots].clone()
    assert rows[BF16].dtype == BF16
    assert torch.equal(rows[BF16], rows[torch.float32].to(BF16))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("geometry", ["tiny", "v3"])
def test_bf16_cache_fast_path_equals_the_model_path(tiny, native, geometry, monkeypatch):
    """A lone sequence (the native one-row decoder, or a pool slice on torch), then three prompts
    batched with chunked prefill (gathered keys: the native paged attention, or torch's): the same
    greedy tokens as the model's forward over the same BF16 cache, top-3 logprobs within 1e-4 (seen:
    2.4e-5 at most; the two paths round values that differ by float rounding, so a cached value can
    land one BF16 step apart), and within 5e-3 of the FP32 cache's but not equal to them (seen:
    4-6e-4: the cache did round)."""
    cfg = tiny
    if geometry == "v3":  # DeepSeek-V3's attention geometry on the tiny width
        cfg = tiny.replace(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64)
    if not native:
        monkeypatch.setattr(decode, "kernels", lambda native=True: cpu_kernels.Reference())
    model = _model(cfg)
    options = dict(num_blocks=64, block_size=4, max_num_batched_tokens=6, kv_cache_dtype=BF16)
    fast = Engine(model, EngineConfig(**options))
    ref = Engine(copy.deepcopy(model), EngineConfig(fast_decode=False, **options))
    fp32 = Engine(
        copy.deepcopy(model), EngineConfig(fast_decode=False, **{**options, "kv_cache_dtype": None})
    )
    assert fast.cache.data.dtype == ref.cache.data.dtype == BF16 and fp32.cache.data.dtype == torch.float32
    monkeypatch.setattr(fast, "_merged_forward", lambda *args: None)  # steps as the reference runs them
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 13, 3)]
    for batch in (prompts[:1], prompts):
        got, want, wide = _run(fast, batch), _run(ref, batch), _run(fp32, batch)
        for rid in want:
            assert got[rid].token_ids == want[rid].token_ids
        assert _max_logprob_gap(got, want) <= 1e-4
        assert 1e-5 < _max_logprob_gap(want, wide) <= 5e-3
    rows = fast.runner.fast._rows
    if native and cpu_kernels.kernels().name == "native":
        assert rows is not None and rows[0] is not None  # the lone sequence ran on the one-row decoder


def test_llm_picks_a_bf16_cache_for_a_bf16_checkpoint(tmp_path, tiny):
    torch.manual_seed(0)
    save_pretrained(Transformer(tiny), tmp_path / "bf16", dtype=BF16)
    save_pretrained(Transformer(tiny), tmp_path / "fp32")
    assert LLM(tmp_path / "bf16", verify=False).engine.cache.data.dtype == BF16
    explicit = LLM(tmp_path / "bf16", verify=False, kv_cache_dtype=torch.float32)  # an explicit choice wins
    assert explicit.engine.cache.data.dtype == torch.float32
    assert LLM(tmp_path / "fp32", verify=False).engine.cache.data.dtype == torch.float32


def test_command_line_and_bad_values():
    parser = build_parser()
    args = parser.parse_args(["ckpt", "--kv-cache-dtype", "bf16"])
    assert engine_options(args)["kv_cache_dtype"] == BF16
    assert "kv_cache_dtype" not in engine_options(parser.parse_args(["ckpt"]))  # auto: LLM decides
    with pytest.raises(SystemExit):
        parser.parse_args(["ckpt", "--kv-cache-dtype", "fp8"])
    with pytest.raises(ConfigError, match="kv_cache_dtype: expected None, torch.float32 or torch.bfloat16"):
        EngineConfig(kv_cache_dtype=torch.float16)
