"""CPU path of the soft-target cross-entropy, plus the rarely needed teacher gradient.

Shapes: student (S, B, K) logits, teacher (T, B, K) probabilities, pairs (S, T) 0/1 mask of the counted crop pairs. With x = student / temp shifted by its row max,
    CE(s, t, b) = lse[s, b] * tsum[t, b] - sum_k teacher[t, b, k] x[s, b, k]
so the S x T dot products run as one batched matmul over b; no log_softmax tensor is kept, and
both directions work through the rows in cache-sized chunks.
fp32 math (fp64 for fp64 inputs, for gradcheck).
"""
from __future__ import annotations

import torch

from dinov3_fast.ops._common import compute_dtype


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
    dtype = compute_dtype(student)
    x = student.to(dtype) / student_temp
    return x.sub_((row_max.to(dtype) / student_temp)[..., None]).sub_(lse_rest.to(dtype)[..., None])


_CHUNK_ELEMS = 1 << 20  # elements of one row chunk (4 MiB of fp32), or one row if that is longer


def _rows_per_chunk(row_elems: int) -> int:
    """Rows of row_elems elements in one chunk of about _CHUNK_ELEMS (at least one row). On the
    CPU every pass over a (S, B, K) tensor costs a trip to DRAM (and a fresh tensor its page
    faults), so the passes over one chunk of rows run back to back on data that mostly stays in
    cache instead."""
    return max(1, _CHUNK_ELEMS // row_elems)


def _scaled_into(out: torch.Tensor, x: torch.Tensor, student_temp: float) -> torch.Tensor:
    """out = x / temp in out's (compute) dtype. torch.div(..., out=) would divide in x's dtype
    first: fp16 7000 / 0.1 is inf."""
    if x.dtype == out.dtype:
        return torch.div(x, student_temp, out=out)
    return out.copy_(x).div_(student_temp)


def _row_chunks(n_rows: int, row_elems: int):
    step = _rows_per_chunk(row_elems)
    for r0 in range(0, n_rows, step):
        yield slice(r0, min(n_rows, r0 + step))


def soft_ce_fwd_cpu(student: torch.Tensor, teacher: torch.Tensor, student_temp: float, ignore_diagonal: bool):
    """Returns (row_loss, row_max, lse_rest, a), each (S, B): row_loss[s, b] = sum over counted t
    of CE(s, t, b); row_max = max_k student[s, b, k] (raw units, exact); lse_rest =
    log sum_k exp((student - row_max) / temp); a[s, b] = sum over counted t of sum_k teacher[t, b, k].
    Splitting logsumexp into an exact max and a small rest keeps the backward accurate for large
    logits (a single fp32 logsumexp near 3000 carries a 1e-4 absolute error).

    Per chunk of B rows (all S crops): x = student / temp - row_max / temp (<= 0, fp32) into scratch,
    its dots with the T teacher rows (one batched matmul over b), then exp and the row sums in
    place: the student is read twice (max, chunk) and no (S, B, K) tensor is allocated."""
    dtype = compute_dtype(student)
    n_s, batch, k = student.shape
    row_max = student.amax(-1).to(dtype)                            # (S, B)
    shift = row_max / student_temp
    t = teacher.to(dtype)
    t_kt = t.permute(1, 2, 0)                                        # (B, K, T) view
    lse_shifted = torch.empty((n_s, batch), dtype=dtype)
    dots = torch.empty((batch, n_s, t.shape[0]), dtype=dtype)      # (B, S, T)
    scratch = torch.empty(n_s * min(batch, _rows_per_chunk(n_s * k)) * k, dtype=dtype)
    for rows in _row_chunks(batch, n_s * k):
        nb = rows.stop - rows.start
        x = scratch[: n_s * nb * k].view(n_s, nb, k)
        _scaled_into(x, student[:, rows], student_temp).sub_(shift[:, rows, None])
        torch.bmm(x.transpose(0, 1), t_kt[rows], out=dots[rows])
        torch.sum(x.exp_(), dim=-1, out=lse_shifted[:, rows])
    lse_shifted.log_()
    tsum = t.sum(-1)                                                # (T, B)
    ce = lse_shifted.t()[:, :, None] * tsum.t()[:, None, :] - dots  # (B, S, T)
    pairs = pair_mask(n_s, t.shape[0], ignore_diagonal, dots)
    row_loss = torch.where(pairs.bool(), ce, 0.0).sum(-1).t()       # (S, B)
    return row_loss.contiguous(), row_max, lse_shifted, pairs @ tsum


def soft_ce_bwd_student_cpu(grad_row: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                            row_max: torch.Tensor, lse_rest: torch.Tensor, a: torch.Tensor,
                            student_temp: float, ignore_diagonal: bool) -> torch.Tensor:
    """d loss / d student = G[s, b] / temp (softmax(x) * a - sum_{t ~ s} teacher[t]), (S, B, K);
    grad_row: (S, B) gradient G of row_loss. Written chunk by chunk of rows, in place in the
    result (the softmax rebuilt as log_softmax_from_state does, rounding alike)."""
    dtype = compute_dtype(student)
    n_s, batch, k = student.shape
    n_t = teacher.shape[0]
    t = teacher.to(dtype)
    t_all = t.sum(0)                                                # (B, K): every teacher crop
    shift = row_max.to(dtype) / student_temp
    rest = lse_rest.to(dtype)
    scale = grad_row.to(dtype)[..., None] / student_temp            # (S, B, 1)
    softmax_scale = a.to(dtype)[..., None] * scale
    grad = torch.empty((n_s, batch, k), dtype=dtype)
    for s in range(n_s):
        for rows in _row_chunks(batch, k):
            g = grad[s, rows]
            _scaled_into(g, student[s, rows], student_temp).sub_(shift[s, rows, None]).sub_(rest[s, rows, None])
            g.exp_().mul_(softmax_scale[s, rows]).addcmul_(t_all[rows], scale[s, rows], value=-1.0)
            if ignore_diagonal and s < n_t:  # the pair (s, s) is not counted
                g.addcmul_(t[s, rows], scale[s, rows])
    return grad.to(student.dtype)


def soft_ce_bwd_teacher(grad_row: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                        row_max: torch.Tensor, lse_rest: torch.Tensor, student_temp: float,
                        ignore_diagonal: bool) -> torch.Tensor:
    """d loss / d teacher[t, b, k] = -sum_{s ~ t} G[s, b] log_softmax(student[s, b] / temp)_k.
    DINOv3's teacher targets carry no gradient; this exists for completeness (and gradcheck)."""
    log_q = log_softmax_from_state(student, row_max, lse_rest, student_temp)
    pairs = pair_mask(student.shape[0], teacher.shape[0], ignore_diagonal, log_q)
    grad = torch.einsum("st,sb,sbk->tbk", pairs, grad_row.to(log_q.dtype), log_q).neg_()
    return grad.to(teacher.dtype).contiguous()
