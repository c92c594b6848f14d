import pytest
import torch

from dsv3 import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> ModelConfig:
    return ModelConfig.from_preset("tiny")
