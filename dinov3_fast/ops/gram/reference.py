"""Plain-PyTorch Gram-anchoring loss with DINOv3's exact semantics (dinov3/loss/gram_loss.py).

This is the test oracle (evaluated in float64) and the `reference` backend. Imports torch and
ops._common only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinov3_fast.ops._common import compute_dtype


def gram_loss_ref(
    student: torch.Tensor,
    teacher: torch.Tensor,
    normalize: bool = True,
    img_level: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
) -> torch.Tensor:
    """MSE between the Gram matrices of student and teacher features.

    Args:
        student: (B, P, D) patch features, or (N, D) with img_level=False.
        teacher: same shape as `student`.
        normalize: L2-normalise rows (F.normalize, eps 1e-12) before the Gram products.
        img_level: one P x P Gram per image; otherwise (B, P, D) is flattened to (B*P, D) first
            and one (B*P) x (B*P) Gram is formed.
        remove_neg: clamp negative similarities to 0 in both Grams.
        remove_only_teacher_neg: zero the student's similarities where both the student's and
            the teacher's are negative, then clamp the teacher's negatives to 0 (DINOv3's order:
            the student mask uses the unclamped teacher).

    Returns:
        0-dim float32 tensor (float64 for float64 inputs): mean over all Gram entries of
        (G_student - G_teacher)^2.
    """
    # DINOv3 upcasts to fp32; keep float64 when the oracle asks for it.
    dtype = compute_dtype(student)
    s = student.to(dtype)
    t = teacher.to(dtype)
    if normalize:
        s = F.normalize(s, dim=-1)
        t = F.normalize(t, dim=-1)
    if not img_level and s.dim() == 3:
        s = s.flatten(0, 1)
        t = t.flatten(0, 1)
    s_sim = s @ s.transpose(-1, -2)
    t_sim = t @ t.transpose(-1, -2)
    if remove_neg:
        s_sim = torch.where(s_sim < 0, 0.0, s_sim)
        t_sim = torch.where(t_sim < 0, 0.0, t_sim)
    elif remove_only_teacher_neg:
        s_sim = torch.where((s_sim < 0) & (t_sim < 0), 0.0, s_sim)
        t_sim = torch.where(t_sim < 0, 0.0, t_sim)
    return F.mse_loss(s_sim, t_sim)
