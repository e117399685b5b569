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
def triton_launches(monkeypatch):
    """spy(module, name) -> list: wraps the Triton kernel `module.name` so that every launch
    (`kernel[grid](*args)`) records its positional arguments, then runs it. Shows which tensor (its
    memory and strides) a kernel really read: a launcher that copied its input first hands the
    kernel another data_ptr."""
    def spy(module, name):
        kernel = getattr(module, name)
        calls = []

        class Spy:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    calls.append(args)
                    return launch(*args, **kwargs)
                return run

        monkeypatch.setattr(module, name, Spy())
        return calls
    return spy


@pytest.fixture
def interpreter_bf16_dots(monkeypatch):
    """Make the Triton interpreter's bf16 dots and fp32 -> bf16 casts match the GPU, so bf16 kernels
    can be checked on CPU. Triton 3.9's interpreter keeps bf16 tensors as their raw uint16 bits (numpy
    has no bf16):
    - its dot multiplies those bits as integers; widening to fp32 first is exact (a bf16 is the top
      half of an fp32), which is what a tensor-core bf16 dot computes before accumulating;
    - its fp32 -> bf16 cast (`.to(tl.bfloat16)`, and the implicit one of a bf16 tl.store) drops the
      low 16 bits, i.e. rounds toward zero: every rounding then shrinks the value (mean -0.28%), and
      the biases add up instead of averaging out (RoPE attention erred 3x PyTorch's bf16 error with
      it). The GPU rounds to nearest even (cvt.rn), as done here."""
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

    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
            one = np.uint32(1)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & one)) >> np.uint32(16)
            nan = np.isnan(src.data)  # keep NaN a (quiet) NaN: rounding could carry it into inf
            rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded)
            return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
