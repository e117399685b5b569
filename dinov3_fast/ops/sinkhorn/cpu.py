"""CPU path of Sinkhorn-Knopp: the log-domain formulation of triton.py in PyTorch.

Same potentials (natural-log domain here): Q = exp(y_bk + a_k + beta_b) with y = logits / temp,
a_k = -logsumexp_b(y_bk + beta_b) (all-reduced over `group`), beta_b = -logsumexp_k(y_bk + a_k).
DINOv3's constants (1/sum Q, 1/K, 1/B_total and the final *B_total) cancel exactly and are not
applied. One (B, K) scratch buffer is reused for every pass. fp32 math (fp64 for fp64 input).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

NEG_INF = float("-inf")


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def sinkhorn_cpu(logits: torch.Tensor, teacher_temp: float, n_iterations: int, group=None) -> torch.Tensor:
    """logits: (B, K). Returns the (B, K) assignment, fp32 (fp64 for fp64 input)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    y = logits.to(dtype) / teacher_temp
    buf = torch.empty_like(y)
    beta = y.new_zeros((y.shape[0], 1))
    a = None
    for _ in range(n_iterations):
        if a is None:  # first prototype step: shift by the global per-prototype max
            shift = _all_reduce(y.amax(0), dist.ReduceOp.MAX, group)
            ref = torch.where(shift == NEG_INF, 0.0, shift)
            total = _all_reduce(torch.sub(y, ref, out=buf).exp_().sum(0), dist.ReduceOp.SUM, group)
            a = -(shift + torch.log(total))
        else:  # shift by the previous potential: each term is an entry of a row-stochastic matrix
            torch.add(y, beta, out=buf).add_(a).exp_()
            total = _all_reduce(buf.sum(0), dist.ReduceOp.SUM, group)
            a = a - torch.log(total)
        beta = -torch.logsumexp(torch.add(y, a, out=buf), dim=1, keepdim=True)
    return torch.add(y, a, out=buf).add_(beta).exp_()
