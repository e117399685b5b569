"""Fused head last layer + soft-target cross-entropy: checks, dispatch, custom op, autograd, and
`linear_soft_cross_entropy`.

DINOv3's DINO and iBOT heads end in a bias-free Linear to K prototypes (65,536 for ViT-L, up to
262,144 for ViT-7B), whose logits feed the DINO / iBOT soft cross-entropy. Unfused, a training
step keeps the logits of every student row (iBOT at ViT-L's batch 128: 7.5k masked tokens x 65,536
in bf16, 0.9 GiB) and the teacher's fp32 targets (1.9 GiB) until the loss's backward, which then
forms a logits-sized gradient. The fused op forms the logits chunk by chunk and computes the loss
and the gradients of the features and of the weight in the same pass (chunked.py); its backward
only scales them. Nothing of size K per row outlives the forward.
"""
from __future__ import annotations

import torch

from dinov3_fast.ops._common import autocast_available, op_context, result_dtype
from dinov3_fast.ops._dispatch import check_no_double_backward, check_same_device, select_backend
from dinov3_fast.ops.linear_soft_ce.chunked import CHUNK_LOGITS, grad_dtype, linear_soft_ce_chunked
from dinov3_fast.ops.linear_soft_ce.reference import linear_soft_cross_entropy_ref
from dinov3_fast.ops.soft_ce import check_soft_ce_args
from dinov3_fast.ops.soft_ce.cpu import soft_ce_bwd_student_cpu, soft_ce_fwd_cpu

__all__ = ["linear_soft_cross_entropy", "linear_soft_cross_entropy_ref"]

PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu", "triton")}  # the soft-CE kernels' (ops/soft_ce)


def _soft_ce_impls(backend: str):
    """(forward, student backward) of the soft-CE kernels of `backend`."""
    if backend == "triton":
        from dinov3_fast.ops.soft_ce import triton as soft_ce_triton  # lazily: triton is optional
        return soft_ce_triton.soft_ce_fwd_triton, soft_ce_triton.soft_ce_bwd_student_triton
    return soft_ce_fwd_cpu, soft_ce_bwd_student_cpu


# ----------------------------------------------------------------------------- custom op

@torch.library.custom_op("dinov3_fast::linear_soft_ce", mutates_args=())
def _linear_soft_ce_op(features: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor, coef: torch.Tensor,
                       student_temp: float, ignore_diagonal: bool, max_chunk_logits: int, backend: str,
                       need_features: bool, need_weight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with op_context(features):
        return linear_soft_ce_chunked(features, weight, teacher, coef, student_temp, ignore_diagonal,
                                      max_chunk_logits, *_soft_ce_impls(backend), need_features, need_weight)


@_linear_soft_ce_op.register_fake
def _(features, weight, teacher, coef, student_temp, ignore_diagonal, max_chunk_logits, backend, need_features,
      need_weight):
    return (coef.new_empty(()),
            torch.empty_like(features, dtype=grad_dtype(features)) if need_features else features.new_empty((0,)),
            weight.new_empty(weight.shape, dtype=grad_dtype(weight)) if need_weight else weight.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    # Saved tensors, not attributes: autograd frees them once this node's backward has run (a
    # retained graph keeps them), so they do not outlive the heads' backward into the backbone's.
    ctx.save_for_backward(output[1], output[2])
    ctx.dtypes = inputs[0].dtype, inputs[1].dtype
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_d_features, _grad_d_weight):
    """The gradients formed in the forward, times the upstream gradient (a loss weight, a loss
    scale): out of place, in the inputs' dtypes. No double backward: nothing here is
    differentiable twice."""
    if grad_loss is None:  # the loss was not used
        return (None,) * 10
    check_no_double_backward("linear_soft_cross_entropy")
    out = []
    for name, grad, need, dtype in zip(("features", "weight"), ctx.saved_tensors, ctx.needs_input_grad[:2], ctx.dtypes):
        if not need:
            out.append(None)
        elif grad.numel() == 0:
            raise RuntimeError(f"linear_soft_cross_entropy: {name} requires grad but its gradient was not "
                               "computed in the forward (it did not require grad then)")
        else:
            out.append((grad * grad_loss).to(dtype))
    return *out, *(None,) * 8


_linear_soft_ce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def linear_soft_cross_entropy(
    features: torch.Tensor,
    weight: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
    weights: torch.Tensor | None = None,
    max_chunk_logits: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """`soft_cross_entropy(features @ weight^T, teacher_probs, ...)` without keeping the logits: the
    last layer of DINOv3's DINO or iBOT head fused with its loss (see `linear_soft_cross_entropy_ref`).

    Args:
        features: (S, B, d) the student crops' normalised head bottlenecks (DINO), or (M, d) tokens
            (iBOT); fp32/bf16/fp16 (fp64 on the cpu/reference backends). Gradients flow to it
            (for fp16 formed in fp32 until the upstream gradient, e.g. a loss scale, is applied).
        weight: (K, d) the head's bias-free last-layer weight, features' dtype (under autocast both
            are cast to the autocast dtype, as the Linear would be). Gradients flow to it.
        teacher_probs: (T, B, K), or (M, K) with 2-D features: the teacher's targets. No gradient.
        student_temp, ignore_diagonal: as `soft_cross_entropy`.
        weights: (B,) (or (M,)) per-row weights replacing 1/B, e.g. iBOT's 1 / (masked tokens of
            the image) / (images). Constants here (DINOv3's never need a gradient).
        max_chunk_logits: most logits formed at once (rows x K); default 2^26 on a GPU, 2^22 on
            the CPU (chunked.py).
        backend: force "triton", "cpu" or "reference"; default: fastest for the device.

    Returns:
        0-dim fp32 loss (fp64 for fp64 input on the cpu/reference backends).
    """
    n_pairs = check_soft_ce_args("features", features, teacher_probs, student_temp, ignore_diagonal, weights,
                                 weight=weight)
    autocast = features.device.type
    if autocast_available(autocast) and torch.is_autocast_enabled(autocast):
        # Autocast passes custom ops' inputs through uncast (and the op runs with it off): cast
        # them as it casts the Linear this replaces, every input but fp64 to the autocast dtype,
        # whether or not the dtypes already agree (fp32 features and weight make bf16/fp16 logits)
        dtype = torch.get_autocast_dtype(autocast)
        features, weight = (t if t.dtype == torch.float64 else t.to(dtype) for t in (features, weight))
    if weight.dtype != features.dtype:
        raise TypeError(f"weight and features must have the same dtype, got {weight.dtype} and {features.dtype}")
    check_same_device("weight", weight, "features", features)
    if max_chunk_logits is None:
        max_chunk_logits = CHUNK_LOGITS["cuda" if features.is_cuda else "cpu"]
    elif isinstance(max_chunk_logits, bool) or not isinstance(max_chunk_logits, int):
        raise TypeError(f"max_chunk_logits must be an int or None, got {type(max_chunk_logits).__name__}")
    elif max_chunk_logits < 1:
        raise ValueError(f"max_chunk_logits must be >= 1, got {max_chunk_logits}")
    grad_enabled = torch.is_grad_enabled()
    for name, t in (("teacher_probs", teacher_probs), ("weights", weights)):
        if grad_enabled and t is not None and t.requires_grad:
            raise ValueError(f"{name} must not require grad in linear_soft_cross_entropy (its gradient is not "
                             "formed); use soft_cross_entropy on the logits for that")

    chosen = select_backend("linear_soft_cross_entropy", features.device, backend, PREFERENCE)
    temp = float(student_temp)
    if chosen == "reference":
        return linear_soft_cross_entropy_ref(features, weight, teacher_probs, temp, ignore_diagonal, weights)
    if features.dim() == 2:
        features, teacher_probs = features[None], teacher_probs[None]
    batch = features.shape[1]
    dtype = result_dtype(features, chosen)
    per_image = (torch.full((batch,), 1.0 / batch, dtype=dtype, device=features.device) if weights is None
                 else weights.to(dtype))
    return _linear_soft_ce_op(features, weight, teacher_probs, per_image / n_pairs, temp, ignore_diagonal,
                              max_chunk_logits, chosen, grad_enabled and features.requires_grad,
                              grad_enabled and weight.requires_grad)[0]
