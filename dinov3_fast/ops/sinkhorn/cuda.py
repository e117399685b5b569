"""Launcher of the persistent CUDA Sinkhorn-Knopp kernel (kernels/sinkhorn.cu) through `_C`.

One cooperative launch runs every round with grid-wide barriers, so the (B, K) input stays in
L2 when it fits (the DINO teacher, 32 x 262,144). Single process only: a process group needs
all-reduces between passes, which the multi-launch triton backend does.
"""
from __future__ import annotations

import torch

from dinov3_fast._ext import native
from dinov3_fast.ops._common import LOG2E

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def sinkhorn_cuda(logits: torch.Tensor, teacher_temp: float, n_iterations: int, group=None) -> torch.Tensor:
    """logits: (B, K) fp32/bf16/fp16 CUDA tensor. Returns the (B, K) fp32 assignment."""
    if group is not None:
        raise ValueError("backend='cuda' has no all-reduce between its passes; use backend='triton' with a process group")
    if logits.dtype not in _DTYPE_CODES:
        raise TypeError(f"backend='cuda' needs float32, bfloat16 or float16 teacher_logits, got {logits.dtype}")
    B, K = logits.shape
    if B == 0:  # nothing to normalise; the kernel's plan divides by B
        return torch.empty((0, K), dtype=torch.float32, device=logits.device)
    mod = native()
    if B > mod.sinkhorn_max_batch():
        raise ValueError(f"backend='cuda' supports B <= {mod.sinkhorn_max_batch()}, got B={B}; use backend='triton'")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    code, device = _DTYPE_CODES[logits.dtype], logits.device.index
    workspace = torch.empty(mod.sinkhorn_workspace_bytes(B, K, code, device), dtype=torch.uint8, device=logits.device)
    out = torch.empty((B, K), dtype=torch.float32, device=logits.device)
    mod.sinkhorn_knopp_cuda(logits.data_ptr(), code, out.data_ptr(), workspace.data_ptr(), workspace.numel(), B, K,
                            logits.stride(0), LOG2E / teacher_temp, n_iterations, device,
                            torch.cuda.current_stream(logits.device).cuda_stream)
    return out
