"""A slice of a meta-device model materialised alone equals that slice of the whole model.

The seeded init (dsv3.model.init) and the checkpoint reader (dsv3.parallel.materialize) against the
single-process model built whole and against `load_pretrained` (the pipelined trainer's stages are
covered end to end by test_pipeline_train).
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import ModelConfig, Transformer, save_pretrained
from dsv3.checkpoint import CheckpointError
from dsv3.model.init import EXPERT_STACK, initial_value
from dsv3.parallel.materialize import WeightSource, has_meta, materialize


def _cfg() -> ModelConfig:
    return ModelConfig.from_preset("tiny")  # 3 layers (layer 0 dense), 8 experts, 1 MTP module


def _meta_twin(seed: int) -> tuple[Transformer, Transformer]:
    torch.manual_seed(seed)
    whole = Transformer(_cfg())
    torch.manual_seed(seed)
    with torch.device("meta"):
        meta = Transformer(_cfg())
    return whole, meta


def _slice(model: Transformer) -> dict[str, range | None]:
    """Layer 1 (an MoE layer in `tiny`) with experts 2..5, and the head."""
    return {
        n: (range(2, 6) if EXPERT_STACK.search(n) else None)
        for n, _ in model.named_parameters()
        if n.startswith("layers.1.") or n == "lm_head.weight"
    }


def test_the_seed_is_drawn_before_the_modules_so_meta_and_real_builds_agree():
    whole, meta = _meta_twin(3)
    assert whole.init_seed == meta.init_seed
    torch.manual_seed(3)
    assert Transformer(_cfg()).init_seed == whole.init_seed  # torch.manual_seed fixes the model
    assert Transformer(_cfg()).init_seed != whole.init_seed  # and the next model differs


@pytest.mark.parametrize("from_checkpoint", [False, True], ids=["init", "checkpoint"])
def test_a_materialised_slice_equals_the_whole_models(tmp_path, from_checkpoint):
    whole, meta = _meta_twin(0)
    with torch.no_grad():
        whole.layers[1].mlp.gate.e_score_correction_bias.uniform_()  # a trained bias travels too
    source = WeightSource(None)
    if from_checkpoint:
        save_pretrained(whole, tmp_path / "ckpt")
        source = WeightSource(tmp_path / "ckpt")
    wanted = _slice(meta)
    allocated = materialize(meta, wanted, source)
    full = dict(whole.named_parameters())
    mine = dict(meta.named_parameters())
    assert allocated == sum(t.numel() for n, t in mine.items() if not t.is_meta)
    for name in wanted:
        want = full[name].detach()[2:6] if EXPERT_STACK.search(name) else full[name].detach()
        assert torch.equal(mine[name], want), name
    assert all(t.is_meta for n, t in mine.items() if n not in wanted)
    bias = "layers.1.mlp.gate.e_score_correction_bias"
    got, ref = dict(meta.named_buffers())[bias], dict(whole.named_buffers())[bias]
    assert torch.equal(got, ref) if from_checkpoint else not got.any()
    assert torch.equal(meta.rotary.inv_freq, whole.rotary.inv_freq)
    assert not any(b.is_meta for b in meta.buffers()) and has_meta(meta)


def test_everything_materialised_gives_the_whole_model():
    whole, meta = _meta_twin(1)
    materialize(meta, {n: None for n, _ in meta.named_parameters()}, WeightSource(None))
    assert not has_meta(meta)
    ids = torch.randint(0, _cfg().vocab_size, (2, 9))
    torch.testing.assert_close(meta(ids), whole(ids), rtol=0, atol=0)


def test_expert_rows_are_independent_of_which_rows_are_built():
    kw = dict(name="layers.1.mlp.experts.w1", shape=(8, 4, 6), std=0.02, seed=5)
    all_rows = initial_value(**kw)
    assert torch.equal(initial_value(**kw, rows=range(3, 7)), all_rows[3:7])
    with pytest.raises(ValueError, match="rows are only for fused expert stacks"):
        initial_value("lm_head.weight", (4, 4), 0.02, 5, rows=range(2))


def test_a_checkpoint_without_a_wanted_weight_is_refused_naming_it(tmp_path):
    whole, meta = _meta_twin(0)
    save_pretrained(whole, tmp_path / "ckpt")
    wanted = {"layers.1.mlp.experts.w1": range(0, 2)}
    meta.layers[1].mlp.experts.w1 = torch.nn.Parameter(torch.empty(9, 2, 2, device="meta"))  # E=9
    with pytest.raises(CheckpointError, match=r"experts\.8\.gate_proj"):
        materialize(meta, {"layers.1.mlp.experts.w1": range(7, 9)}, WeightSource(tmp_path / "ckpt"))
    with pytest.raises(KeyError, match="no parameter nope"):
        materialize(meta, {**wanted, "nope": None}, WeightSource(None))
