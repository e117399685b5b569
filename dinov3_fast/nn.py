"""Drop-in nn.Modules with DINOv3's constructors and forward signatures, backed by dinov3_fast.ops.

Each module is a thin wrapper: its state is DINOv3's (same parameter and buffer names), its
numbers are the op's. `backend=` (default: fastest available) is forwarded to the op.
"""
from __future__ import annotations

import torch
from torch import nn

from dinov3_fast.ops import gram_loss


class GramLoss(nn.Module):
    """DINOv3's GramLoss (dinov3/loss/gram_loss.py) on the fused op.

    forward(output_feats, target_feats, img_level=True):
        output_feats: (B, P, D) student patch features ((N, D) allowed with img_level=False)
        target_feats: same shape, Gram-teacher patch features
        returns a 0-dim fp32 loss.
    """

    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False, backend: str | None = None):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg are mutually exclusive; set at most one")
        self.apply_norm = apply_norm
        self.img_level = img_level  # kept for parity with DINOv3; forward's argument decides
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg
        self.backend = backend

    def forward(self, output_feats: torch.Tensor, target_feats: torch.Tensor, img_level: bool = True) -> torch.Tensor:
        return gram_loss(output_feats, target_feats, normalize=self.apply_norm, img_level=img_level,
                         remove_neg=self.remove_neg, remove_only_teacher_neg=self.remove_only_teacher_neg,
                         backend=self.backend)
