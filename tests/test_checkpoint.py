"""Checkpoints in the official layout: round trips, shards, FP8 blocks, conversion, clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import (
    CheckpointError,
    convert_fp8_to_bf16,
    hf_state_dict,
    load_pretrained,
    save_pretrained,
)


def _same_weights(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_key_layout(tiny):
    keys = dict(hf_state_dict(Transformer(tiny)))
    L = tiny.n_layers
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert keys["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (tiny.dim, tiny.moe_inter_dim)
    assert keys["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # the dense layer
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.{L}.{name}.weight" in keys  # MTP module 1 at layer n_layers
    assert f"model.layers.{L}.self_attn.kv_b_proj.weight" in keys
    assert "lm_head.weight" in keys and "model.norm.weight" in keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(tmp_path, tiny, dtype):
    model = Transformer(tiny).to(dtype)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=dtype)
    assert _same_weights(model, loaded)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["torch_dtype"] == str(dtype)[6:]


def test_sharded_checkpoint_with_index(tmp_path, tiny):
    model = Transformer(tiny)
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).exists() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    assert _same_weights(model, load_pretrained(tmp_path))


def _rewrite(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path, tiny):
    save_pretrained(Transformer(tiny), tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layers.2.mlp.experts.w3\[expert 3\]"):
        load_pretrained(tmp_path)
    save_pretrained(Transformer(tiny), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \(1\): model.layers.0.self_attn.extra.weight"
    ):
        load_pretrained(tmp_path)
    save_pretrained(Transformer(tiny), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: checkpoint \(3,\) vs model \(64,\)"):
        load_pretrained(tmp_path)


def test_missing_shard_and_no_weights(tmp_path, tiny):
    with pytest.raises(Exception, match="config.json"):
        load_pretrained(tmp_path)
    save_pretrained(Transformer(tiny), tmp_path, max_shard_bytes=200_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="listed in model.safetensors.index.json but missing"):
        load_pretrained(tmp_path)


def test_checkpoint_without_mtp_weights_drops_mtp(tmp_path, tiny):
    save_pretrained(Transformer(tiny), tmp_path)
    _rewrite(
        tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith(f"model.layers.{tiny.n_layers}.")]
    )
    with pytest.warns(UserWarning, match="no MTP weights"):
        model = load_pretrained(tmp_path)
    assert model.config.n_mtp_layers == 0 and len(model.mtp) == 0


# ---- FP8 checkpoints ----------------------------------------------------------------------------
def _quantize_128(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The test's own 128x128 block quantiser: scale_inv = amax / 448 per (partial) block."""
    N, K = w.shape
    rows, cols = -(-N // 128), -(-K // 128)
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (blk / s[i, j]).clamp(-448, 448).to(q.dtype)
    return q, s


def _to_fp8_checkpoint(path) -> dict[str, torch.Tensor]:
    """Quantise every 2-D projection weight like the official release; returns the reference dequant."""
    tensors = load_file(path / "model.safetensors")
    reference = {}
    for k in list(tensors):
        if k.endswith("proj.weight") or k.endswith("proj_with_mqa.weight"):
            q, s = _quantize_128(tensors[k])
            tensors[k], tensors[k + "_scale_inv"] = q, s
            # dequantise element by element from the scale of the element's block
            rows = torch.arange(q.shape[0]) // 128
            cols = torch.arange(q.shape[1]) // 128
            reference[k] = q.float() * s[rows][:, cols]
    save_file(tensors, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    return reference


@pytest.fixture
def fp8_cfg(tiny) -> ModelConfig:
    # kv_a_proj_with_mqa is [576, 64]: 576 rows -> 5 scale rows, the last block partial (DESIGN §3.7)
    return tiny.replace(kv_lora_rank=512, qk_rope_head_dim=64, dim=160, inter_dim=200)


def test_fp8_checkpoint_dequantises_edge_blocks(tmp_path, fp8_cfg):
    save_pretrained(Transformer(fp8_cfg), tmp_path)
    reference = _to_fp8_checkpoint(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv").shape == (5, 2)
    model = load_pretrained(tmp_path)
    got = dict(hf_state_dict(model))
    for k, want in reference.items():
        assert torch.equal(got[k].float(), want), k
    assert model.config.extra["quantization_config"]["fmt"] == "e4m3"


def test_convert_fp8_to_bf16(tmp_path, fp8_cfg):
    src, dst = tmp_path / "fp8", tmp_path / "bf16"
    save_pretrained(Transformer(fp8_cfg), src)
    reference = _to_fp8_checkpoint(src)
    (src / "tokenizer.json").write_text("{}")
    convert_fp8_to_bf16(src, dst)
    out = load_file(dst / "model.safetensors")
    assert not any(k.endswith("_scale_inv") for k in out)
    for k, want in reference.items():
        assert out[k].dtype == torch.bfloat16 and torch.equal(out[k], want.to(torch.bfloat16)), k
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    assert (dst / "tokenizer.json").exists()
    load_pretrained(dst, dtype=torch.bfloat16)  # loads as an ordinary BF16 checkpoint
    with pytest.raises(CheckpointError, match="must differ"):
        convert_fp8_to_bf16(src, src)


def test_keep_fp8_returns_stored_projections_without_dequantising(tmp_path, fp8_cfg, monkeypatch):
    """load_pretrained(keep_fp8=...) hands back the e4m3 bytes and scales of the selected nn.Linear
    projections, never dequantising them (their weights get no storage); everything else loads as
    before, the fused routed experts and the excluded kv_b_proj dequantised."""
    import dsv3.fp8.quant as quant
    from dsv3.checkpoint import _hf_prefix, load_pretrained

    save_pretrained(Transformer(fp8_cfg), tmp_path)
    reference = _to_fp8_checkpoint(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    dequantised = []
    real = quant.dequantize_blocks
    monkeypatch.setattr(
        quant, "dequantize_blocks", lambda w, s, **kw: dequantised.append(1) or real(w, s, **kw)
    )
    model, raw = load_pretrained(tmp_path, keep_fp8=lambda name: not name.endswith("kv_b_proj"))
    linears = [n for n, m in Transformer(fp8_cfg).named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(raw) == {n for n in linears if n != "lm_head" and not n.endswith("kv_b_proj")}  # MTP too
    for name, (w, scale) in raw.items():
        key = _hf_prefix(name + ".weight", fp8_cfg.n_layers)
        assert w.dtype == torch.float8_e4m3fn and torch.equal(
            w.view(torch.uint8), stored[key].view(torch.uint8)
        )
        assert torch.equal(scale, stored[key + "_scale_inv"])
        assert model.get_submodule(name).weight.is_meta and name + ".weight" not in model.state_dict()
    assert len(dequantised) == len(reference) - len(raw)  # only what was not kept
    got = dict(hf_state_dict(model))
    for k in ("model.layers.0.self_attn.kv_b_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight"):
        assert torch.equal(got[k].float(), reference[k]), k
    assert isinstance(load_pretrained(tmp_path), Transformer)  # without keep_fp8: the model alone


# ---- integrity on load: the manifest, kinds of tensors, non-finite weights ------------------------
def _training_checkpoint(root, model: Transformer):
    """A checkpoint as training writes it: the model files plus manifest.json with their SHA-256."""
    from dsv3.train.state import save_checkpoint

    return save_checkpoint(root, 1, model, {}, {"step": 1})


def _flip_data_byte(file, at: int = 0) -> None:
    """Flip the lowest mantissa bit of one float32 value in a safetensors file's data: the header
    still parses and the value stays finite, so only the checksum can tell."""
    raw = bytearray(file.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + 4 * at] ^= 0x01
    file.write_bytes(bytes(raw))


def test_a_verified_training_checkpoint_loads(tmp_path, tiny):
    model = Transformer(tiny)
    ckpt = _training_checkpoint(tmp_path, model)
    assert (ckpt / "manifest.json").exists()
    assert _same_weights(model, load_pretrained(ckpt))


def test_flipped_bytes_fail_the_manifest_check_and_verify_false_skips_it(tmp_path, tiny):
    ckpt = _training_checkpoint(tmp_path, Transformer(tiny))
    _flip_data_byte(ckpt / "model.safetensors", at=5)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt \(SHA-256"):
        load_pretrained(ckpt)
    load_pretrained(ckpt, verify=False)  # the opt-out loads it as it is
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or altered"):
        load_pretrained(ckpt)


def test_llm_verifies_and_has_the_opt_out(tmp_path, tiny):
    from dsv3.infer.llm import LLM

    ckpt = _training_checkpoint(tmp_path, Transformer(tiny))
    _flip_data_byte(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):
        LLM(ckpt, num_blocks=8)
    LLM(ckpt, verify=False, num_blocks=8)


def test_official_checkpoints_have_nothing_to_hash(tmp_path, tiny, monkeypatch):
    """No manifest (an HF release): loading never hashes the files, so it stays as fast as before."""
    import dsv3.data.fetch as fetch

    save_pretrained(Transformer(tiny), tmp_path)
    monkeypatch.setattr(fetch, "sha256_file", lambda p: pytest.fail(f"hashed {p}"))
    load_pretrained(tmp_path)


def test_integer_tensors_for_float_weights_are_refused(tmp_path, tiny):
    save_pretrained(Transformer(tiny), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(tiny.dim, dtype=torch.int32)}))
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=r"model\.safetensors: model\.norm\.weight is int32"):
            load_pretrained(tmp_path, verify=verify)


def test_non_finite_weights_give_one_warning_naming_them(tmp_path, tiny):
    import warnings

    save_pretrained(Transformer(tiny), tmp_path)

    def poison(t):
        t["model.norm.weight"][3] = float("nan")
        t["model.layers.1.mlp.experts.2.down_proj.weight"][0, 0] = float("inf")

    _rewrite(tmp_path, poison)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained(tmp_path)
    msgs = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "2 tensor(s)" in msgs[0] and "norm.weight" in msgs[0] and "layers.1.mlp.experts.w2" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pretrained(tmp_path, verify=False)  # the opt-out skips the scan


# ---- unreadable checkpoints: one line naming the file ---------------------------------------------
def _garble(path, text: str) -> None:
    (path / "model.safetensors").write_bytes(text.encode() * 50)


def _truncate(path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _sharded_without(path, tiny, what: str) -> None:
    save_pretrained(Transformer(tiny), path, max_shard_bytes=200_000)
    index = path / "model.safetensors.index.json"
    if what == "shard":
        next(path.glob("model-00002-*.safetensors")).unlink()
    elif what == "json":
        index.write_text('{"weight_map": {"a": ')
    elif what == "weight_map":
        index.write_text('{"metadata": {}}')
    elif what == "key":  # the index sends a key to a shard that does not hold it
        data = json.loads(index.read_text())
        shards = sorted(set(data["weight_map"].values()))
        here = data["weight_map"]["model.norm.weight"]
        data["weight_map"]["model.norm.weight"] = next(s for s in shards if s != here)
        index.write_text(json.dumps(data))
    elif what == "escape":
        index.write_text(json.dumps({"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}))


BAD_CHECKPOINTS = {
    # case: (how to break a checkpoint directory `ckpt`, the file the message must name)
    "missing": (lambda ckpt, tiny: None, "ckpt"),
    "a file": (lambda ckpt, tiny: ckpt.write_text("{}"), "ckpt"),
    "no config.json": (lambda ckpt, tiny: ckpt.mkdir(), "config.json"),
    "invalid config.json": (
        lambda ckpt, tiny: (
            save_pretrained(Transformer(tiny), ckpt),
            (ckpt / "config.json").write_text("{x"),
        ),
        "config.json",
    ),
    "config.json without a field": (
        lambda ckpt, tiny: (
            save_pretrained(Transformer(tiny), ckpt),
            (ckpt / "config.json").write_text("{}"),
        ),
        "config.json",
    ),
    "config.json not an object": (
        lambda ckpt, tiny: (
            save_pretrained(Transformer(tiny), ckpt),
            (ckpt / "config.json").write_text("[1]"),
        ),
        "config.json",
    ),
    "truncated safetensors": (
        lambda ckpt, tiny: (save_pretrained(Transformer(tiny), ckpt), _truncate(ckpt)),
        "model.safetensors",
    ),
    "garbled safetensors": (
        lambda ckpt, tiny: (save_pretrained(Transformer(tiny), ckpt), _garble(ckpt, "garbage")),
        "model.safetensors",
    ),
    "malformed index": (
        lambda ckpt, tiny: _sharded_without(ckpt, tiny, "json"),
        "model.safetensors.index.json",
    ),
    "index without weight_map": (
        lambda ckpt, tiny: _sharded_without(ckpt, tiny, "weight_map"),
        "model.safetensors.index.json",
    ),
    "index pointing outside": (
        lambda ckpt, tiny: _sharded_without(ckpt, tiny, "escape"),
        "model.safetensors.index.json",
    ),
    "key not in its shard": (lambda ckpt, tiny: _sharded_without(ckpt, tiny, "key"), "model.norm.weight"),
    "missing shard": (lambda ckpt, tiny: _sharded_without(ckpt, tiny, "shard"), "model-00002-of-"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_unreadable_checkpoints_are_one_line_errors_naming_the_file(tmp_path, tiny, case):
    from dsv3.errors import Dsv3Error

    breaks, names = BAD_CHECKPOINTS[case]
    ckpt = tmp_path / "ckpt"
    breaks(ckpt, tiny)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    msg = str(e.value)
    assert isinstance(e.value, Dsv3Error)
    assert "\n" not in msg and str(ckpt) in msg and names in msg, msg


# ---- the same at the command line: exit code 2, one line naming the file, no traceback -----------
# `python -m dsv3 generate` needs generate_main wrapped by dsv3.errors.run_cli (the CLI side of the
# issue); until then the wrapped entry point, run in a real process, holds the messages to that contract.
ENV = {**os.environ, "DSV3_NATIVE_KERNELS": "0"}

# every case through run_cli(generate_main) in one process (one interpreter start for all)
WRAPPED_ALL = """
import contextlib, io, json, sys, traceback
from dsv3.errors import run_cli
from dsv3.infer.cli import generate_main
results = {}
for case, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = run_cli("dsv3 generate", generate_main, argv)
    except BaseException:
        code, err = None, io.StringIO(traceback.format_exc())
    results[case] = [code, err.getvalue()]
print(json.dumps(results))
"""


def _one_line_naming(code, stderr: str, name: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]
    return (
        code == 2
        and "Traceback" not in stderr
        and len(lines) == 1
        and lines[0].startswith("dsv3 generate: ")
        and name in lines[0]
    )


def test_generate_names_every_bad_checkpoint_file_in_one_line(tmp_path, tiny):
    argv, names = {}, {}
    for i, (case, (breaks, name)) in enumerate(BAD_CHECKPOINTS.items()):
        ckpt = tmp_path / f"case{i}" / "ckpt"
        ckpt.parent.mkdir()
        breaks(ckpt, tiny)
        argv[case], names[case] = ["--ckpt", str(ckpt), "--prompt", "x", "--threads", "1"], name
    good = tmp_path / "good"
    save_pretrained(Transformer(tiny), good)
    argv["token id outside the vocabulary"] = ["--ckpt", str(good), "--ids", "1,999999", "--threads", "1"]
    names["token id outside the vocabulary"] = "token ids [999999]"
    r = subprocess.run(
        [sys.executable, "-c", WRAPPED_ALL, json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    bad = {case: err for case, (code, err) in results.items() if not _one_line_naming(code, err, names[case])}
    assert not bad, bad


def test_dsv3_generate_names_the_bad_checkpoint_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    r = subprocess.run(
        [sys.executable, "-m", "dsv3", "generate", "--ckpt", str(ckpt), "--prompt", "x", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert _one_line_naming(r.returncode, r.stderr, "model.safetensors"), r.stderr
