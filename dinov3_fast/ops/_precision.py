"""Precision of Triton dots, shared by the kernel modules (imports torch only)."""
from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` for `tl.dot` on fp32 operands, given the op's input dtype: TF32 for
    half-precision inputs (their own rounding dominates) or when torch allows TF32 matmuls; exact
    fp32 ("ieee") otherwise, which the contract's 1e-5 for fp32 inputs needs. Independent of the
    device, so the ahead-of-time compile check records what a GPU launch uses."""
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
