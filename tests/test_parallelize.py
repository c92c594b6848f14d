"""`dsv3.parallel.parallelize`: the order it applies things in, and its one-process pieces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv3 import ModelConfig, Transformer
from dsv3.config import ConfigError
from dsv3.fp8.linear import Fp8Linear
from dsv3.parallel.parallelize import Parallelization, parallelize, pipeline_chunks
from dsv3.parallel.pipelined import drop_to_meta
from dsv3.train.strategy import Strategy


def test_pipeline_chunks_is_the_accumulation_and_refuses_a_ramp():
    assert pipeline_chunks(8, 8, 1, 2, pp=2) == 4  # 8 sequences over 2 data ranks in micro-batches of 1
    assert pipeline_chunks(8, 16, 1, 2, pp=1) is None  # no pipeline: any ramp
    with pytest.raises(ConfigError, match=r"batch_start, batch_end: 8 != 16; with parallel.pp=2"):
        pipeline_chunks(8, 16, 1, 2, pp=2)


def test_parallelize_applies_precision_and_recomputation():
    """FP8 swaps the linears, recomputation wraps the blocks, and the model still trains."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    plain = model.layers[0].forward
    out = parallelize(model, Parallelization(precision="fp8", recompute=True), Strategy())
    assert out is model
    assert any(isinstance(m, Fp8Linear) for m in model.modules())
    assert model.layers[0].forward is not plain  # wrapped by activation checkpointing
    loss = model.loss(torch.randint(0, 512, (1, 9))).total
    loss.backward()
    assert model.embed_tokens.weight.grad is not None


def test_drop_to_meta_keeps_what_is_asked_and_sharing():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight  # one Parameter in two modules
    model = nn.Sequential(a, b)
    keep = {id(a.bias)}
    freed = drop_to_meta(model, keep)
    assert freed == 9 + 3  # the shared weight once, b's bias
    assert a.bias.device.type == "cpu" and a.weight.device.type == "meta"
    assert a.weight is b.weight and isinstance(a.weight, nn.Parameter)
