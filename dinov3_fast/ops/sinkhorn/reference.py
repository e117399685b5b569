"""Plain-PyTorch Sinkhorn-Knopp teacher centering with DINOv3's exact semantics.

Transcribes `DINOLoss.sinkhorn_knopp_teacher` (dinov3/loss/dino_clstoken_loss.py) and
`SinkhornKnoppTeacher.forward` (dinov3/loss/ibot_patch_loss.py). This is the test oracle
(evaluated in float64) and the `reference` backend. Imports torch and ops._common only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dinov3_fast.ops._common import compute_dtype


def sinkhorn_knopp_ref(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: int | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """DINOv3's Sinkhorn-Knopp: Q = exp(logits / temp)^T, then alternating normalisations.

    Args:
        teacher_logits: (B, K) teacher logits of this rank (B samples, K prototypes).
        teacher_temp: teacher temperature (> 0).
        n_iterations: number of (prototype, sample) normalisation rounds.
        n_samples: the global number of samples B_total (int or 1-element tensor, already
            all-reduced by the caller, as iBOT's n_masked_patches_tensor is); default
            B * world size of `group`.
        group: process group over which the prototype sums are all-reduced; None: this process only.

    Returns:
        (B, K) float32 assignment (float64 for float64 input, so it can serve as the oracle);
        each row sums to 1. No max is subtracted, exactly as in DINOv3: fp32 overflows once
        logits / temp exceed about 88 and the result is then NaN.
    """
    dtype = compute_dtype(teacher_logits)
    q = torch.exp(teacher_logits.to(dtype) / teacher_temp).t()  # (K, B)
    world = dist.get_world_size(group) if group is not None else 1
    b_total = n_samples if n_samples is not None else q.shape[1] * world
    if isinstance(b_total, torch.Tensor):  # any 1-element shape; 0-dim broadcasts against q in place
        b_total = b_total.reshape(())
    k = q.shape[0]
    sum_q = torch.sum(q)
    if group is not None:
        dist.all_reduce(sum_q, group=group)
    q /= sum_q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(q, dim=1, keepdim=True)  # (K, 1): mass of each prototype
        if group is not None:
            dist.all_reduce(sum_of_rows, group=group)
        q /= sum_of_rows
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)  # (1, B): mass of each sample
        q /= b_total
    q *= b_total
    return q.t()
