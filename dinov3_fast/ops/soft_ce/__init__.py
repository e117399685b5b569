"""Soft-target cross-entropy (the DINO and iBOT losses): checks, dispatch, custom ops, autograd,
and `soft_cross_entropy`.

The reference forms an fp32 log_softmax copy of every student crop ((S, B, K), K up to 262,144)
and keeps it for backward. The fused forward streams each student row once (online logsumexp and
the dot products with all teacher crops) and keeps three (S, B) vectors; the fused backward
rewrites the student gradient in the logits' dtype in one pass (see triton.py).

The custom op returns per-row losses row_loss[s, b] = sum over counted teacher crops of
CE(s, t, b); the (tiny) weighting and averaging run in PyTorch, so per-sample weights get their
gradient from autograd and the op itself stays weight-free.
"""
from __future__ import annotations

import torch

from dinov3_fast.ops._common import op_context, result_dtype, save_for_backward, saved_tensors
from dinov3_fast.ops._dispatch import (
    check_floating, check_no_double_backward, check_nonempty, check_positive, check_rank, check_same_device,
    check_shape, select_backend,
)
from dinov3_fast.ops.soft_ce.cpu import soft_ce_bwd_student_cpu, soft_ce_bwd_teacher, soft_ce_fwd_cpu
from dinov3_fast.ops.soft_ce.reference import soft_cross_entropy_ref

__all__ = ["soft_cross_entropy", "soft_cross_entropy_ref"]

PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu", "triton")}


def _triton():
    from dinov3_fast.ops.soft_ce import triton as soft_ce_triton  # lazily: triton is optional
    return soft_ce_triton


# ----------------------------------------------------------------------------- input checks

def check_soft_ce_args(student_name: str, student: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
                       ignore_diagonal: bool, weights: torch.Tensor | None, weight: torch.Tensor | None = None) -> int:
    """Check the arguments of a soft cross-entropy whose student rows are `student` ((S, B, K) or
    (M, K) logits; or, with `weight` (K, d), (S, B, d) or (M, d) features that a fused linear maps
    to K logits). Returns the number of counted crop pairs."""
    check_floating(student_name, student)
    check_floating("teacher_probs", teacher_probs)
    last = "K" if weight is None else "d"
    check_rank(student_name, student, (2, 3), f"(S, B, {last}) or (M, {last})")
    if weight is not None:  # before teacher_probs, whose K it sets
        check_floating("weight", weight)
        check_rank("weight", weight, 2, "(K, d)")
        if weight.shape[1] != student.shape[-1]:
            raise ValueError(f"weight must have shape (K, d) with d = {student.shape[-1]} (the last dim of "
                             f"{student_name} {tuple(student.shape)}), got {tuple(weight.shape)}")
    check_rank("teacher_probs", teacher_probs, student.dim(),
               "(T, B, K)" if student.dim() == 3 else f"(M, K), like {student_name}")
    check_same_device(student_name, student, "teacher_probs", teacher_probs)
    check_nonempty(student_name, student)
    check_nonempty("teacher_probs", teacher_probs)
    batch = student.shape[-2]
    num_classes = student.shape[-1] if weight is None else weight.shape[0]
    if teacher_probs.shape[-2] != batch or teacher_probs.shape[-1] != num_classes:
        raise ValueError(
            f"{student_name} {tuple(student.shape)} and teacher_probs {tuple(teacher_probs.shape)} must agree on "
            f"B = {batch} and K = {num_classes}")
    check_positive("student_temp", student_temp)
    if weights is not None:
        check_floating("weights", weights)
        check_same_device("weights", weights, student_name, student)
        check_shape("weights", weights, (batch,))
    n_s = student.shape[0] if student.dim() == 3 else 1
    n_t = teacher_probs.shape[0] if teacher_probs.dim() == 3 else 1
    n_pairs = n_s * n_t - (min(n_s, n_t) if ignore_diagonal else 0)
    if n_pairs == 0:
        raise ValueError(f"ignore_diagonal=True with {n_s} student and {n_t} teacher crops leaves no pair to average")
    return n_pairs


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("dinov3_fast::soft_ce_fwd", mutates_args=())
def _soft_ce_fwd(student: torch.Tensor, teacher: torch.Tensor, student_temp: float, ignore_diagonal: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _triton().soft_ce_fwd_triton if backend == "triton" else soft_ce_fwd_cpu
    with op_context(student):
        return impl(student, teacher, student_temp, ignore_diagonal)


@_soft_ce_fwd.register_fake
def _(student, teacher, student_temp, ignore_diagonal, backend):
    shape, dtype = student.shape[:2], result_dtype(student, backend)
    return tuple(student.new_empty(shape, dtype=dtype) for _ in range(4))


@torch.library.custom_op("dinov3_fast::soft_ce_bwd", mutates_args=())
def _soft_ce_bwd(grad_row: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, row_max: torch.Tensor,
                 lse_rest: torch.Tensor, a: torch.Tensor, student_temp: float, ignore_diagonal: bool, backend: str,
                 need_student: bool, need_teacher: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d_student = student.new_empty((0,))
    d_teacher = teacher.new_empty((0,))
    with op_context(student):
        if need_student:
            impl = _triton().soft_ce_bwd_student_triton if backend == "triton" else soft_ce_bwd_student_cpu
            d_student = impl(grad_row, student, teacher, row_max, lse_rest, a, student_temp, ignore_diagonal)
        if need_teacher:
            d_teacher = soft_ce_bwd_teacher(grad_row, student, teacher, row_max, lse_rest, student_temp,
                                            ignore_diagonal)
    return d_student, d_teacher


@_soft_ce_bwd.register_fake
def _(grad_row, student, teacher, row_max, lse_rest, a, student_temp, ignore_diagonal, backend, need_student, need_teacher):
    d_student = student.new_empty(student.shape) if need_student else student.new_empty((0,))
    d_teacher = teacher.new_empty(teacher.shape) if need_teacher else teacher.new_empty((0,))
    return d_student, d_teacher


def _setup_context(ctx, inputs, output):
    student, teacher, student_temp, ignore_diagonal, backend = inputs
    _, row_max, lse_rest, a = output
    save_for_backward(ctx, student, teacher, row_max, lse_rest, a)  # the teacher may be an inference tensor
    ctx.options = (student_temp, ignore_diagonal, backend)


def _backward(ctx, grad_row, _grad_max, _grad_rest, _grad_a):
    check_no_double_backward("soft_cross_entropy")
    student, teacher, row_max, lse_rest, a = saved_tensors(ctx)
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_s, d_t = _soft_ce_bwd(grad_row, student, teacher, row_max, lse_rest, a, *ctx.options, need_s, need_t)
    return (d_s if need_s else None), (d_t if need_t else None), None, None, None


_soft_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
    weights: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Soft-target cross-entropy of DINOv3's DINO and iBOT losses (see `soft_cross_entropy_ref`).

        loss = 1/P sum_{(s, t) counted} sum_b w_b * CE(teacher[t, b], softmax(student[s, b] / temp))

    P: counted crop pairs (S*T, minus min(S, T) with ignore_diagonal); w_b = 1/B by default.

    Args:
        student_logits: (S, B, K) student crops (DINO), or (M, K) tokens (iBOT); fp32/bf16/fp16
            (fp64 on the cpu/reference backends). Gradients flow to it.
        teacher_probs: (T, B, K), or (M, K) with 2-D student; same B and K. Usually without grad
            (a gradient is computed, unfused, if it requires one).
        student_temp: student temperature, > 0.
        ignore_diagonal: skip the pairs s == t (DINO with the global crops among the students).
        weights: (B,) (or (M,)) per-row weights replacing 1/B, e.g. iBOT's 1 / (masked tokens of
            the image) / (images). Differentiable.
        backend: force "triton", "cpu" or "reference"; default: fastest for the device.

    Returns:
        0-dim fp32 loss (fp64 for fp64 input on the cpu/reference backends).
    """
    n_pairs = check_soft_ce_args("student_logits", student_logits, teacher_probs, student_temp, ignore_diagonal,
                                 weights)
    batch = student_logits.shape[-2]
    chosen = select_backend("soft_cross_entropy", student_logits.device, backend, PREFERENCE)
    temp = float(student_temp)
    if chosen == "reference":
        return soft_cross_entropy_ref(student_logits, teacher_probs, temp, ignore_diagonal, weights)
    if student_logits.dim() == 2:
        student_logits, teacher_probs = student_logits[None], teacher_probs[None]
    row_loss, _, _, _ = _soft_ce_fwd(student_logits, teacher_probs, temp, ignore_diagonal, chosen)
    if weights is None:
        return row_loss.sum() / (batch * n_pairs)
    return (row_loss.sum(0) * weights.to(row_loss.dtype)).sum() / n_pairs
