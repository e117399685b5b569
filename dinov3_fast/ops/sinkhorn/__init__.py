"""Sinkhorn-Knopp teacher centering: checks, backend dispatch, custom op, and `sinkhorn_knopp`.

DINOv3 centres the teacher's (B, K) prototype logits with three Sinkhorn-Knopp rounds (no grad).
Its reference makes about 20 full fp32 passes and overflows once logits / temp > ~88. The triton
and cuda backends work on log-domain potentials, one K-vector and one B-vector, recomputing exp on
every pass (see triton.py): two read-only passes of the input per round, then one read + one
write. The result of every backend but reference is exact in real arithmetic and finite wherever
the true assignment is.

Backends: triton (CPU under TRITON_INTERPRET=1; on the GPU the default for large inputs and
with a process group), cuda (one persistent launch with a grid-wide barrier, kernels/sinkhorn.cu;
the GPU default for inputs up to CUDA_MAX_NUMEL elements), cpu (PyTorch: matrix-vector scaling
on BLAS, falling back to the log domain when a sample's mass leaves the safe fp32 range or the
result is not finite; see cpu.py), reference (DINOv3's code).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from dinov3_fast.ops._common import op_context, result_dtype
from dinov3_fast.ops._dispatch import check_floating, check_positive, check_rank, select_backend, single_rank_as_none
from dinov3_fast.ops.sinkhorn.cpu import sinkhorn_cpu
from dinov3_fast.ops.sinkhorn.reference import sinkhorn_knopp_ref

__all__ = ["sinkhorn_knopp", "sinkhorn_knopp_ref"]

# Fastest first, per device type and input size (docs/architecture.md, "Sinkhorn-Knopp"). On two
# H100s (2026-11-26) the multi-launch triton path cost 0.7-1.2 ms of (host-bound) launches plus
# 0.0076 ns per element, the one-launch cuda kernel 0.0198 ns per element: cuda ran (32, 262144)
# in 0.14 ms (triton 0.74 / 1.21) and (128, 65536) in 0.18 ms (0.79 / 1.20); triton ran
# (1274, 98304) in 1.63 ms (cuda 2.48). The lines cross near 56M-72M elements; up to
# CUDA_MAX_NUMEL cuda goes first.
PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "triton")}
PREFERENCE_SMALL = {**PREFERENCE, "cuda": ("cuda", "triton")}
CUDA_MAX_NUMEL = 48 * 2**20
# kMaxBatch of kernels/sinkhorn.cu (tested equal to _C.sinkhorn_max_batch()); a Python constant
# so that torch.compile traces the dispatch without calling into the extension
CUDA_MAX_BATCH = 2048


def _impl(backend: str):
    if backend == "triton":
        from dinov3_fast.ops.sinkhorn.triton import sinkhorn_triton  # lazily: triton is optional
        return sinkhorn_triton
    if backend == "cuda":
        from dinov3_fast.ops.sinkhorn.cuda import sinkhorn_cuda
        return sinkhorn_cuda
    return sinkhorn_cpu


# ----------------------------------------------------------------------------- custom op

@torch.library.custom_op("dinov3_fast::sinkhorn_knopp_fwd", mutates_args=())
def _sinkhorn_knopp_fwd(logits: torch.Tensor, teacher_temp: float, n_iterations: int, backend: str) -> torch.Tensor:
    with op_context(logits):
        return _impl(backend)(logits, teacher_temp, n_iterations, None)


@_sinkhorn_knopp_fwd.register_fake
def _(logits, teacher_temp, n_iterations, backend):
    return logits.new_empty(logits.shape, dtype=result_dtype(logits, backend))


def _cuda_first(logits: torch.Tensor, group) -> bool:
    """Whether the cuda kernel is the faster choice for these logits and can take them: small
    enough, a dtype it reads, B within its shared-memory batch limit, and no process group (it
    has no all-reduce between passes)."""
    return (group is None and logits.numel() <= CUDA_MAX_NUMEL and logits.dtype != torch.float64
            and logits.shape[0] <= CUDA_MAX_BATCH)


# ----------------------------------------------------------------------------- public API

def _check_n_samples(n_samples, n_rows: int) -> None:
    """n_samples is the global count: 0 only where this rank has no row either.

    A tensor's value is checked only where reading it is free: a CPU tensor, outside tracing. A
    CUDA tensor (iBOT's all-reduced n_masked_patches_tensor) is checked for its size alone, since
    reading its value would sync the host with the GPU on every call; only the reference backend
    reads it, and the fused backends do not depend on it. Under torch.compile or on fake/meta
    tensors there is no value to read without a graph break.
    """
    if n_samples is None:
        return
    if isinstance(n_samples, torch.Tensor):
        if n_samples.numel() != 1:
            raise ValueError(f"n_samples must be an int or a 1-element tensor, got shape {tuple(n_samples.shape)}")
        if n_samples.is_complex():
            raise TypeError(f"n_samples must be an integer or floating-point tensor, got {n_samples.dtype}")
        if n_samples.device.type != "cpu" or torch.compiler.is_compiling() or is_fake(n_samples):
            return
        value = n_samples.item()
    elif isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise TypeError(f"n_samples must be an int or a 1-element tensor, got {type(n_samples).__name__}")
    else:
        value = n_samples
    least = 1 if n_rows else 0
    if value < least:
        raise ValueError(f"n_samples must be >= {least} (the global sample count; teacher_logits has {n_rows} rows), "
                         f"got {value}")


def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    *,
    n_iterations: int = 3,
    n_samples: int | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher assignment, the same function as DINOv3's `sinkhorn_knopp_teacher`.

    Args:
        teacher_logits: (B, K) teacher logits of this rank (fp32, bf16, fp16; fp64 on cpu), K >= 1.
            B may be 0 (iBOT: a rank whose crops hold no masked patch): with a group, the rank
            still joins every all-reduce, contributing nothing, so the other ranks get the
            assignment of their rows alone; without one, the result is empty at once.
        teacher_temp: teacher temperature, > 0.
        n_iterations: normalisation rounds, >= 1.
        n_samples: global sample count B_total (DINO: B * world; iBOT: the all-reduced masked-token
            count, an int or 1-element tensor, all-reduced by the caller). Accepted for parity with
            DINOv3 and used by the reference backend; the fused backends do not need it, because
            B_total only enters as a global scale that the next normalisation cancels exactly.
            Must be >= 1 (>= 0 where B is 0); a CUDA tensor's value is not checked (no host sync).
        group: process group whose ranks hold the rest of the batch; the per-prototype sums are
            all-reduced over it between passes (eagerly: under torch.compile this is a graph
            break). None, or a group of one rank: this process only.
        backend: force "triton", "cuda", "cpu" or "reference"; default: fastest for the device.

    Returns:
        (B, K) fp32 assignment (each row sums to 1; (0, K) when B is 0), no grad. fp64 for fp64
        input on the cpu and reference backends.
    """
    check_floating("teacher_logits", teacher_logits)
    check_rank("teacher_logits", teacher_logits, 2, "(B, K)")
    if teacher_logits.shape[1] == 0:
        raise ValueError(f"teacher_logits must have K >= 1 prototypes, got shape {tuple(teacher_logits.shape)}")
    check_positive("teacher_temp", teacher_temp)
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int):
        raise TypeError(f"n_iterations must be an int, got {type(n_iterations).__name__}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    _check_n_samples(n_samples, teacher_logits.shape[0])
    group = single_rank_as_none(group)

    preference = PREFERENCE_SMALL if _cuda_first(teacher_logits, group) else PREFERENCE
    chosen = select_backend("sinkhorn_knopp", teacher_logits.device, backend, preference)
    temp = float(teacher_temp)
    if teacher_logits.shape[0] == 0 and group is None:  # nothing to normalise, no rank to join
        return teacher_logits.new_empty(teacher_logits.shape, dtype=result_dtype(teacher_logits, chosen))
    with torch.no_grad():
        if chosen == "reference":
            return sinkhorn_knopp_ref(teacher_logits, temp, n_iterations, n_samples, group)
        if group is not None:
            with op_context(teacher_logits):
                return _impl(chosen)(teacher_logits, temp, n_iterations, group)
        return _sinkhorn_knopp_fwd(teacher_logits, temp, n_iterations, chosen)
