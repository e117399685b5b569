"""Test configuration. Must run before any Triton kernel is imported: without a GPU, every Triton
kernel runs under the interpreter on CPU tensors (TRITON_INTERPRET=1), so CI exercises them all."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present (runs in benchmarks/device_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernels run on here: CUDA when present, else CPU (Triton via the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
