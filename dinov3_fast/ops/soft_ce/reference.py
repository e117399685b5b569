"""Plain-PyTorch soft-target cross-entropy with DINOv3's exact semantics.

Covers `DINOLoss.forward` (dinov3/loss/dino_clstoken_loss.py) and the loss terms of
`iBOTPatchLoss.forward` / `forward_masked` (dinov3/loss/ibot_patch_loss.py). This is the test
oracle (evaluated in float64) and the `reference` backend. Imports torch and ops._common only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinov3_fast.ops._common import autocast_disabled, compute_dtype


def soft_cross_entropy_ref(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy between teacher probabilities and softmax(student / temp).

    With P the counted crop pairs (all S x T, or those with s != t when ignore_diagonal) and
    w_b the per-sample weights (default 1/B):
        loss = 1/P sum_{(s, t) in P} sum_b w_b * ( -sum_k teacher[t, b, k] log_softmax(student[s, b] / temp)_k )
    With weights=None this is DINOLoss.forward exactly (its einsum, its zeroed diagonal, its
    divisor B*S*T - B*min(S, T)). 2-D inputs (M, K) mean S = T = 1 and B = M: the iBOT token loss,
    where weights carry 1 / (masked tokens of the image) / (images).

    Args:
        student_logits: (S, B, K) student crops, or (M, K).
        teacher_probs: (T, B, K) teacher crops, or (M, K); any nonnegative weights per row (the
            cross-entropy is linear in them).
        student_temp: student temperature.
        ignore_diagonal: skip the pairs s == t (for s < min(S, T)).
        weights: (B,) per-sample weights, or None.

    Returns:
        0-dim float32 loss (float64 for float64 inputs), also under autocast (which would run the
        einsum in its lower precision).
    """
    with autocast_disabled(student_logits.device.type):
        return _soft_cross_entropy(student_logits, teacher_probs, student_temp, ignore_diagonal, weights)


def _soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
                        ignore_diagonal: bool, weights: torch.Tensor | None) -> torch.Tensor:
    """`soft_cross_entropy_ref`'s formula (same arguments), run with autocast off."""
    dtype = compute_dtype(student_logits)
    if student_logits.dim() == 2:
        student_logits, teacher_probs = student_logits[None], teacher_probs[None]
    n_s, batch, _ = student_logits.shape
    n_t = teacher_probs.shape[0]
    log_q = F.log_softmax(student_logits.to(dtype) / student_temp, dim=-1)
    teacher = teacher_probs.to(dtype)
    if weights is not None:
        teacher = teacher * weights.to(dtype)[None, :, None]
    if not ignore_diagonal:
        loss = -torch.einsum("s b k, t b k -> ", log_q, teacher)
        pairs = n_s * n_t
    else:
        loss = -torch.einsum("s b k, t b k -> s t", log_q, teacher)
        min_st = min(n_s, n_t)
        # DINOv3 zeroes the diagonal with diagonal_scatter; torch.where is the same function and,
        # unlike diagonal_scatter, survives torch.compile's backward (torch 2.13, CPU inductor).
        diagonal = torch.eye(n_s, n_t, dtype=torch.bool, device=loss.device)
        loss = torch.where(diagonal, 0.0, loss).sum()
        pairs = n_s * n_t - min_st
    return loss / pairs if weights is not None else loss / (batch * pairs)
