"""Plain-PyTorch linear + soft-target cross-entropy: DINOv3's head last layer followed by its DINO
or iBOT loss, unfused (the logits are formed and kept for backward). The test oracle (in float64)
and the `reference` backend. Imports torch and the soft-CE reference only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinov3_fast.ops.soft_ce.reference import soft_cross_entropy_ref


def linear_soft_cross_entropy_ref(
    features: torch.Tensor,
    weight: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """soft_cross_entropy_ref(features @ weight^T, teacher_probs, ...): the logits in the
    features' dtype, as the bias-free `last_layer` Linear makes them.

    Args:
        features: (S, B, d) normalised head bottlenecks of S student crops, or (M, d) tokens.
        weight: (K, d) the head's last-layer weight, same dtype as features.
        teacher_probs, student_temp, ignore_diagonal, weights: as `soft_cross_entropy_ref`.
    """
    return soft_cross_entropy_ref(F.linear(features, weight), teacher_probs, student_temp, ignore_diagonal, weights)
