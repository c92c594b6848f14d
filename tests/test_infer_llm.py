"""The offline API and the command lines on real checkpoint directories: string and token-id prompts,
the FIM and chat layouts (DESIGN §6), FP8 checkpoints, `dsv3 generate | chat | complete`."""

import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3 import Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.data.tokenizer import Tokenizer
from dsv3.fp8.quant import dequantize_blocks, quantize_blocks
from dsv3.infer import LLM, SamplingParams
from dsv3.infer.cli import chat_main, complete_main, generate_main
from dsv3.infer.reference import greedy_generate

TEXTS = ["def add(a, b):\n    return a + b\n", "To be, or not to be: that is the question.\n"] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model saved in the official layout with a trained 300-entry tokenizer beside it."""
    from dsv3 import ModelConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), path)
    Tokenizer.train(TEXTS, 300, show_progress=False).save(path)
    return path


def test_string_and_token_prompts_agree_with_the_reference(ckpt):
    llm = LLM(ckpt, max_num_batched_tokens=8)
    tok = llm.tokenizer
    text = "def add(a, b):"
    ids = [tok.bos_id, *tok.encode(text)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    by_ids, by_text = llm.generate([ids, tok.decode(ids)], params)
    ref = greedy_generate(llm.model, torch.tensor([ids]), 8)[0].tolist()
    assert by_ids.token_ids == by_text.token_ids == ref
    assert by_ids.text == tok.decode(ref)


def test_fim_layout_and_complete(ckpt, monkeypatch):
    llm = LLM(ckpt)
    tok = llm.tokenizer
    seen = []
    add = llm.engine.add_requests
    monkeypatch.setattr(llm.engine, "add_requests", lambda p, params: seen.extend(p) or add(p, params))
    prefix, suffix = "def add(a, b):\n    return ", "\n"
    middle = llm.complete(prefix, suffix, SamplingParams(temperature=0.0, max_tokens=6))
    # PSM: <bos> <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜>, the model writes the middle
    expected = [
        tok.bos_id,
        tok.fim_begin_id,
        *tok.encode(prefix),
        tok.fim_hole_id,
        *tok.encode(suffix),
        tok.fim_end_id,
    ]
    assert seen == [expected]
    ref = greedy_generate(llm.model, torch.tensor([expected]), 6)[0].tolist()
    if tok.eos_id in ref:
        ref = ref[: ref.index(tok.eos_id)]
    assert middle == tok.decode(ref)


def test_chat_uses_the_chat_format(ckpt, monkeypatch):
    llm = LLM(ckpt)
    seen = []
    add = llm.engine.add_requests
    monkeypatch.setattr(llm.engine, "add_requests", lambda p, params: seen.extend(p) or add(p, params))
    messages = [{"role": "user", "content": "hi"}]
    llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=3))
    assert seen == [llm.tokenizer.apply_chat_template(messages)]


def test_token_prompts_without_tokenizer_and_clear_error_for_strings(tmp_path, tiny):
    save_pretrained(Transformer(tiny), tmp_path)
    llm = LLM(tmp_path)
    assert llm.tokenizer is None
    out = llm.generate([[0, 5, 9]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == greedy_generate(llm.model, torch.tensor([[0, 5, 9]]), 4)[0].tolist()
    with pytest.raises(ValueError, match=r"prompts\[0\].*tokenizer"):
        llm.generate(["hello"])


def test_fp8_checkpoint_generates_like_its_dequantised_weights(tmp_path, tiny):
    """Official FP8 layout: e4m3 weights + weight_scale_inv per 128x128 block, dequantised on load."""
    save_pretrained(Transformer(tiny), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for k in list(tensors):
        if k.endswith(("proj.weight", "proj_with_mqa.weight")):
            w, scale = quantize_blocks(tensors[k])
            tensors[k], tensors[k + "_scale_inv"] = w.contiguous(), scale.contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    llm = LLM(tmp_path, speculative=True)
    key = "model.layers.0.self_attn.q_b_proj.weight"
    dequant = dequantize_blocks(tensors[key], tensors[key + "_scale_inv"])
    assert torch.equal(llm.model.layers[0].self_attn.q_b_proj.weight, dequant)  # dequantised on load
    prompt = [0, 7, 3, 11]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == greedy_generate(llm.model, torch.tensor([prompt]), 6)[0].tolist()


def test_bf16_checkpoint_decodes_on_bf16_weights_exactly(tmp_path, tiny):
    """A BF16 checkpoint computed in FP32: the fast path keeps its feed-forward matrices and head in
    BF16 (half the bytes per token), and greedy output equals the FP32 reference on the same values
    (with an FP32 cache: the BF16 one LLM picks too rounds the cached values, test_kv_cache_dtype)."""
    torch.manual_seed(0)
    save_pretrained(Transformer(tiny), tmp_path, dtype=torch.bfloat16)
    llm = LLM(tmp_path, kv_cache_dtype=torch.float32)
    assert llm.engine.config.weight_dtype == torch.bfloat16
    assert llm.engine.runner.fast.weights.head.dtype == torch.bfloat16
    assert LLM(tmp_path, weight_dtype=None).engine.config.weight_dtype is None  # an explicit choice wins
    prompts = [[0, 7, 3, 11], [0, 5]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.token_ids == greedy_generate(llm.model, torch.tensor([p]), 8)[0].tolist()


def test_cli_generate_chat_complete(ckpt, tmp_path):
    out = io.StringIO()
    assert (
        generate_main(["--ckpt", str(ckpt), "--ids", "0,5,9", "--max-tokens", "3", "--stats"], out=out) == 0
    )
    assert "0 5 9 ->" in out.getvalue() and "tokens/s" in out.getvalue()
    out = io.StringIO()
    argv = ["--ckpt", str(ckpt), "--ids", "0,5,9", "--max-tokens", "3", "--weight-dtype", "bf16"]
    assert generate_main(argv, out=out) == 0 and "0 5 9 ->" in out.getvalue()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\nTo be\n")
    out = io.StringIO()
    assert (
        generate_main(
            ["--ckpt", str(ckpt), "--input-file", str(prompts), "--max-tokens", "3", "--speculative"], out=out
        )
        == 0
    )
    assert out.getvalue().count("-" * 40) == 2
    out = io.StringIO()
    stdin = io.StringIO("hello\n/clear\nhi again\n/exit\n")
    assert chat_main(["--ckpt", str(ckpt), "--max-tokens", "4", "--seed", "1"], stdin=stdin, out=out) == 0
    assert out.getvalue().count(">>> ") == 4 and "(conversation cleared)" in out.getvalue()
    out = io.StringIO()
    assert (
        complete_main(
            ["--ckpt", str(ckpt), "--prefix", "def f(", "--suffix", ")\n", "--max-tokens", "3"], out=out
        )
        == 0
    )


def test_fp8_weights_stay_fp8_and_run_the_block_scaled_gemm(tmp_path, tiny):
    from dsv3.fp8.quant import dequantize_tiles, quantize_tiles
    from dsv3.infer.fp8_weights import Fp8WeightLinear

    cfg = tiny.replace(dim=160, inter_dim=200)  # partial 128-blocks in both dimensions
    save_pretrained(Transformer(cfg), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for k in list(tensors):
        if k.endswith(("proj.weight", "proj_with_mqa.weight")):
            w, scale = quantize_blocks(tensors[k])
            tensors[k], tensors[k + "_scale_inv"] = w.contiguous(), scale.contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    dequantised = LLM(tmp_path).model
    llm = LLM(tmp_path, fp8_weights=True, speculative=True)
    fp8 = [m for m in llm.model.modules() if isinstance(m, Fp8WeightLinear)]
    # every FP8 projection except kv_b_proj (read as a matrix by the absorbed path), MTP included
    per_layer = 4 + 3  # q_a, q_b, kv_a, o_proj + the dense MLP or shared expert
    assert len(fp8) == (cfg.n_layers + cfg.n_mtp_layers) * per_layer + cfg.n_mtp_layers  # + eh_proj
    assert all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in fp8)
    lin = llm.model.layers[0].self_attn.q_a_proj
    x = torch.randn(5, cfg.dim)
    xq = dequantize_tiles(*quantize_tiles(x))  # the activation as the GEMM sees it
    assert torch.allclose(lin(x), xq @ lin.weight.T, atol=1e-5)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        a, b = llm.model(ids), dequantised(ids)
    assert (a - b).norm() / b.norm() < 0.1  # activation quantisation error only
    out = llm.generate([ids[0].tolist()], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == greedy_generate(llm.model, ids, 4)[0].tolist()


# ---- failures: nothing of one call reaches the next ----------------------------------------------
GREEDY8 = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _clean(llm) -> bool:
    alloc = llm.engine.cache.allocator
    return not llm.engine.has_unfinished() and alloc.num_free == alloc.num_blocks


def test_a_rejected_batch_leaves_nothing_for_the_next_call(ckpt):
    llm, fresh = LLM(ckpt, num_blocks=64), LLM(ckpt, num_blocks=64)
    with pytest.raises(ValueError, match=r"prompts\[2\]"):
        llm.generate([[1, 2, 3], [4, 5], [10**6]], GREEDY8)
    assert _clean(llm)
    outs = llm.generate([[7, 8, 9]], GREEDY8)
    assert [o.token_ids for o in outs] == [o.token_ids for o in fresh.generate([[7, 8, 9]], GREEDY8)]
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate([[1, 2]], SamplingParams(logprobs=10**6))
    assert _clean(llm)


def test_an_interrupted_generate_aborts_its_requests(ckpt):
    """Ctrl-C (or a raising on_update) in the middle of a call: its requests must not keep their
    blocks nor finish into the next call."""
    llm = LLM(ckpt, num_blocks=64)

    def interrupt(out):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5, 6]], GREEDY8, on_update=interrupt)
    assert _clean(llm)
    assert [o.request_id for o in llm.generate([[7, 8]], GREEDY8)] == ["2"]


def test_a_request_failing_in_the_engine_raises_after_the_others_finish(ckpt, monkeypatch):
    import dsv3.infer.engine as engine_module
    from dsv3.infer.outputs import RequestFailed

    real = engine_module.logprob_entries

    def entries(logits, tokens, top_n):
        if 3 in top_n:
            raise RuntimeError("injected")
        return real(logits, tokens, top_n)

    monkeypatch.setattr(engine_module, "logprob_entries", entries)
    llm = LLM(ckpt, num_blocks=64)
    bad = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)
    with pytest.warns(UserWarning, match="failed"), pytest.raises(RequestFailed, match=r"prompts\[1\]") as e:
        llm.generate([[1, 2, 3], [4, 5], [6]], [GREEDY8, bad, GREEDY8])
    assert [o.finish_reason for o in e.value.outputs] == ["length", "error", "length"]
    assert isinstance(e.value.__cause__, RuntimeError) and _clean(llm)


def test_bad_prompts_are_one_line_request_errors(ckpt):
    """User errors in a request are Dsv3Errors (one line at the command line), not tracebacks:
    bytes would otherwise be read as token ids, a lone surrogate failed inside the tokenizer."""
    from dsv3.config import ConfigError
    from dsv3.errors import Dsv3Error
    from dsv3.infer.engine import EngineConfig, RequestError

    llm = LLM(ckpt, num_blocks=64)
    cases = [
        (b"hi", r"prompts\[0\]: expected a string or a list of token ids, got bytes"),
        ("a\udcff b", r"prompts\[0\]: not valid text \(surrogates not allowed '\\udcff' at position 1\)"),
        ([1.5], r"prompts\[0\]: prompt: token ids \[1.5\] are not integers"),
        ([10**6], r"prompts\[0\]: prompt: .* vocabulary"),
    ]
    for prompt, match in cases:
        with pytest.raises(RequestError, match=match) as e:
            llm.generate([prompt], GREEDY8)
        assert isinstance(e.value, Dsv3Error) and isinstance(e.value, ValueError)
        assert _clean(llm)
    with pytest.raises(RequestError, match=r"messages\[1\]\.content"):
        llm.chat([{"role": "user", "content": "hi"}, {"role": "user", "content": "\ud800"}])
    with pytest.raises(RequestError, match="suffix"):
        llm.complete("def f():", "\udc80")
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
