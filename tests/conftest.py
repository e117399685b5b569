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


@pytest.fixture
def poisoned_cuda_cache():
    """Fill the CUDA caching allocator's free blocks with NaN, so an output element a kernel fails to
    write reads back as NaN (and fails the test) instead of as a stale plausible value."""
    if HAS_CUDA:
        free, _ = torch.cuda.mem_get_info()
        block = torch.full((min(free // 2, 8 << 30) // 4,), float("nan"), device="cuda")
        del block  # returns to the cache, still NaN-filled
    yield


@pytest.fixture
def interpreter_bf16_dots(monkeypatch):
    """Make the Triton interpreter's tl.dot correct for bf16 operands, so bf16 kernels can be
    checked on CPU. Triton 3.9's interpreter keeps bf16 tensors as their raw uint16 bits (numpy has
    no bf16) and its dot multiplies those bits as integers; widening to fp32 first is exact (a bf16
    is the top half of an fp32), which is what a tensor-core bf16 dot computes before accumulating.
    Elementwise bf16 arithmetic and casts are already correct in the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, *args):
        return original(self, widen(a), widen(b), d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
