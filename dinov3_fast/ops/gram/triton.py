"""Triton kernels and launchers for the Gram loss. No autograd and no input checks here.

Features arrive grouped as (G, P, D) (G = B images, or G = 1 when flattened) with any strides.
Row normalisation is never materialised: a first kernel writes one inverse norm per row
(r = 1 / max(||x||, eps)), and every later kernel applies it as a scale. Notation: Y = diag(r) X,
S = Ys Ys^T and T = Yt Yt^T (P x P per group, never stored), M = G * P * P.

Every launcher returns the loss and the input gradients at upstream gradient 1 from one pass
(see cpu.py: the autograd backward only applies the upstream gradient).

Tiled formulation (any clamping, no normalisation, or D >= P):
  _gram_tiled_kernel  one program per (row block m, col block n >= m, group): forms both Gram
                      tiles on chip over the full D, clamps, writes the tile's sum of squared
                      differences (off-diagonal tiles count twice, by symmetry), and, for each
                      side that needs a gradient, adds E Y[n] to rows m and E^T Y[m] to rows n of
                      an fp32 accumulator with atomics (plus the radial terms sum_j E_ij Own_ij).
                      Each Gram tile is formed once: a backward that re-formed the tiles of its
                      rows per feature block cost D / BLOCK_D times the forward's tile FLOPs (8x at
                      D = 1024, 32x at ViT-7B's 4096).
  then the normalisation backward, elementwise in PyTorch on the (G, P, D) accumulator.
Identity formulation (no clamping, normalised rows, wins when D < P), with Sig = Ys + Yt and Del = Ys - Yt:
  M L = (<Sig^T Sig, Del^T Del> + <Sig^T Del, Del^T Sig>) / 2, whose terms both scale with |Del|^2,
  so nothing large cancels when the student is close to the teacher (see cpu.py).
  _gram_sigdel_kernel        one of A = Sig^T Sig, B = Del^T Del, C = Sig^T Del (D x D per group);
                             Sig / Del are formed from both inputs' tiles on chip.
  _gram_identity_bwd_kernel  g = (Sig U + Del_a V) / M per row block (U, V from A, B, C, stored
                             transposed: K-contiguous for TF32 wgmma), then the normalisation
                             backward over the same rows in a second sweep; launched right after
                             the products, in the same forward. In groups with a row under
                             F.normalize's norm clamp, U and V are direct products instead
                             (`_gradient_factors`: the same kernel, gated per group on the device).
Offsets: the group index and the row indices are int64 in every kernel (`.to(tl.int64)` where
they are formed), so g * sxg, row * sxp and (g * P + row) * D cannot wrap at 2^31 elements (G * P * D
reaches 2^30 at 64 x 4096 x 4096, and strided views such as the patch tokens after the prefix
tokens carry larger group strides); offsets inside a row (column * sxd, up to D) stay int32.
Products of two input tiles run on tensor cores in the input dtype with fp32 accumulation (the
products of bf16 values are exact); E = dL/dGram is rounded to the input dtype (fp32 for fp16,
whose range it can exceed) for the E Y products; everything elementwise is fp32.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from dinov3_fast.ops._precision import dot_precision
from dinov3_fast.ops.gram import tiled_block

NORM_EPS = 1e-12  # F.normalize's default
NORM_EPS_C = tl.constexpr(NORM_EPS)


@triton.jit
def _gram_rownorm_kernel(
    x_ptr,  # (G, P, D) any float dtype, strides (sxg, sxp, sxd)
    r_ptr,  # (G * P,) fp32 out: 1 / max(||x_row||, eps)
    P, D, sxg, sxp, sxd, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    base = x_ptr + g * sxg + rows[:, None] * sxp
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base + cols[None, :] * sxd, mask=(rows[:, None] < P) & (cols[None, :] < D), other=0.0)
        x = x.to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    r = 1.0 / tl.maximum(tl.sqrt(acc), eps)
    tl.store(r_ptr + g * P + rows, r, mask=rows < P)


@triton.jit
def _gram_tile(x_ptr, r_ptr, g, rows_m, rows_n, P, D, sxg, sxp, sxd,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) tile of Y Y^T for rows rows_m x rows_n of group g, fp32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    base = x_ptr + g * sxg
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(base + rows_m[:, None] * sxp + ks[None, :] * sxd,
                    mask=(rows_m[:, None] < P) & (ks[None, :] < D), other=0.0)
        b = tl.load(base + rows_n[:, None] * sxp + ks[None, :] * sxd,
                    mask=(rows_n[:, None] < P) & (ks[None, :] < D), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    r_m = tl.load(r_ptr + g * P + rows_m, mask=rows_m < P, other=0.0)
    r_n = tl.load(r_ptr + g * P + rows_n, mask=rows_n < P, other=0.0)
    return acc * r_m[:, None] * r_n[None, :]


@triton.jit
def _gram_accumulate_side(
    e,                 # (BLOCK, BLOCK) fp32: dL/dGram tile (without 2/M) for this side, rows m x cols n
    own,               # (BLOCK, BLOCK) fp32: this side's Gram tile
    x_ptr, r_ptr,      # this side's (G, P, D) features and (G * P,) inverse row norms
    gy_ptr, rad_ptr,   # (G, P, D) and (G * P,) fp32 accumulators
    g, rows_m, rows_n, off_diagonal, P, D, sxg, sxp, sxd,
    DOT_PRECISION: tl.constexpr, WIDE_DOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """gy[m] += E Y[n] and, for an off-diagonal tile, gy[n] += E^T Y[m] (E is a tile of a symmetric
    matrix); rad[i] += sum_j E_ij own_ij over the same entries (the normalisation backward's
    radial term). The row scales r are applied to E's columns, so the feature tiles stay exact in
    their input dtype for the tensor cores. The adds are relaxed: nothing reads the accumulators
    before the kernel ends (acq_rel would fence and invalidate L1 around every add)."""
    r_m = tl.load(r_ptr + g * P + rows_m, mask=rows_m < P, other=0.0)
    r_n = tl.load(r_ptr + g * P + rows_n, mask=rows_n < P, other=0.0)
    tl.atomic_add(rad_ptr + g * P + rows_m, tl.sum(e * own, axis=1), mask=rows_m < P, sem="relaxed")
    if off_diagonal:
        tl.atomic_add(rad_ptr + g * P + rows_n, tl.sum(e * own, axis=0), mask=rows_n < P, sem="relaxed")
    e_cols = e * r_n[None, :]  # E diag(r_n): times raw rows n gives E Y[n]
    e_rows = e * r_m[:, None]  # diag(r_m) E: its transpose times raw rows m gives E^T Y[m]
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask_m = (rows_m[:, None] < P) & (cols[None, :] < D)
        mask_n = (rows_n[:, None] < P) & (cols[None, :] < D)
        x_n = tl.load(x_ptr + g * sxg + rows_n[:, None] * sxp + cols[None, :] * sxd, mask=mask_n, other=0.0)
        if WIDE_DOT:  # fp16 inputs: dL/dGram * r can exceed fp16's range, keep both operands fp32
            acc_m = tl.dot(e_cols, x_n.to(tl.float32), input_precision=DOT_PRECISION)
        else:         # bf16 (fp32's range) and fp32 inputs
            acc_m = tl.dot(e_cols.to(x_n.dtype), x_n, input_precision=DOT_PRECISION)
        tl.atomic_add(gy_ptr + (g * P + rows_m[:, None]) * D + cols[None, :], acc_m, mask=mask_m, sem="relaxed")
        if off_diagonal:
            x_m = tl.load(x_ptr + g * sxg + rows_m[:, None] * sxp + cols[None, :] * sxd, mask=mask_m, other=0.0)
            if WIDE_DOT:
                acc_n = tl.dot(tl.trans(e_rows), x_m.to(tl.float32), input_precision=DOT_PRECISION)
            else:
                acc_n = tl.dot(tl.trans(e_rows.to(x_m.dtype)), x_m, input_precision=DOT_PRECISION)
            tl.atomic_add(gy_ptr + (g * P + rows_n[:, None]) * D + cols[None, :], acc_n, mask=mask_n, sem="relaxed")


@triton.jit
def _gram_tiled_kernel(
    xs_ptr, xt_ptr,    # (G, P, D) student / teacher features, same strides
    rs_ptr, rt_ptr,    # (G * P,) fp32 inverse row norms
    partial_ptr,       # (G, n_blocks, n_blocks) fp32 out: per-tile sum of squared differences
    gys_ptr, rads_ptr,  # student accumulators (G, P, D), (G * P,) fp32, zeroed; unused without NEED_S
    gyt_ptr, radt_ptr,  # teacher accumulators, likewise
    P, D, sxg, sxp, sxd,
    CLAMP: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WIDE_DOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)  # int64 group and rows: see "Offsets" above
    n_blocks = tl.num_programs(0)
    out = partial_ptr + (g * n_blocks + pid_m) * n_blocks + pid_n
    if pid_n < pid_m:  # lower triangle: mirrored by the upper one
        tl.store(out, 0.0)
    else:
        rows_m = (pid_m * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        rows_n = (pid_n * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        off_diagonal = pid_n != pid_m
        s = _gram_tile(xs_ptr, rs_ptr, g, rows_m, rows_n, P, D, sxg, sxp, sxd, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)
        t = _gram_tile(xt_ptr, rt_ptr, g, rows_m, rows_n, P, D, sxg, sxp, sxd, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)
        if CLAMP == 1:
            s_dead = s < 0
        else:  # CLAMP == 2: zeroed where both are negative (unclamped teacher); unused without clamping
            s_dead = (s < 0) & (t < 0)
        s_c = s
        t_c = t
        if CLAMP != 0:
            s_c = tl.where(s_dead, 0.0, s)
            t_c = tl.where(t < 0, 0.0, t)  # not tl.maximum: on the GPU it would turn a NaN into 0
        diff = s_c - t_c
        total = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        tl.store(out, tl.where(off_diagonal, 2.0 * total, total))
        # E = f(S) - g(T); the student's dL/dS is E where the student is alive, the teacher's dL/dT
        # is -E where T >= 0 (clamped entries pass no gradient to their own side).
        if NEED_S:
            e_s = diff
            if CLAMP != 0:
                e_s = tl.where(s_dead, 0.0, diff)
            _gram_accumulate_side(e_s, s, xs_ptr, rs_ptr, gys_ptr, rads_ptr, g, rows_m, rows_n, off_diagonal,
                                  P, D, sxg, sxp, sxd, DOT_PRECISION, WIDE_DOT, BLOCK, BLOCK_D)
        if NEED_T:
            e_t = -diff
            if CLAMP != 0:
                e_t = tl.where(t < 0, 0.0, e_t)
            _gram_accumulate_side(e_t, t, xt_ptr, rt_ptr, gyt_ptr, radt_ptr, g, rows_m, rows_n, off_diagonal,
                                  P, D, sxg, sxp, sxd, DOT_PRECISION, WIDE_DOT, BLOCK, BLOCK_D)


@triton.jit
def _gram_sigdel_kernel(
    xs_ptr, xt_ptr,  # (G, P, D) student / teacher features, strides (sxg, sxp, sxd)
    rs_ptr, rt_ptr,  # (G * P,) fp32 inverse row norms
    c_ptr,           # (G, D, D) fp32 out: (Ys + LEFT Yt)^T (Ys + RIGHT Yt), strides (scg, scr, scc)
    gate_ptr,        # (G,) int8: with GATED, only the groups where it is nonzero are computed
    P, D, sxg, sxp, sxd, scg, scr, scc,
    LEFT: tl.constexpr, RIGHT: tl.constexpr,  # +1.0 (Sig), -1.0 (Del), 0.0 (Ys alone: LEFT only)
    GATED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(2).to(tl.int64)  # int64 group and rows: see "Offsets" above
    if GATED:
        if tl.load(gate_ptr + g) != 0:
            _gram_sigdel_block(xs_ptr, xt_ptr, rs_ptr, rt_ptr, c_ptr, g, P, D, sxg, sxp, sxd, scg, scr, scc,
                               LEFT, RIGHT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _gram_sigdel_block(xs_ptr, xt_ptr, rs_ptr, rt_ptr, c_ptr, g, P, D, sxg, sxp, sxd, scg, scr, scc,
                           LEFT, RIGHT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _gram_sigdel_block(xs_ptr, xt_ptr, rs_ptr, rt_ptr, c_ptr, g, P, D, sxg, sxp, sxd, scg, scr, scc,
                       LEFT: tl.constexpr, RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) block (program ids 0, 1) of group g's product, stored to c_ptr."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_K):
        rows = (p0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        rs = tl.load(rs_ptr + g * P + rows, mask=rows < P, other=0.0)[:, None]
        rt = tl.load(rt_ptr + g * P + rows, mask=rows < P, other=0.0)[:, None]
        base = g * sxg + rows[:, None] * sxp
        mask_m = (rows[:, None] < P) & (cols_m[None, :] < D)
        mask_n = (rows[:, None] < P) & (cols_n[None, :] < D)
        s_m = tl.load(xs_ptr + base + cols_m[None, :] * sxd, mask=mask_m, other=0.0)
        t_m = tl.load(xt_ptr + base + cols_m[None, :] * sxd, mask=mask_m, other=0.0)
        s_n = tl.load(xs_ptr + base + cols_n[None, :] * sxd, mask=mask_n, other=0.0)
        t_n = tl.load(xt_ptr + base + cols_n[None, :] * sxd, mask=mask_n, other=0.0)
        # Sig / Del in fp32, then back to the input dtype for the tensor cores: Del is rounded
        # relative to itself, not to Sig.
        a = (s_m.to(tl.float32) * rs + LEFT * (t_m.to(tl.float32) * rt)).to(s_m.dtype)
        b = (s_n.to(tl.float32) * rs + RIGHT * (t_n.to(tl.float32) * rt)).to(s_n.dtype)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    tl.store(c_ptr + g * scg + cols_m[:, None] * scr + cols_n[None, :] * scc, acc,
             mask=(cols_m[:, None] < D) & (cols_n[None, :] < D))


@triton.jit
def _gram_identity_bwd_kernel(
    xa_ptr, xb_ptr,  # (G, P, D) features of the differentiated side (a) and the other (b)
    ra_ptr, rb_ptr,  # (G * P,) fp32 inverse row norms
    ut_ptr, vt_ptr,  # (G, D, D) fp32 U^T and V^T, where dL/dYa = (Sig U + (Ya - Yb) V) / M; strides (scg, scr, scc)
    dx_ptr,          # (G, P, D) fp32 out, contiguous: first dL/dYa, then (in place, per row block) dL/dXa
    P, D, sxg, sxp, sxd, scg, scr, scc, inv_m,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)  # int64 group and rows: see "Offsets" above
    scale = inv_m
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    r_a = tl.load(ra_ptr + g * P + rows, mask=rows < P, other=0.0)
    r_b = tl.load(rb_ptr + g * P + rows, mask=rows < P, other=0.0)
    radial = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_D):
        cols = n0 + tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xmask = (rows[:, None] < P) & (ks[None, :] < D)
            cmask = (ks[:, None] < D) & (cols[None, :] < D)
            ya = tl.load(xa_ptr + g * sxg + rows[:, None] * sxp + ks[None, :] * sxd, mask=xmask,
                         other=0.0).to(tl.float32) * r_a[:, None]
            yb = tl.load(xb_ptr + g * sxg + rows[:, None] * sxp + ks[None, :] * sxd, mask=xmask,
                         other=0.0).to(tl.float32) * r_b[:, None]
            # U[k, n] = U^T[n, k]: the tiles are read K-contiguous (scc == 1), the layout a TF32
            # wgmma needs for its shared-memory operand (PTX transposes only 16-bit operands).
            u = tl.load(ut_ptr + g * scg + cols[None, :] * scr + ks[:, None] * scc, mask=cmask, other=0.0)
            acc = tl.dot(ya + yb, u, acc, input_precision=DOT_PRECISION)
            v = tl.load(vt_ptr + g * scg + cols[None, :] * scr + ks[:, None] * scc, mask=cmask, other=0.0)
            acc = tl.dot(ya - yb, v, acc, input_precision=DOT_PRECISION)
        grad_y = scale * acc
        omask = (rows[:, None] < P) & (cols[None, :] < D)
        xa_c = tl.load(xa_ptr + g * sxg + rows[:, None] * sxp + cols[None, :] * sxd, mask=omask, other=0.0)
        radial += tl.sum(grad_y * xa_c.to(tl.float32), axis=1) * r_a
        tl.store(dx_ptr + (g * P + rows[:, None]) * D + cols[None, :], grad_y, mask=omask)
    projected = tl.where(r_a * NORM_EPS_C < 1.0, radial, 0.0)
    tl.debug_barrier()  # the rows below were written by other threads of this program
    for n0 in range(0, D, BLOCK_D):
        cols = n0 + tl.arange(0, BLOCK_D)
        omask = (rows[:, None] < P) & (cols[None, :] < D)
        grad_y = tl.load(dx_ptr + (g * P + rows[:, None]) * D + cols[None, :], mask=omask, other=0.0)
        x = tl.load(xa_ptr + g * sxg + rows[:, None] * sxp + cols[None, :] * sxd, mask=omask, other=0.0)
        dx = r_a[:, None] * (grad_y - x.to(tl.float32) * r_a[:, None] * projected[:, None])
        tl.store(dx_ptr + (g * P + rows[:, None]) * D + cols[None, :], dx, mask=omask)


# ----------------------------------------------------------------------------- launchers

def _block(n: int, cap: int) -> int:
    """Power-of-two tile edge for an extent n: at least 16 (tl.dot's minimum), at most cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _as_pair(xs: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs in one kernel-supported dtype and with identical strides (the kernels take one set)."""
    dtype = xs.dtype if xs.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    xs, xt = xs.to(dtype), xt.to(dtype)
    if xs.stride() != xt.stride():
        xs, xt = xs.contiguous(), xt.contiguous()
    return xs, xt


def inverse_row_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """(G, P, D) -> (G * P,) fp32 1 / max(||x_row||, eps); all ones without normalisation."""
    G, P, D = x.shape
    if not normalize:
        return torch.ones(G * P, device=x.device, dtype=torch.float32)
    r = torch.empty(G * P, device=x.device, dtype=torch.float32)
    block_r = 16
    _gram_rownorm_kernel[(triton.cdiv(P, block_r), G)](
        x, r, P, D, *x.stride(), NORM_EPS, BLOCK_R=block_r, BLOCK_D=_block(D, 128))
    return r


def _identity_products(xs, xt, rs, rt, prec):
    """A = Sig^T Sig, B = Del^T Del, C = Sig^T Del, each (G, D, D) fp32."""
    return _products(xs, xt, rs, rt, ((1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)), None, prec)


def _products(xs, xt, rs, rt, signs, gate, prec):
    """(Ys + left Yt)^T (Ys + right Yt) for each (left, right) in signs, each (G, D, D) fp32; with a
    gate (G,) bool, only in the groups where it is set (the others are left unwritten)."""
    G, P, D = xs.shape
    bm, bk = _block(D, 64), _block(P, 32)
    nb = triton.cdiv(D, bm)
    products = torch.empty((len(signs), G, D, D), device=xs.device, dtype=torch.float32)
    gate_arg = rs if gate is None else gate.to(torch.int8)
    for out, (left, right) in zip(products, signs):
        _gram_sigdel_kernel[(nb, nb, G)](
            xs, xt, rs, rt, out, gate_arg, P, D, *xs.stride(), *out.stride(),
            LEFT=left, RIGHT=right, GATED=gate is not None, DOT_PRECISION=prec, BLOCK_M=bm, BLOCK_N=bm, BLOCK_K=bk)
    return products.unbind(0)


def _gradient_factors(xa, xb, ra, rb, ut, vt, prec):
    """The transposes of the D x D factors of side a's gradient, M dL/dYa = Sig u + (Ya - Yb) v, where
    u = 2 (Ya - Yb)^T Ya and v = 2 Sig^T Ya: ut and vt given as sums of the loss's products (the
    student's B + C and A + C^T, the teacher's B - C and A - C^T, A and B being symmetric), which
    cancel up to their rounding where side a's rows are small. That only matters where F.normalize
    clamps a row's norm (the gradient reaching x is then dL/dy / eps, 1e12 times it; in an all-zero
    image the exact gradient is 0), so the groups with a row of norm at or near eps
    (r >= 1 / (2 eps)) take ut = 2 Ya^T (Ya - Yb) and vt = 2 Ya^T Sig as direct products instead,
    which vanish with Ya; the kernel skips every other group."""
    G, P, _ = xa.shape
    gate = (ra.view(G, P) >= 0.5 / NORM_EPS).any(1)
    direct_ut, direct_vt = _products(xa, xb, ra, rb, ((0.0, -1.0), (0.0, 1.0)), gate, prec)
    gate = gate.view(G, 1, 1)
    return torch.where(gate, 2.0 * direct_ut, ut), torch.where(gate, 2.0 * direct_vt, vt)


def _identity_gradient(xa, xb, ra, rb, ut, vt, prec):
    """dL/dXa (G, P, D) fp32 at upstream gradient 1 for the identity form (normalised rows), from
    the transposes ut, vt of the D x D factors u (of Sig) and v (of Ya - Yb)."""
    G, P, D = xa.shape
    ut, vt = ut.contiguous(), vt.contiguous()  # the kernel reads both with ut's strides, K-contiguous
    dx = torch.empty((G, P, D), device=xa.device, dtype=torch.float32)
    bm = _block(P, 64)
    _gram_identity_bwd_kernel[(triton.cdiv(P, bm), G)](
        xa, xb, ra, rb, ut, vt, dx, P, D, *xa.stride(), *ut.stride(), 1.0 / (G * P * P),
        DOT_PRECISION=prec, BLOCK_M=bm, BLOCK_D=_block(D, 64), BLOCK_K=_block(D, 32), num_warps=8)
    return dx


def _normalisation_backward_(gy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, radial: torch.Tensor,
                             scale: float, normalize: bool) -> torch.Tensor:
    """In place: gy (G, P, D) fp32 = sum_j E_ij Y_j becomes dL/dX = r (g - y (y.g)) with g = scale * gy,
    y = r x and y.g = scale * radial (0 where ||x|| <= eps, as F.normalize's clamp): two
    elementwise passes, scale * r * (gy - x * (r * radial))."""
    if not normalize:
        return gy.mul_(scale)
    G, P, _ = gy.shape
    r = r.view(G, P, 1)
    projected = torch.where(r * NORM_EPS < 1.0, r * radial.view(G, P, 1), 0.0)
    return gy.addcmul_(x, projected, value=-1.0).mul_(scale * r)


def _alert_not_deterministic() -> None:
    """Honour torch.use_deterministic_algorithms like PyTorch's own atomic-add kernels do."""
    msg = ("gram_loss (triton backend, tiled form) sums its gradient with atomic adds, whose order is not "
           "deterministic; use backend='reference' where bitwise reproducibility is required")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


def gram_loss_triton(xs: torch.Tensor, xt: torch.Tensor, normalize: bool, clamp: int, identity: bool,
                     need_student: bool, need_teacher: bool):
    """Loss and its input gradients in one pass, as `gram_loss_cpu`.

    Args:
        xs, xt: (G, P, D) student / teacher features, any strides, bf16 / fp16 / fp32 (fp64 runs in fp32).
        identity: the D x D formulation (the caller guarantees clamp == CLAMP_NONE and normalize).
        need_student, need_teacher: which gradients to compute.

    Returns:
        (loss 0-dim fp32, d_student, d_teacher): gradients at upstream gradient 1, (G, P, D) fp32
        (the caller applies the upstream gradient, then casts), or empty when not needed.
        The tiled gradients are summed with fp32 atomics, so their last bits depend on the order
        in which tiles finish.
    """
    xs, xt = _as_pair(xs, xt)
    G, P, D = xs.shape
    rs, rt = inverse_row_norms(xs, normalize), inverse_row_norms(xt, normalize)
    prec = dot_precision(xs.dtype)
    n_entries = G * P * P

    def empty():  # distinct tensors: a custom op's outputs may not alias each other
        return xs.new_empty((0,), dtype=torch.float32)

    if identity:
        A, B, C = _identity_products(xs, xt, rs, rt, prec)
        total = 0.5 * (torch.linalg.vecdot(A, B).double().sum() + torch.linalg.vecdot(C, C.mT).double().sum())
        # Factors as transposes (A, B symmetric): the student's u = B + C^T and v = A + C; Del for the
        # teacher side is Yt - Ys = -Del: dL/dYt = Sig (B - C^T) + (-Del)(A - C).
        d_s = _identity_gradient(xs, xt, rs, rt, *_gradient_factors(xs, xt, rs, rt, B + C, A + C.mT, prec),
                                 prec) if need_student else empty()
        d_t = _identity_gradient(xt, xs, rt, rs, *_gradient_factors(xt, xs, rt, rs, B - C, A - C.mT, prec),
                                 prec) if need_teacher else empty()
        return (total / n_entries).float(), d_s, d_t
    if (need_student or need_teacher) and torch.are_deterministic_algorithms_enabled():
        _alert_not_deterministic()
    block = tiled_block(P, xs.dtype)
    nb = triton.cdiv(P, block)
    partial = torch.empty((G, nb, nb), device=xs.device, dtype=torch.float32)
    grads = []
    for need in (need_student, need_teacher):
        grads.append((torch.zeros((G, P, D), device=xs.device, dtype=torch.float32),
                      torch.zeros((G * P,), device=xs.device, dtype=torch.float32)) if need else (empty(), empty()))
    (gys, rads), (gyt, radt) = grads
    _gram_tiled_kernel[(nb, nb, G)](
        xs, xt, rs, rt, partial, gys, rads, gyt, radt, P, D, *xs.stride(),
        CLAMP=clamp, NEED_S=need_student, NEED_T=need_teacher, DOT_PRECISION=prec,
        WIDE_DOT=xs.dtype == torch.float16, BLOCK=block, BLOCK_K=_block(D, 32), BLOCK_D=_block(D, 64), num_warps=8)
    scale = 4.0 / n_entries  # dL/dY = 2 (dL/dS) Y, dL/dS = 2 E / M
    d_s = _normalisation_backward_(gys, xs, rs, rads, scale, normalize) if need_student else empty()
    d_t = _normalisation_backward_(gyt, xt, rt, radt, scale, normalize) if need_teacher else empty()
    return (partial.double().sum() / n_entries).float(), d_s, d_t
