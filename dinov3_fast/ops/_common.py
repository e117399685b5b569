"""Constants and dtype rules shared by several op modules (imports torch only): the precision the
ops compute and return in, the log2/ln2 factors of the exp2-based kernels, the Gram loss's
clamp modes (shared by its cpu and triton paths), and the context the custom ops' implementations
run in."""
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


@torch.compiler.assume_constant_result
def autocast_available(device_type: str) -> bool:
    """`torch.amp.is_autocast_available`, which torch.compile takes as the constant it is. Dynamo
    before torch 2.13 cannot trace the builtin behind it: a graph break in every compiled caller
    (an error under fullgraph=True; measured with torch 2.11)."""
    return torch.amp.is_autocast_available(device_type)


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on `device_type`, for the references' fp32 sections; no
    context where autocast does not exist (the meta device, on which torch.autocast raises)."""
    if autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def op_context(x: torch.Tensor):
    """The context a custom op's implementation (or any backend function called outside one) runs
    in, for its input `x`:
      * autocast off on x's device type. Autocast does not see custom ops (it passes their inputs
        through uncast) but stays on inside them, where it would recast the torch matmuls of the
        cpu paths and the launchers to its lower precision: silently (Gram's identity products,
        Sinkhorn's scaling, the fused head loss's logits gradient, which underflows in fp16 at
        upstream gradient 1) or into a dtype clash with an out= buffer (Gram's tiled cpu path
        raised). Every backend computes as documented whatever the caller's autocast state.
      * for a CUDA tensor, x's device made current: Triton launches on the current device and
        its current stream, not on the tensor's device.
    """
    with autocast_disabled(x.device.type), (torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()):
        yield


def save_for_backward(ctx, *tensors: torch.Tensor | None) -> None:
    """`ctx.save_for_backward(*tensors)`, except that an inference tensor (e.g. teacher targets
    made under torch.inference_mode, which DINOv3's modules accept beside a student that requires
    grad) is kept as a plain attribute: autograd refuses to save one. Nothing is lost: an inference
    tensor has no version counter to check, and outside inference mode it cannot be modified in
    place. Read them back with `saved_tensors(ctx)`."""
    kept = [t is not None and t.is_inference() for t in tensors]
    ctx.save_for_backward(*(None if k else t for t, k in zip(tensors, kept)))
    ctx.inference_tensors = {i: t for i, (t, k) in enumerate(zip(tensors, kept)) if k}


def saved_tensors(ctx) -> tuple[torch.Tensor | None, ...]:
    """The tensors given to `save_for_backward`, in order."""
    return tuple(ctx.inference_tensors.get(i, t) for i, t in enumerate(ctx.saved_tensors))
