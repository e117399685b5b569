"""Triton kernels and launchers for the KoLeo loss. No autograd and no input checks here.

Notation: x (M, D) candidate rows with any strides; the queries are rows [q0, q0 + nq) (all rows
in the single-process loss, this rank's rows of its loss group in the distributed one).
nrm = max(||x||, eps) per row and y = x / nrm, rounded as F.normalize rounds it (correctly
rounded sqrt and division: x * (1 / nrm) left 14% of D = 1 rows an ulp off +-1, at distance
6e-8 instead of 1e-8 from their same-sign neighbours). The search ranks x x^T scaled by
r = 1 / nrm (a per-tile division costs registers), so rows whose normalised rows are bitwise
equal without being copies (D = 1, axis-aligned rows) may tie another way than the lowest index
(the loss is the same; at D = 1 the gradient too: zero). Rows with nrm = eps (||x|| <= eps) get
no radial gradient term, as F.normalize. For query q and neighbour slot s, j = idx[q, s],
u = y_q - y_j + 1e-8 (PairwiseDistance's eps), d = ||u||, and the loss is
-1/(nq topk) sum log(d + eps). Nothing n x n is ever written.

  _koleo_rownorm_kernel  nrm for every row (skipped when one program does the whole search).
  _koleo_fwd_kernel      one program per block of queries: sweeps all candidate tiles, forms
                         the (BLOCK_M, BLOCK_N) tile of dots on chip, scales it to cosines, sets
                         the query's own entry to -1 and folds the tile into a running top-k per
                         row (lowest index among equal dots, NaN above every number, as
                         torch.max). Epilogue: gathers each neighbour row, writes d, y_q.u,
                         y_j.u per pair and the block's share of the loss. With a single program
                         (n <= 128, DINOv3's per-GPU CLS batches) it also computes nrm itself and
                         writes the loss, so the forward is one launch.
  _koleo_bwd_kernel      one program per row i, deterministic (no atomics): the row's gradient
                         is its own pairs (as query) plus the pairs that chose it as neighbour,
                         read through a CSR inverse index built with a stable sort, all pushed
                         through the normalisation in the same sweep:
                           dx_i = sum_pairs c (u - [nrm_i > eps] y_i (y_i.u)) / nrm_i (signed),
                         with c = -grad / (nq topk (d + eps) d), using the y.u saved forward
                         (c = 0 for a row paired with itself, topk = n). The sum is kept in
                         fp64: a duplicated row gets equal and opposite terms ~1 / (n d^2) from
                         its own pair and its twin's, which must cancel without swamping the rest.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinov3_fast.ops._precision import dot_precision

PDIST_EPS = 1e-8


@triton.jit
def _koleo_rownorm_kernel(
    x_ptr,  # (M, D) any float dtype, strides (sxm, sxd)
    nrm_ptr,  # (M,) fp32 out: max(||x_row||, eps)
    r_ptr,    # (M,) fp32 out: 1 / nrm, for the search (a per-tile division costs registers)
    M, D, sxm, sxd, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxd,
                    mask=(rows[:, None] < M) & (cols[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    nrm = tl.maximum(tl.sqrt_rn(acc), eps)
    tl.store(nrm_ptr + rows, nrm, mask=rows < M)
    tl.store(r_ptr + rows, 1.0 / nrm, mask=rows < M)


@triton.jit
def _koleo_fwd_kernel(
    x_ptr,        # (M, D) features, strides (sxm, sxd); queries are rows q0 .. q0 + nq - 1
    nrm_ptr,      # (M,) fp32 row norms max(||x||, eps): read, or written here when INLINE_NORMS
    r_ptr,        # (M,) fp32 1 / nrm, read by the search unless INLINE_NORMS
    idx_ptr,      # (nq, TOPK) int64 out: neighbour indices (unordered within a row)
    stats_ptr,    # (3, nq, TOPK) fp32 out: d, y_q.u, y_j.u per pair
    partial_ptr,  # (num_programs,) fp32 out: this block's share of the loss
    M, D, q0, nq, sxm, sxd, eps, pdist_eps, inv_count,
    TOPK: tl.constexpr, KP: tl.constexpr, INLINE_NORMS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    q = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q < nq
    rows_m = q0 + q
    if INLINE_NORMS:
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows_m[:, None] * sxm + ks[None, :] * sxd,
                        mask=q_ok[:, None] & (ks[None, :] < D), other=0.0).to(tl.float32)
            ss += tl.sum(a * a, axis=1)
        r_m = 1.0 / tl.maximum(tl.sqrt_rn(ss), eps)
    else:
        r_m = tl.load(r_ptr + rows_m, mask=q_ok, other=0.0)

    slot = tl.arange(0, KP)[None, :]
    # Running top-k per row as an unordered set; padding slots (>= TOPK) hold +inf, never the worst.
    best_v = tl.where(slot < TOPK, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    best_j = tl.where(slot < TOPK, M + slot, -1) + tl.zeros((BLOCK_M, KP), dtype=tl.int32)
    for n0 in range(0, M, BLOCK_N):
        rows_n = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ss_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows_m[:, None] * sxm + ks[None, :] * sxd,
                        mask=q_ok[:, None] & (ks[None, :] < D), other=0.0)
            b = tl.load(x_ptr + rows_n[:, None] * sxm + ks[None, :] * sxd,
                        mask=(rows_n[:, None] < M) & (ks[None, :] < D), other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
            if INLINE_NORMS:
                bf = b.to(tl.float32)
                ss_n += tl.sum(bf * bf, axis=1)
        if INLINE_NORMS:
            nrm_n = tl.maximum(tl.sqrt_rn(ss_n), eps)
            tl.store(nrm_ptr + rows_n, nrm_n, mask=rows_n < M)
            r_n = 1.0 / nrm_n
        else:
            r_n = tl.load(r_ptr + rows_n, mask=rows_n < M, other=0.0)
        s = acc * r_m[:, None] * r_n[None, :]
        cols = rows_n[None, :]
        s = tl.where(cols == rows_m[:, None], -1.0, s)   # DINOv3's diagonal fill
        s = tl.where(s != s, float("inf"), s)             # NaN ranks above every number
        s = tl.where(cols < M, s, float("-inf"))
        for _ in tl.static_range(TOPK):
            m = tl.max(s, axis=1)
            j = tl.min(tl.where(s == m[:, None], cols, 2147483647), axis=1)
            worst_v = tl.min(best_v, axis=1)
            worst_j = tl.max(tl.where(best_v == worst_v[:, None], best_j, -1), axis=1)
            take = (m > float("-inf")) & ((m > worst_v) | ((m == worst_v) & (j < worst_j)))
            repl = take[:, None] & (best_v == worst_v[:, None]) & (best_j == worst_j[:, None])
            best_v = tl.where(repl, m[:, None], best_v)
            best_j = tl.where(repl, j[:, None], best_j)
            s = tl.where(cols == j[:, None], float("-inf"), s)

    if INLINE_NORMS:
        tl.debug_barrier()  # nrm of every row was stored above by other threads of this program
    nrm_q = tl.load(nrm_ptr + rows_m, mask=q_ok, other=1.0)
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in tl.static_range(TOPK):
        j = tl.sum(tl.where(slot == t, best_j, 0), axis=1)
        nrm_j = tl.load(nrm_ptr + j, mask=q_ok, other=1.0)
        d2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        a_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        b_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cs = d0 + tl.arange(0, BLOCK_D)
            mask = q_ok[:, None] & (cs[None, :] < D)
            x_q = tl.load(x_ptr + rows_m[:, None] * sxm + cs[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
            x_j = tl.load(x_ptr + j[:, None] * sxm + cs[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
            y_q = tl.div_rn(x_q, nrm_q[:, None])
            y_j = tl.div_rn(x_j, nrm_j[:, None])
            u = tl.where(mask, y_q - y_j + pdist_eps, 0.0)
            d2 += tl.sum(u * u, axis=1)
            a_dot += tl.sum(y_q * u, axis=1)
            b_dot += tl.sum(y_j * u, axis=1)
        d = tl.sqrt(d2)
        out = q * TOPK + t
        tl.store(idx_ptr + out, j.to(tl.int64), mask=q_ok)
        tl.store(stats_ptr + out, d, mask=q_ok)
        tl.store(stats_ptr + nq * TOPK + out, a_dot, mask=q_ok)
        tl.store(stats_ptr + 2 * nq * TOPK + out, b_dot, mask=q_ok)
        loss += tl.where(q_ok, tl.log(d + eps), 0.0)
    tl.store(partial_ptr + tl.program_id(0), -tl.sum(loss, axis=0) * inv_count)


@triton.jit
def _koleo_bwd_kernel(
    x_ptr,      # (M, D) features, strides (sxm, sxd)
    nrm_ptr,    # (M,) fp32 row norms max(||x||, eps)
    idx_ptr,    # (nq, TOPK) int64 neighbour of each (query, slot) pair
    stats_ptr,  # (3, nq, TOPK) fp32: d, y_q.u, y_j.u
    order_ptr,  # (nq * TOPK,) int64 pair ids sorted by neighbour index
    start_ptr,  # (M + 1,) int64 CSR offsets into order: pairs whose neighbour is row i
    grad_ptr,   # (1,) fp32 upstream gradient of the loss
    dx_ptr,     # (M, D) out, contiguous, dtype of x
    D, q0, nq, sxm, sxd, eps, pdist_eps, inv_count,
    TOPK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    nrm_i = tl.load(nrm_ptr + i)
    radial = (nrm_i > eps).to(tl.float32)  # F.normalize has no radial term where it divides by eps
    scale = -tl.load(grad_ptr) * inv_count
    q = i - q0
    is_query = (q >= 0) & (q < nq)
    p0 = tl.load(start_ptr + i)
    p1 = tl.load(start_ptr + i + 1)
    for d0 in range(0, D, BLOCK_D):
        cs = d0 + tl.arange(0, BLOCK_D)
        cmask = cs < D
        y_i = tl.div_rn(tl.load(x_ptr + i * sxm + cs * sxd, mask=cmask, other=0.0).to(tl.float32), nrm_i)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
        if is_query:
            for t in tl.static_range(TOPK):
                pair = q * TOPK + t
                j = tl.load(idx_ptr + pair)
                d = tl.load(stats_ptr + pair)
                a_dot = tl.load(stats_ptr + nq * TOPK + pair)
                c = tl.where((d == 0) | (j == i), 0.0, scale / ((d + eps) * d))
                y_j = tl.div_rn(tl.load(x_ptr + j * sxm + cs * sxd, mask=cmask, other=0.0).to(tl.float32),
                                tl.load(nrm_ptr + j))
                u = tl.where(cmask, y_i - y_j + pdist_eps, 0.0)
                acc += (c * (u - radial * a_dot * y_i)).to(tl.float64)
        for p in range(p0, p1):
            pair = tl.load(order_ptr + p)
            row = q0 + pair // TOPK
            d = tl.load(stats_ptr + pair)
            b_dot = tl.load(stats_ptr + 2 * nq * TOPK + pair)
            c = tl.where((d == 0) | (row == i), 0.0, scale / ((d + eps) * d))
            y_q = tl.div_rn(tl.load(x_ptr + row * sxm + cs * sxd, mask=cmask, other=0.0).to(tl.float32),
                            tl.load(nrm_ptr + row))
            u = tl.where(cmask, y_q - y_i + pdist_eps, 0.0)
            acc -= (c * (u - radial * b_dot * y_i)).to(tl.float64)
        tl.store(dx_ptr + i * D + cs, (acc / nrm_i).to(dx_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- launchers

def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


INT32_MAX = 2**31 - 1


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x in a kernel dtype, with every element at an int32 offset: the kernels form row * sxm in
    int32 (the contiguous rows DINOv3 passes reach 16,384 x 4096 = 2^26), so a strided view whose
    rows span 2^31 elements or more (CLS tokens x[:, 0] of a [n, N, D] batch, n N D >= 2^31) is
    copied to its n x D elements first."""
    x = x if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.float()
    if sum((n - 1) * s for n, s in zip(x.shape, x.stride())) > INT32_MAX:
        x = x.contiguous()
    return x


def koleo_fwd_triton(x: torch.Tensor, q0: int, nq: int, eps: float, topk: int):
    """Forward. x: (M, D); queries are rows [q0, q0 + nq).

    Returns:
        loss: 0-dim fp32.
        idx: (nq, topk) int64 neighbour indices into x.
        stats: (3, nq, topk) fp32: d, y_q.u and y_j.u per pair (for the backward).
        nrm: (M,) fp32 row norms clamped to eps, max(||x||, eps).
    """
    x = _kernel_input(x)
    M, D = x.shape
    block_m = _pow2(nq, 64, 128)  # >= 64: one Hopper warpgroup MMA (wgmma) even for n = 16
    n_prog = triton.cdiv(nq, block_m)
    inline = n_prog == 1
    nrm = torch.empty(M, device=x.device, dtype=torch.float32)
    r = nrm if inline else torch.empty(M, device=x.device, dtype=torch.float32)  # read only when not inline
    if not inline:
        _koleo_rownorm_kernel[(triton.cdiv(M, 16),)](x, nrm, r, M, D, *x.stride(), eps, BLOCK_R=16, BLOCK_D=_pow2(D, 16, 256))
    idx = torch.empty((nq, topk), device=x.device, dtype=torch.int64)
    stats = torch.empty((3, nq, topk), device=x.device, dtype=torch.float32)
    partial = torch.empty(n_prog, device=x.device, dtype=torch.float32)
    _koleo_fwd_kernel[(n_prog,)](
        x, nrm, r, idx, stats, partial, M, D, q0, nq, *x.stride(), eps, PDIST_EPS, 1.0 / (nq * topk),
        TOPK=topk, KP=triton.next_power_of_2(topk), INLINE_NORMS=inline, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=_pow2(D, 16, 64 if x.element_size() == 2 and not inline else 32), BLOCK_D=_pow2(D, 16, 32),
        num_warps=8 if block_m == 128 else 4, num_stages=3)  # tiles chosen for no register spills (AOT, sm_90)
    loss = partial.reshape(()) if inline else partial.sum()
    return loss, idx, stats, nrm


def koleo_bwd_triton(grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, stats: torch.Tensor, nrm: torch.Tensor,
                     q0: int, nq: int, eps: float, topk: int) -> torch.Tensor:
    """Backward. grad: 0-dim upstream gradient; the rest as returned by the forward.

    Returns:
        (M, D) contiguous gradient w.r.t. x, in x's dtype.
    """
    out_dtype = x.dtype
    x = _kernel_input(x)
    # the kernel indexes nrm, idx and stats as dense arrays: a saved-tensor hook may hand back views
    nrm, idx, stats = (t.contiguous() for t in (nrm, idx, stats))
    M, D = x.shape
    sorted_idx, order = torch.sort(idx.flatten(), stable=True)
    start = torch.searchsorted(sorted_idx, torch.arange(M + 1, device=x.device, dtype=torch.int64))
    dx = torch.empty((M, D), device=x.device, dtype=out_dtype)
    _koleo_bwd_kernel[(M,)](
        x, nrm, idx, stats, order, start, grad.reshape(1).float(), dx, D, q0, nq, *x.stride(), eps, PDIST_EPS,
        1.0 / (nq * topk), TOPK=topk, BLOCK_D=_pow2(D, 16, 1024), num_warps=4)
    return dx
