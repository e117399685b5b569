"""CPU path of the soft-target cross-entropy, plus the rarely needed teacher gradient.

Shapes: student (S, B, K) logits, teacher (T, B, K) probabilities, pairs (S, T) 0/1 mask of the counted crop pairs. With x = student / temp shifted by its row max,
    CE(s, t, b) = lse[s, b] * tsum[t, b] - sum_k teacher[t, b, k] x[s, b, k]
so the S x T dot products run as one batched matmul over b; no log_softmax tensor is kept.
fp32 math (fp64 for fp64 inputs, for gradcheck).
"""
from __future__ import annotations

import torch


def _dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pair_mask(n_s: int, n_t: int, ignore_diagonal: bool, like: torch.Tensor) -> torch.Tensor:
    """(S, T) mask of the counted (student crop, teacher crop) pairs, in like's dtype/device."""
    pairs = torch.ones((n_s, n_t), dtype=like.dtype, device=like.device)
    if ignore_diagonal:
        pairs.fill_diagonal_(0)
    return pairs


def log_softmax_from_state(student: torch.Tensor, row_max: torch.Tensor, lse_rest: torch.Tensor,
                           student_temp: float) -> torch.Tensor:
    """log_softmax(student / temp) rebuilt from the forward state, rounding x and its max alike:
    (x - row_max / temp) - lse_rest, (S, B, K) in the compute dtype."""
    dtype = _dtype(student)
    x = student.to(dtype) / student_temp
    return x.sub_((row_max.to(dtype) / student_temp)[..., None]).sub_(lse_rest.to(dtype)[..., None])


def soft_ce_fwd_cpu(student: torch.Tensor, teacher: torch.Tensor, student_temp: float, ignore_diagonal: bool):
    """Returns (row_loss, row_max, lse_rest, a), each (S, B): row_loss[s, b] = sum over counted t
    of CE(s, t, b); row_max = max_k student[s, b, k] (raw units, exact); lse_rest =
    log sum_k exp((student - row_max) / temp); a[s, b] = sum over counted t of sum_k teacher[t, b, k].
    Splitting logsumexp into an exact max and a small rest keeps the backward accurate for large
    logits (a single fp32 logsumexp near 3000 carries a 1e-4 absolute error)."""
    dtype = _dtype(student)
    row_max = student.amax(-1).to(dtype)
    x = (student.to(dtype) / student_temp).sub_((row_max / student_temp)[..., None])
    t = teacher.to(x.dtype)
    lse_shifted = torch.exp(x).sum(-1).log_()                       # (S, B); x <= 0 already
    dots = torch.bmm(x.transpose(0, 1), t.permute(1, 2, 0))         # (B, S, T)
    tsum = t.sum(-1)                                                # (T, B)
    ce = lse_shifted.t()[:, :, None] * tsum.t()[:, None, :] - dots  # (B, S, T)
    pairs = pair_mask(x.shape[0], t.shape[0], ignore_diagonal, x)
    row_loss = torch.where(pairs.bool(), ce, 0.0).sum(-1).t()       # (S, B)
    return row_loss.contiguous(), row_max, lse_shifted, pairs @ tsum


def soft_ce_bwd_student_cpu(grad_row: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                            row_max: torch.Tensor, lse_rest: torch.Tensor, a: torch.Tensor,
                            student_temp: float, ignore_diagonal: bool) -> torch.Tensor:
    """d loss / d student = G[s, b] / temp (softmax(x) * a - sum_{t ~ s} teacher[t]), (S, B, K);
    grad_row: (S, B) gradient G of row_loss."""
    grad = log_softmax_from_state(student, row_max, lse_rest, student_temp).exp_()
    dtype = grad.dtype
    pairs = pair_mask(student.shape[0], teacher.shape[0], ignore_diagonal, grad)
    grad.mul_(a.to(dtype)[..., None]).sub_(torch.einsum("st,tbk->sbk", pairs, teacher.to(dtype)))
    # Contiguous, as the custom op's fake promises (a permuted student gives a permuted softmax).
    return grad.mul_((grad_row.to(dtype) / student_temp)[..., None]).to(student.dtype).contiguous()


def soft_ce_bwd_teacher(grad_row: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                        row_max: torch.Tensor, lse_rest: torch.Tensor, student_temp: float,
                        ignore_diagonal: bool) -> torch.Tensor:
    """d loss / d teacher[t, b, k] = -sum_{s ~ t} G[s, b] log_softmax(student[s, b] / temp)_k.
    DINOv3's teacher targets carry no gradient; this exists for completeness (and gradcheck)."""
    log_q = log_softmax_from_state(student, row_max, lse_rest, student_temp)
    pairs = pair_mask(student.shape[0], teacher.shape[0], ignore_diagonal, log_q)
    grad = torch.einsum("st,sb,sbk->tbk", pairs, grad_row.to(log_q.dtype), log_q).neg_()
    return grad.to(teacher.dtype).contiguous()
