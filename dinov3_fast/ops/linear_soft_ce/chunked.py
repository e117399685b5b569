"""The fused linear + soft cross-entropy, chunk by chunk of images, with the gradients formed in the
forward (the pattern of Liger-Kernel's fused linear cross-entropy).

For a chunk of images b (all S student and T teacher crops of them):
    logits  = features[:, b] @ weight^T                       (S, Bc, K), the features' dtype
    row_loss, state = soft-CE forward (the soft_ce kernels)   (S, Bc)
    loss   += sum_s,b coef[b] row_loss[s, b]
    dlogits = soft-CE backward at upstream coef               (S, Bc, K), the logits' dtype
    dfeatures[:, b] = dlogits @ weight;  dweight += dlogits^T features[:, b]   (fp32 accumulator)
so at most one chunk of logits and of their gradient exists at a time, and nothing of size K per
row outlives the call: the teacher targets can be freed as soon as the forward returns. The
matmuls are the same ones an unfused Linear + loss runs (forward, and both halves of its
backward), in the same dtypes, so the cost is theirs; `dweight` sums per-chunk products in fp32
where the unfused backward forms one product (the difference is one rounding per chunk).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from dinov3_fast.ops._common import compute_dtype

# Logits formed at once (and as many for their gradient). GPU: 2^26, 128 MiB in bf16, so that ViT-L's
# iBOT loss at batch 128 (7.5k tokens x 65,536) takes 8 chunks: each chunk costs ~10 launches of host
# time, and 60 smaller chunks would make the op host-bound. CPU: 2^22 (16 MiB in fp32), cache-sized.
CHUNK_LOGITS = {"cuda": 1 << 26, "cpu": 1 << 22}


def images_per_chunk(n_crops: int, num_classes: int, max_chunk_logits: int) -> int:
    """Images per chunk so that a chunk's logits (n_crops x images x K) stay within max_chunk_logits
    (at least one image)."""
    return max(1, max_chunk_logits // (n_crops * num_classes))


def transient_bytes(n_crops: int, batch: int, num_classes: int, dim: int, itemsize: int,
                    max_chunk_logits: int) -> int:
    """Most bytes one call holds beyond its inputs and outputs (the memory planner's figure): a
    chunk of logits and their gradient, and the fp32 weight-gradient accumulator with, for a
    half-precision weight, its cast copy."""
    chunk = min(batch, images_per_chunk(n_crops, num_classes, max_chunk_logits)) * n_crops * num_classes
    return 2 * chunk * itemsize + num_classes * dim * (4 + (itemsize if itemsize < 4 else 0))


def grad_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the op returns x's gradient in, before the upstream gradient scales it: fp32 for
    fp16 input (an fp16 gradient formed at upstream 1 would underflow before a loss scale could
    protect it), the input's own dtype otherwise (bf16 has fp32's range)."""
    return torch.float32 if x.dtype == torch.float16 else x.dtype


def linear_soft_ce_chunked(features: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor, coef: torch.Tensor,
                           student_temp: float, ignore_diagonal: bool, max_chunk_logits: int,
                           soft_ce_fwd: Callable, soft_ce_bwd_student: Callable,
                           need_features: bool, need_weight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and its gradients at upstream gradient 1.

    Args:
        features: (S, B, d) student features; weight: (K, d), same dtype; teacher: (T, B, K).
        coef: (B,) d loss / d row_loss[s, b] (the per-image weight over the counted pairs), in the
            dtype the loss accumulates in.
        soft_ce_fwd, soft_ce_bwd_student: a backend's soft-CE forward and student backward
            (`dinov3_fast.ops.soft_ce.cpu` / `.triton` signatures).
        need_features, need_weight: which gradients to form; the others are empty (0,) tensors.

    Returns:
        (loss 0-dim in coef's dtype, dL/dfeatures (S, B, d), dL/dweight (K, d)), the gradients in
        `grad_dtype` (fp16 inputs: the logits round to fp16 as the Linear's do, and their gradient
        and the two gradient products are formed in fp32).
    """
    n_s, batch, _ = features.shape
    num_classes = weight.shape[0]
    wide = grad_dtype(features) != features.dtype
    w_grad = weight.float() if wide else weight
    loss = torch.zeros((), dtype=coef.dtype, device=features.device)
    d_features = (torch.empty_like(features, dtype=grad_dtype(features)) if need_features
                  else features.new_empty((0,)))
    d_weight = (torch.zeros(weight.shape, dtype=compute_dtype(weight), device=weight.device) if need_weight
                else weight.new_empty((0,)))
    step = images_per_chunk(n_s, num_classes, max_chunk_logits)
    for b0 in range(0, batch, step):
        images = slice(b0, min(batch, b0 + step))
        x = features[:, images]
        logits = torch.matmul(x, weight.T)
        targets = teacher[:, images]
        row_loss, row_max, lse_rest, a = soft_ce_fwd(logits, targets, student_temp, ignore_diagonal)
        row_coef = coef[images].to(row_loss.dtype).expand(n_s, -1)
        loss += (row_loss * row_coef).sum()
        if not (need_features or need_weight):
            continue
        if wide:
            logits = logits.float()
        d_logits = soft_ce_bwd_student(row_coef, logits, targets, row_max, lse_rest, a, student_temp, ignore_diagonal)
        del logits
        if need_features:
            d_features[:, images] = torch.matmul(d_logits, w_grad)
        if need_weight:
            d_weight += torch.matmul(d_logits.flatten(0, 1).T, (x.float() if wide else x).flatten(0, 1))
    return loss, d_features, d_weight.to(grad_dtype(weight)) if need_weight else d_weight
