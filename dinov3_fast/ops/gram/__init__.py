"""Gram-anchoring loss: checks, backend dispatch, custom ops, autograd, and `gram_loss`.

The loss compares the patch-to-patch cosine-similarity structure of the student with that of
the Gram teacher (DINOv3 section 4): mean over all entries of (Ys Ys^T - Yt Yt^T)^2, where Y are
the L2-normalised features. No backend other than `reference` ever forms a P x P matrix per image:
  * identity formulation, O(P D^2), when nothing is clamped, rows are normalised and D < P
    (fewer FLOPs; see `uses_identity`);
  * tiled formulation, O(P^2 D) on chip / in bounded row chunks, otherwise.
Both forms are exact in real arithmetic; see cpu.py and triton.py for how each is evaluated.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from dinov3_fast.ops._common import (
    CLAMP_BOTH, CLAMP_NONE, CLAMP_TEACHER, op_context, result_dtype, save_for_backward, saved_tensors,
)
from dinov3_fast.ops._dispatch import (
    check_floating, check_no_double_backward, check_nonempty, check_rank, check_same_device, check_same_shape,
    select_backend,
)
from dinov3_fast.ops.gram.cpu import gram_loss_cpu
from dinov3_fast.ops.gram.reference import gram_loss_ref

__all__ = ["gram_loss", "gram_loss_ref", "tiled_block", "uses_identity"]

# Fastest first, per device type (see docs/architecture.md). `reference` is always the fallback.
PREFERENCE = {"cuda": ("triton",), "cpu": ("cpu", "triton")}


def uses_identity(clamp: int, num_rows: int, dim: int, normalize: bool = True) -> bool:
    """Identity form iff it is valid (no clamping), accurate (normalised rows) and cheaper.

    Cost per image, in multiply-adds: 2.33-3 P D^2 for the three D x D products (two of them
    symmetric) + 2 P D^2 for the student's gradient, against 2 P^2 D for the two Gram blocks
    (halved by symmetry on triton) + P^2 D for the gradient. Break-even lies between D = 0.7 P
    and 1.1 P; both backends use D < P so that they agree on the formulation and its rounding.
    Accuracy: the identity's gradient of one side forms 2 Del^T Ys as B + C^T (and 2 Sig^T Ys as
    A + C), terms |Yt| / |Ys| times larger than the result, so it loses that factor in relative
    precision. Unit rows bound the ratio; raw features (normalize=False) do not (a student 1000x
    smaller than its teacher: 7e-5 in fp32), so they take the tiled form, accurate at any scale."""
    return normalize and clamp == CLAMP_NONE and dim < num_rows


def tiled_block(num_rows: int, dtype: torch.dtype) -> int:
    """Tile edge of the Triton tiled kernel for P = num_rows rows of `dtype` features: a power of two
    from 16 up to 64 (32 for fp32, whose exact dots hold three fp32 tiles live and spill at 64 on
    sm_90). The kernel forms only the tiles on and above the block diagonal."""
    cap = 32 if dtype == torch.float32 else 64
    return max(16, min(cap, 1 << (num_rows - 1).bit_length()))


def _triton():
    from dinov3_fast.ops.gram import triton as gram_triton  # imported lazily: triton is optional
    return gram_triton


# ----------------------------------------------------------------------------- custom op
# Every backend computes the input gradients during the forward (cpu.py, triton.py); the
# backward only applies the upstream gradient.

def _impl(backend: str):
    return _triton().gram_loss_triton if backend == "triton" else gram_loss_cpu


@torch.library.custom_op("dinov3_fast::gram_loss", mutates_args=())
def _gram_loss_op(student: torch.Tensor, teacher: torch.Tensor, normalize: bool, clamp: int, backend: str,
                  need_student: bool, need_teacher: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    identity = uses_identity(clamp, student.shape[1], student.shape[2], normalize)
    with op_context(student):
        return _impl(backend)(student, teacher, normalize, clamp, identity, need_student, need_teacher)


def _grad_or_empty(x: torch.Tensor, needed: bool, dtype: torch.dtype) -> torch.Tensor:
    if not needed:
        return x.new_empty((0,), dtype=dtype)
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


@_gram_loss_op.register_fake
def _(student, teacher, normalize, clamp, backend, need_student, need_teacher):
    return (student.new_empty((), dtype=result_dtype(student, backend)),
            _grad_or_empty(student, need_student, result_dtype(student, backend)),
            _grad_or_empty(teacher, need_teacher, result_dtype(teacher, backend)))


def _setup_context(ctx, inputs, output):
    student, teacher, normalize, clamp, backend, _, _ = inputs
    save_for_backward(ctx, student, teacher)  # only read by a second backward (retained graph)
    ctx.options = (normalize, clamp, backend)
    # The gradient buffers are kept as attributes, not saved tensors: the first backward hands
    # them over (or scales them in place), so they must bypass saved-tensor hooks and checks.
    ctx.grads = (output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_d_student, _grad_d_teacher):
    """Apply the upstream gradient to the gradients computed in the forward.

    Eager, first backward: the buffers are consumed, scaled in place by the upstream gradient
    (a loss weight, a loss scale; read in fp32, before the cast to the input dtype) or, on the
    CPU, handed over as they are when it is exactly 1, so no second (G, P, D) buffer exists. A
    later backward through a retained graph recomputes them from the saved inputs, so every call
    returns a correct gradient that no other call shares. Traced (torch.compile, fake tensors)
    the product is out of place. Gradients of gradients (create_graph=True) are refused: nothing
    here is differentiable twice."""
    if grad_loss is None:  # grads are not materialised: the loss was not used
        return None, None, None, None, None, None, None
    check_no_double_backward("gram_loss")
    traced = torch.compiler.is_compiling() or is_fake(grad_loss)
    needed = ctx.needs_input_grad[:2]
    student, teacher = saved_tensors(ctx)
    normalize, clamp, backend = ctx.options
    grads = ctx.grads
    if grads is None:  # the first backward consumed the buffers
        identity = uses_identity(clamp, student.shape[1], student.shape[2], normalize)
        with op_context(student):
            grads = _impl(backend)(student, teacher, normalize, clamp, identity, *needed)[1:]
    elif not traced:
        ctx.grads = None
    out = []
    for name, grad, need, x in zip(("student", "teacher"), grads, needed, (student, teacher)):
        if not need:
            out.append(None)
            continue
        if grad.numel() == 0:
            raise RuntimeError(f"gram_loss: {name} requires grad but its gradient was not computed in the "
                               f"forward (need_{name}=False)")
        if traced:
            out.append((grad * grad_loss).to(x.dtype))
        elif grad.dtype != x.dtype:  # half inputs: scale and cast in one pass
            out.append(torch.mul(grad, grad_loss, out=torch.empty_like(grad, dtype=x.dtype)))
        elif grad.is_cuda or grad_loss.item() != 1.0:  # no host sync on the GPU: always scale
            out.append(grad.mul_(grad_loss))
        else:
            out.append(grad)
    return *out, None, None, None, None, None


_gram_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def gram_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    normalize: bool = True,
    img_level: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Gram-anchoring loss, the same function as DINOv3's `GramLoss` (see `gram_loss_ref`).

    Args:
        student: (B, P, D) student patch features (bf16, fp16, fp32 or fp64); with img_level=False
            also (N, D). Gradients flow to it (and to `teacher` if that requires grad).
        teacher: same shape as `student`: the Gram teacher's patch features. Of another dtype,
            both sides are promoted to a common one first (DINOv3 upcasts both to fp32).
        normalize: L2-normalise each feature row first (DINOv3's `apply_norm`).
        img_level: one P x P Gram per image; otherwise one Gram over all B*P rows.
        remove_neg: clamp negative similarities of both Grams to 0.
        remove_only_teacher_neg: zero the student's similarities where both Grams are negative,
            and clamp the teacher's negatives to 0.
        backend: force "triton", "cpu" or "reference"; default: fastest available for the device.

    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs on the cpu/reference backends).
    """
    check_floating("student", student)
    check_floating("teacher", teacher)
    if img_level:
        check_rank("student", student, 3, "(B, P, D) with img_level=True")
    else:
        check_rank("student", student, (2, 3), "(N, D) or (B, P, D)")
    check_same_shape("student", student, "teacher", teacher)
    check_same_device("student", student, "teacher", teacher)
    if student.dtype != teacher.dtype:  # DINOv3 upcasts both sides; the kernels take one dtype
        common = torch.promote_types(student.dtype, teacher.dtype)
        student, teacher = student.to(common), teacher.to(common)
    check_nonempty("student", student)
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("remove_neg and remove_only_teacher_neg are mutually exclusive; set at most one")

    chosen = select_backend("gram_loss", student.device, backend, PREFERENCE)
    if chosen == "reference":
        return gram_loss_ref(student, teacher, normalize, img_level, remove_neg, remove_only_teacher_neg)
    clamp = CLAMP_BOTH if remove_neg else CLAMP_TEACHER if remove_only_teacher_neg else CLAMP_NONE
    dim = student.shape[-1]
    if img_level:
        groups = (student, teacher)
    else:
        groups = (student.reshape(1, -1, dim), teacher.reshape(1, -1, dim))
    grad_enabled = torch.is_grad_enabled()
    return _gram_loss_op(*groups, normalize, clamp, chosen, grad_enabled and student.requires_grad,
                         grad_enabled and teacher.requires_grad)[0]
