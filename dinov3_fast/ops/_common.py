"""Constants and dtype rules shared by several op modules (imports torch only): the precision the
ops compute and return in, the log2/ln2 factors of the exp2-based kernels, and the Gram loss's
clamp modes (shared by its cpu and triton paths)."""
from __future__ import annotations

import contextlib
import math

import torch

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E); the kernels work in log2 units
LN2 = math.log(2.0)  # ln(x) = log2(x) * LN2

# `clamp` argument of the Gram loss's custom op and kernels (DINOv3's remove_neg /
# remove_only_teacher_neg). The Triton kernels compare against the literal values.
CLAMP_NONE, CLAMP_BOTH, CLAMP_TEACHER = 0, 1, 2

# Backends that compute float64 inputs in float64; triton and cuda compute them in float32.
FP64_BACKENDS = ("cpu", "reference")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the cpu and reference paths compute in: float64 for a float64 tensor, float32
    for every other dtype (half-precision inputs are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def result_dtype(x: torch.Tensor, backend: str) -> torch.dtype:
    """The dtype of what `backend` returns for input `x` (losses, statistics, assignments):
    `compute_dtype(x)` on the backends in FP64_BACKENDS, float32 on the others."""
    return compute_dtype(x) if backend in FP64_BACKENDS else torch.float32


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on `device_type`, for the references' fp32 sections; no
    context where autocast does not exist (the meta device, on which torch.autocast raises)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
