import pytest
import torch

from dsv3 import ModelConfig

# The tests use toy models: one thread is faster than several for their small ops, and it keeps the
# suite from crawling when other work shares the cores (OpenMP threads spin against each other).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> ModelConfig:
    return ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def native():
    """The native decode kernels (dsv3.infer.decode.kernels.Native); the test skips, saying why, where
    they do not build here."""
    from dsv3.infer.decode import kernels as cpu_kernels

    k = cpu_kernels.kernels()
    if not isinstance(k, cpu_kernels.Native):
        pytest.skip(f"native kernels unavailable: {cpu_kernels.why_not_native}")
    return k
