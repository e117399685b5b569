"""Triton kernels and launchers for RoPE attention and the standalone RoPE op. No autograd and no
input checks here. Packed layout, notation and the rotation formulas: see cpu.py.

  _rope_attn_fwd_kernel        one program per (query block, sequence, head): loads q once and k per
                               key block straight from the packed qkv by strides, rotates both in
                               fp32 registers (prefix rows pass through by a select), rounds them
                               to the input dtype as DINOv3 does, and runs an online softmax in the
                               exp2 domain with the 1/sqrt(Dh) scale folded into the exponent.
                               Writes [T, C] and lse [H, T]. PREROTATED reads q and k already
                               rotated (no tables; one full-width product for the scores).
  _rope_attn_bwd_delta_kernel  delta = rowsum(dO * O) per (token, head), fp32.
  _rope_attn_bwd_kernel        one program per (block, sequence, head): dk and dv for the block's key
                               rows (loop over query blocks), then dq for the same rows as queries
                               (loop over key blocks). Both reuse one set of rope rows, and the
                               transposed rotation is applied to dq and dk before they are written
                               into the packed gradient [T, 3C]. DKDV / DQ select either half (two
                               launches, each on its own tiles); PREROTATED reads q and k already
                               rotated, so only that final transposed rotation reads the tables.
  _rope_attn_rotate_kernel     q and k rotated once into a [T, 2C] scratch, for PREROTATED.
  _rope_kernel                 standalone rotation (or its transpose) of q and k [B, H, N, Dh].
q and k are rotated as two halves [rows, Dh/2], so rotate-half needs no register shuffles: scores
are then q1 k1^T + q2 k2^T (two tensor-core products), dq and dk are produced per half.
Variable-length: a sequence table (first token, tokens, first rope row, rope rows) drives the
programs; programs past the end of a shorter sequence exit at once.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dinov3_fast.ops._common import LN2, LOG2E
from dinov3_fast.ops._precision import dot_precision

LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
_MAX_GRID_AXIS_1 = 65535  # CUDA's limit on grid axes 1 and 2


@triton.jit
def _seq_bounds(seq_ptr, s, seq_len, rope_rows, VARLEN: tl.constexpr):
    """(first token, tokens, first rope row, prefix tokens) of sequence s."""
    if VARLEN:
        tok0 = tl.load(seq_ptr + 4 * s)
        n = tl.load(seq_ptr + 4 * s + 1)
        r0 = tl.load(seq_ptr + 4 * s + 2)
        hw = tl.load(seq_ptr + 4 * s + 3)
    else:
        tok0 = s * seq_len
        n = seq_len
        r0 = 0
        hw = rope_rows
    return tok0, n, r0, n - hw


@triton.jit
def _rope_rows(sin_ptr, cos_ptr, rows, n, prefix, stride_r, HALF: tl.constexpr, FRESH: tl.constexpr = False):
    """fp32 (c1, s1, c2, s2) [len(rows), HALF] for token rows of a sequence whose table starts at
    sin_ptr/cos_ptr (prefix rows load 0; `_rotate` passes them through). FRESH: volatile loads,
    which the compiler may not merge with an earlier load of the same rows (CSE would otherwise keep
    the first load's four fp32 tiles live in registers until this use, e.g. across a whole key loop)."""
    d = tl.arange(0, HALF)
    rr = rows - prefix
    ok = ((rows < n) & (rr >= 0))[:, None]
    t = rr[:, None] * stride_r + d[None, :]
    c1 = tl.load(cos_ptr + t, mask=ok, other=0.0, volatile=FRESH).to(tl.float32)
    s1 = tl.load(sin_ptr + t, mask=ok, other=0.0, volatile=FRESH).to(tl.float32)
    c2 = tl.load(cos_ptr + t + HALF, mask=ok, other=0.0, volatile=FRESH).to(tl.float32)
    s2 = tl.load(sin_ptr + t + HALF, mask=ok, other=0.0, volatile=FRESH).to(tl.float32)
    return c1, s1, c2, s2


@triton.jit
def _rotate(x1, x2, c1, s1, c2, s2, rows, prefix, TRANSPOSE: tl.constexpr):
    """Rotation of halves x1, x2 [len(rows), HALF] by table rows from `_rope_rows` (TRANSPOSE: its
    transpose, for gradients) on patch rows; prefix rows pass through untouched. A select, not an
    identity table row: that would turn an inf in one half into inf * 0 = NaN in the other."""
    if TRANSPOSE:  # g1 = y1 c1 + y2 s2, g2 = y2 c2 - y1 s1
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:          # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    patch = (rows >= prefix)[:, None]
    return tl.where(patch, y1, x1), tl.where(patch, y2, x2)


@triton.jit
def _load_halves(ptr, rows, n, stride_t, HALF: tl.constexpr):
    """Halves [len(rows), HALF] fp32 of one head's q or k (ptr: the sequence's first token, the
    head's first column; row offsets stay int32)."""
    d = tl.arange(0, HALF)
    p = ptr + rows[:, None] * stride_t + d[None, :]
    ok = (rows < n)[:, None]
    return tl.load(p, mask=ok, other=0.0).to(tl.float32), tl.load(p + HALF, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _load_rotated(ptr, sin_ptr, cos_ptr, rows, n, prefix, stride_t, stride_r,
                  HAS_ROPE: tl.constexpr, HALF: tl.constexpr, FRESH: tl.constexpr = False):
    """Rotated halves of q or k rows, rounded to the input dtype (FRESH: see _rope_rows)."""
    x1, x2 = _load_halves(ptr, rows, n, stride_t, HALF)
    if HAS_ROPE:
        c1, s1, c2, s2 = _rope_rows(sin_ptr, cos_ptr, rows, n, prefix, stride_r, HALF, FRESH)
        y1, y2 = _rotate(x1, x2, c1, s1, c2, s2, rows, prefix, False)
    else:
        y1 = x1
        y2 = x2
    dtype = ptr.dtype.element_ty
    return y1.to(dtype), y2.to(dtype)


@triton.jit
def _rope_attn_fwd_kernel(
    qkv_ptr,           # (T, 3 * H * DH) packed q | k | v per token, token stride stride_t, unit column stride
    qk_ptr,            # (T, >= 2 * H * DH) q | k as read: qkv itself, or (PREROTATED) rotated copies,
                       # token stride stride_qk, head h's q at column h * DH and its k at (H + h) * DH
    sin_ptr, cos_ptr,  # (R, DH) rope tables, row stride stride_r (read only when rotating here)
    seq_ptr,           # (S, 4) int32 sequence table (VARLEN only)
    out_ptr,           # (T, H * DH) out, token stride stride_o
    lse_ptr,           # (H, T) fp32 out, natural-log logsumexp per query row
    T, seq_len, rope_rows, stride_t, stride_qk, stride_r, stride_o, qk_scale, s0,
    H: tl.constexpr, DH: tl.constexpr, HAS_ROPE: tl.constexpr, PREROTATED: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    s = s0 + tl.program_id(1)  # launched in chunks of at most 65535 sequences (CUDA's axis-1 limit)
    h = tl.program_id(2)
    tok0, n, r0, prefix = _seq_bounds(seq_ptr, s, seq_len, rope_rows, VARLEN)
    if pid_m * BLOCK_M >= n:
        return
    HALF: tl.constexpr = DH // 2
    ROTATE: tl.constexpr = HAS_ROPE and not PREROTATED  # rotate q and k as they are loaded
    dtype = qkv_ptr.dtype.element_ty
    qk_base = qk_ptr + tok0.to(tl.int64) * stride_qk  # 64-bit bases per sequence, int32 offsets inside
    q_ptr = qk_base + h * DH
    k_ptr = qk_base + (H + h) * DH
    v_ptr = qkv_ptr + tok0.to(tl.int64) * stride_t + (2 * H + h) * DH
    sin_ptr += r0 * stride_r
    cos_ptr += r0 * stride_r
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DH)
    if ROTATE:  # scores as two half-width products, q1 k1^T + q2 k2^T (see the module docstring)
        q1, q2 = _load_rotated(q_ptr, sin_ptr, cos_ptr, rows, n, prefix, stride_qk, stride_r, True, HALF)
    else:       # q and k as stored: one full-width product
        q = tl.load(q_ptr + rows[:, None] * stride_qk + d[None, :], mask=(rows < n)[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DH], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        v = tl.load(v_ptr + cols[:, None] * stride_t + d[None, :], mask=(cols < n)[:, None], other=0.0)
        if ROTATE:
            k1, k2 = _load_rotated(k_ptr, sin_ptr, cos_ptr, cols, n, prefix, stride_qk, stride_r, True, HALF)
            sc = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
            sc = tl.dot(q2, tl.trans(k2), sc, input_precision=DOT_PRECISION)
        else:
            k = tl.load(k_ptr + cols[:, None] * stride_qk + d[None, :], mask=(cols < n)[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        sc = tl.where((cols < n)[None, :], sc * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        p = tl.math.exp2(sc - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(dtype), v.to(dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    out_ptr += tok0.to(tl.int64) * stride_o + h * DH
    tl.store(out_ptr + rows[:, None] * stride_o + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < n)[:, None])
    tl.store(lse_ptr + h * T + tok0 + rows, (m_i + tl.math.log2(l_i)) * LN2_C, mask=rows < n)


@triton.jit
def _rope_attn_bwd_delta_kernel(
    out_ptr,    # (T, H * DH) forward output, token stride stride_o
    dout_ptr,   # (T, H * DH) its gradient, token stride stride_do
    delta_ptr,  # (H, T) fp32 out: rowsum(dO * O) per head
    T, stride_o, stride_do,
    DH: tl.constexpr, BLOCK_T: tl.constexpr,
):
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, DH)
    ok = (t < T)[:, None]
    t64 = t.to(tl.int64)
    o = tl.load(out_ptr + t64[:, None] * stride_o + h * DH + d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + t64[:, None] * stride_do + h * DH + d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + h * T + t, tl.sum(o * do, 1), mask=t < T)


@triton.jit
def _rope_attn_bwd_kernel(
    qkv_ptr,              # (T, 3 * H * DH) forward input, token stride stride_t, unit column stride
    qk_ptr,               # (T, >= 2 * H * DH) q | k as read: qkv itself, or (PREROTATED) rotated copies,
                          # token stride stride_qk, head h's q at column h * DH and its k at (H + h) * DH
    sin_ptr, cos_ptr,     # (R, DH) rope tables, row stride stride_r
    seq_ptr,              # (S, 4) int32 sequence table (VARLEN only)
    dout_ptr,             # (T, H * DH) gradient of the output, token stride stride_do
    lse_ptr, delta_ptr,   # (H, T) fp32
    dqkv_ptr,             # (T, 3 * H * DH) out, contiguous
    T, seq_len, rope_rows, stride_t, stride_qk, stride_r, stride_do, sm_scale, s0,
    H: tl.constexpr, DH: tl.constexpr, HAS_ROPE: tl.constexpr, PREROTATED: tl.constexpr,
    VARLEN: tl.constexpr, DKDV: tl.constexpr, DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_INNER: tl.constexpr,
):
    pid = tl.program_id(0)
    s = s0 + tl.program_id(1)  # launched in chunks of at most 65535 sequences (CUDA's axis-1 limit)
    h = tl.program_id(2)
    tok0, n, r0, prefix = _seq_bounds(seq_ptr, s, seq_len, rope_rows, VARLEN)
    if pid * BLOCK >= n:
        return
    HALF: tl.constexpr = DH // 2
    ROTATE: tl.constexpr = HAS_ROPE and not PREROTATED  # rotate q and k as they are loaded
    dtype = qkv_ptr.dtype.element_ty
    qk_scale = sm_scale * LOG2E_C
    qk_base = qk_ptr + tok0.to(tl.int64) * stride_qk  # 64-bit bases per sequence, int32 offsets inside
    q_ptr = qk_base + h * DH
    k_ptr = qk_base + (H + h) * DH
    v_ptr = qkv_ptr + tok0.to(tl.int64) * stride_t + (2 * H + h) * DH
    dout_ptr += tok0.to(tl.int64) * stride_do + h * DH
    dqkv_ptr += tok0.to(tl.int64) * (3 * H * DH)
    lse_ptr += h * T + tok0
    delta_ptr += h * T + tok0
    sin_ptr += r0 * stride_r
    cos_ptr += r0 * stride_r
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, DH)
    dh = tl.arange(0, HALF)
    row_ok = rows < n
    out_dtype = dqkv_ptr.dtype.element_ty

    if DKDV:  # dk, dv for key rows `rows`
        k1, k2 = _load_rotated(k_ptr, sin_ptr, cos_ptr, rows, n, prefix, stride_qk, stride_r, ROTATE, HALF)
        v = tl.load(v_ptr + rows[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0).to(dtype)
        dk1 = tl.zeros([BLOCK, HALF], tl.float32)
        dk2 = tl.zeros([BLOCK, HALF], tl.float32)
        dv = tl.zeros([BLOCK, DH], tl.float32)
        for start in range(0, n, BLOCK_INNER):
            qr = start + tl.arange(0, BLOCK_INNER)
            q_ok = qr < n
            q1, q2 = _load_rotated(q_ptr, sin_ptr, cos_ptr, qr, n, prefix, stride_qk, stride_r, ROTATE, HALF)
            do = tl.load(dout_ptr + qr[:, None] * stride_do + d[None, :], mask=q_ok[:, None], other=0.0).to(dtype)
            lse2 = tl.load(lse_ptr + qr, mask=q_ok, other=0.0) * LOG2E_C
            dl = tl.load(delta_ptr + qr, mask=q_ok, other=0.0)
            st = tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION)
            st = tl.dot(k2, tl.trans(q2), st, input_precision=DOT_PRECISION)
            pt = tl.where(q_ok[None, :], tl.math.exp2(st * qk_scale - lse2[None, :]), 0.0)
            dv = tl.dot(pt.to(dtype), do, dv, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = (pt * (dpt - dl[None, :])).to(dtype)
            dk1 = tl.dot(dst, q1, dk1, input_precision=DOT_PRECISION)
            dk2 = tl.dot(dst, q2, dk2, input_precision=DOT_PRECISION)
        dk1 *= sm_scale
        dk2 *= sm_scale
        if HAS_ROPE:  # the tables are re-read (L1/L2, volatile so CSE cannot keep the first load live across the loop)
            c1, s1, c2, s2 = _rope_rows(sin_ptr, cos_ptr, rows, n, prefix, stride_r, HALF, True)
            dk1, dk2 = _rotate(dk1, dk2, c1, s1, c2, s2, rows, prefix, True)
        grad_p = dqkv_ptr + rows[:, None] * (3 * H * DH)
        tl.store(grad_p + (H + h) * DH + dh[None, :], dk1.to(out_dtype), mask=row_ok[:, None])
        tl.store(grad_p + (H + h) * DH + HALF + dh[None, :], dk2.to(out_dtype), mask=row_ok[:, None])
        tl.store(grad_p + (2 * H + h) * DH + d[None, :], dv.to(out_dtype), mask=row_ok[:, None])

    if DQ:  # dq for query rows `rows`
        q1, q2 = _load_rotated(q_ptr, sin_ptr, cos_ptr, rows, n, prefix, stride_qk, stride_r, ROTATE, HALF, True)
        do = tl.load(dout_ptr + rows[:, None] * stride_do + d[None, :], mask=row_ok[:, None], other=0.0).to(dtype)
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E_C
        dl = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        dq1 = tl.zeros([BLOCK, HALF], tl.float32)
        dq2 = tl.zeros([BLOCK, HALF], tl.float32)
        for start in range(0, n, BLOCK_INNER):
            kr = start + tl.arange(0, BLOCK_INNER)
            k_ok = kr < n
            kk1, kk2 = _load_rotated(k_ptr, sin_ptr, cos_ptr, kr, n, prefix, stride_qk, stride_r, ROTATE, HALF)
            vv = tl.load(v_ptr + kr[:, None] * stride_t + d[None, :], mask=k_ok[:, None], other=0.0).to(dtype)
            sc = tl.dot(q1, tl.trans(kk1), input_precision=DOT_PRECISION)
            sc = tl.dot(q2, tl.trans(kk2), sc, input_precision=DOT_PRECISION)
            p = tl.where(k_ok[None, :], tl.math.exp2(sc * qk_scale - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PRECISION)
            ds = (p * (dp - dl[:, None])).to(dtype)
            dq1 = tl.dot(ds, kk1, dq1, input_precision=DOT_PRECISION)
            dq2 = tl.dot(ds, kk2, dq2, input_precision=DOT_PRECISION)
        dq1 *= sm_scale
        dq2 *= sm_scale
        if HAS_ROPE:
            c1, s1, c2, s2 = _rope_rows(sin_ptr, cos_ptr, rows, n, prefix, stride_r, HALF, True)
            dq1, dq2 = _rotate(dq1, dq2, c1, s1, c2, s2, rows, prefix, True)
        grad_p = dqkv_ptr + rows[:, None] * (3 * H * DH)
        tl.store(grad_p + h * DH + dh[None, :], dq1.to(out_dtype), mask=row_ok[:, None])
        tl.store(grad_p + h * DH + HALF + dh[None, :], dq2.to(out_dtype), mask=row_ok[:, None])


@triton.jit
def _rope_attn_rotate_kernel(
    qkv_ptr,           # (T, 3 * H * DH) forward input, token stride stride_t, unit column stride
    sin_ptr, cos_ptr,  # (R, DH) rope tables, row stride stride_r
    seq_ptr,           # (S, 4) int32 sequence table (VARLEN only)
    qk_ptr,            # (T, 2 * H * DH) out: rotated q | k, contiguous
    seq_len, rope_rows, stride_t, stride_r, s0,
    H: tl.constexpr, DH: tl.constexpr, VARLEN: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    s = s0 + tl.program_id(1)
    h = tl.program_id(2)
    tok0, n, r0, prefix = _seq_bounds(seq_ptr, s, seq_len, rope_rows, VARLEN)
    if pid * BLOCK >= n:
        return
    HALF: tl.constexpr = DH // 2
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    dh = tl.arange(0, HALF)
    ok = (rows < n)[:, None]
    src = qkv_ptr + tok0.to(tl.int64) * stride_t
    dst = qk_ptr + tok0.to(tl.int64) * (2 * H * DH) + rows[:, None] * (2 * H * DH) + dh[None, :]
    sin_ptr += r0 * stride_r
    cos_ptr += r0 * stride_r
    for part in tl.static_range(2):  # q, then k
        col = (part * H + h) * DH
        y1, y2 = _load_rotated(src + col, sin_ptr, cos_ptr, rows, n, prefix, stride_t, stride_r, True, HALF)
        tl.store(dst + col, y1, mask=ok)
        tl.store(dst + col + HALF, y2, mask=ok)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr,      # (B, H, N, DH) inputs, strides (sqb, sqh, sqn, 1) and (skb, skh, skn, 1)
    qo_ptr, ko_ptr,    # (B, H, N, DH) outputs, contiguous
    sin_ptr, cos_ptr,  # (HW, DH) contiguous, rows for the last HW tokens
    H, N, prefix, sqb, sqh, sqn, skb, skh, skn,
    DH: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSE: tl.constexpr,
):
    bh = tl.program_id(0)  # B * H on axis 0: grid axes 1 and 2 stop at 65535 on CUDA
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = DH // 2
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HALF)
    ok = (rows < N)[:, None]
    c1, s1, c2, s2 = _rope_rows(sin_ptr, cos_ptr, rows, N, prefix, DH, HALF)
    rows64 = rows.to(tl.int64)
    out = ((b * H + h) * N + rows64)[:, None] * DH + d[None, :]
    qp = q_ptr + b.to(tl.int64) * sqb + h * sqh + rows64[:, None] * sqn + d[None, :]
    x1 = tl.load(qp, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(qp + HALF, mask=ok, other=0.0).to(tl.float32)
    y1, y2 = _rotate(x1, x2, c1, s1, c2, s2, rows, prefix, TRANSPOSE)
    tl.store(qo_ptr + out, y1.to(qo_ptr.dtype.element_ty), mask=ok)
    tl.store(qo_ptr + out + HALF, y2.to(qo_ptr.dtype.element_ty), mask=ok)
    kp = k_ptr + b.to(tl.int64) * skb + h * skh + rows64[:, None] * skn + d[None, :]
    x1 = tl.load(kp, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(kp + HALF, mask=ok, other=0.0).to(tl.float32)
    y1, y2 = _rotate(x1, x2, c1, s1, c2, s2, rows, prefix, TRANSPOSE)
    tl.store(ko_ptr + out, y1.to(ko_ptr.dtype.element_ty), mask=ok)
    tl.store(ko_ptr + out + HALF, y2.to(ko_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers

def fwd_config(max_len: int, head_dim: int, itemsize: int = 2) -> dict:
    """Forward tiles by sequence length, chosen so that no bf16/fp16 configuration spills at sm_90
    (checked with tools/aot_compile.py; the fp32 rope tables of the key block are what costs
    registers): one 64-row block covers a local crop; 64-row query blocks waste least on
    261-token crops; long sequences take 128-row query blocks over two warpgroups. fp32 tiles
    (itemsize 4) take twice the shared memory: with 3 stages they outgrew an A100's 163 KiB
    (180-214 KiB), with 2 they take 128-148 KiB. Other tiles and the pre-rotated schedule: see
    rope_attention_fwd_triton's `config` and `prerotate`, and benchmarks/attention_sweep.py."""
    if max_len <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64 if head_dim <= 64 else 32, num_warps=4, num_stages=1)
    if max_len <= 512:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3 if itemsize <= 2 else 2)
    return dict(BLOCK_M=128, BLOCK_N=64 if head_dim <= 64 else 32, num_warps=8, num_stages=3 if itemsize <= 2 else 2)


def bwd_config(max_len: int, head_dim: int) -> dict:
    """Backward tiles: BLOCK rows own dk/dv (then dq); BLOCK_INNER rows stream past them. sm_90,
    compiled as a GPU launch specialises it (tools/aot_compile.py applies the JIT's own argument
    specialisation: 16-byte aligned pointers, strides divisible by 16): 254 registers at head dim
    128 and 162 at head dim 64, no spills. Compiled without that specialisation (every load
    scalar, one 64-bit address per element) the head-dim-128 kernel reads ~750 B/thread of
    spills, which a GPU launch does not have. Other tiles and schedules: see
    rope_attention_bwd_triton's `config`, `dq_config` and `prerotate`, and
    benchmarks/attention_sweep.py, which times them."""
    return dict(BLOCK=64, BLOCK_INNER=32, num_warps=8, num_stages=2)


def _common(qkv, sin, seqinfo, num_heads, max_len):
    """Shared launch facts: (T, C, head dim, sequences, tables or dummies)."""
    T, C = qkv.shape[0], qkv.shape[1] // 3
    S = T // max_len if seqinfo is None else seqinfo.shape[0]
    rope_rows = 0 if sin is None else sin.shape[0]
    return T, C, C // num_heads, S, rope_rows


def _sequence_chunks(S: int):
    """(first sequence, sequences) of each launch: the kernels keep sequences on grid axis 1."""
    for s0 in range(0, S, _MAX_GRID_AXIS_1):
        yield s0, min(S - s0, _MAX_GRID_AXIS_1)


def rope_attention_fwd_triton(qkv, sin, cos, seqinfo, num_heads: int, max_len: int,
                              config: dict | None = None, prerotate: bool = False):
    """out [T, C] and lse [H, T] fp32; see cpu.rope_attention_fwd_cpu for the layout. The defaults
    (fwd_config's tiles, q and k rotated as they are loaded) are what the op runs; the options are
    schedules for a device sweep (benchmarks/attention_sweep.py), all computing the same numbers.

    Args:
        config: the kernel's tiles, dict(BLOCK_M, BLOCK_N, num_warps, num_stages); None: fwd_config.
        prerotate: rotate q and k once (`_rope_attn_rotate_kernel`) into a scratch [T, 2C] in
            qkv's dtype, which the kernel reads without the rope tables (each query block otherwise
            re-reads the fp32 table rows of every key block, twice the bytes of the keys and values
            themselves). Costs 2 T C elements of qkv's dtype of transient memory. No effect without rope.
    """
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    T, C, dh, S, rope_rows = _common(qkv, sin, seqinfo, num_heads, max_len)
    out = qkv.new_empty(T, C)
    lse = qkv.new_empty(num_heads, T, dtype=torch.float32)
    cfg = config or fwd_config(max_len, dh, qkv.element_size())
    sin = sin.contiguous() if sin is not None else qkv
    cos = cos.contiguous() if cos is not None else qkv
    prerotate = prerotate and rope_rows > 0
    qk = _rotated_qk(qkv, sin, cos, seqinfo, num_heads, max_len, S) if prerotate else qkv
    for s0, n_seq in _sequence_chunks(S):
        grid = (triton.cdiv(max_len, cfg["BLOCK_M"]), n_seq, num_heads)
        _rope_attn_fwd_kernel[grid](
            qkv, qk, sin, cos, seqinfo if seqinfo is not None else qkv, out, lse,
            T, max_len, rope_rows, qkv.stride(0), qk.stride(0), sin.stride(0), out.stride(0),
            LOG2E / math.sqrt(dh), s0,
            H=num_heads, DH=dh, HAS_ROPE=rope_rows > 0, PREROTATED=prerotate, VARLEN=seqinfo is not None,
            DOT_PRECISION=dot_precision(qkv.dtype), **cfg)
    return out, lse


def _rotated_qk(qkv, sin, cos, seqinfo, num_heads: int, max_len: int, S: int):
    """Rotated q | k [T, 2C] in qkv's dtype (prefix rows copied as they are), rounded as the
    attention kernels round them."""
    T, C = qkv.shape[0], qkv.shape[1] // 3
    qk = qkv.new_empty(T, 2 * C)
    block = 64
    for s0, n_seq in _sequence_chunks(S):
        _rope_attn_rotate_kernel[(triton.cdiv(max_len, block), n_seq, num_heads)](
            qkv, sin, cos, seqinfo if seqinfo is not None else qkv, qk,
            max_len, sin.shape[0], qkv.stride(0), sin.stride(0), s0,
            H=num_heads, DH=C // num_heads, VARLEN=seqinfo is not None, BLOCK=block)
    return qk


def rope_attention_bwd_triton(dout, qkv, out, lse, sin, cos, seqinfo, num_heads: int, max_len: int,
                              config: dict | None = None, dq_config: dict | None = None,
                              prerotate: bool = False):
    """dqkv [T, 3C] in qkv's dtype. The defaults (one kernel on bwd_config's tiles, rotating q and
    k as it loads them) are what the op runs; the options are schedules for a device sweep
    (benchmarks/attention_sweep.py), all computing the same numbers.

    Args:
        dout, out: [T, C]; qkv: [T, 3C]; lse: [H, T] fp32; sin, cos: [R, Dh] or None; seqinfo:
            [S, 4] int32 or None (see cpu.rope_attention_fwd_cpu).
        config: the kernel's tiles, dict(BLOCK, BLOCK_INNER, num_warps, num_stages); None: bwd_config.
        dq_config: tiles of a separate dq launch (its BLOCK query rows stream BLOCK_INNER key
            rows); the first launch then computes dk and dv alone (FlashAttention-2's layout, each
            pass on its own tiles). None: one launch computes dk/dv and then dq for its rows.
        prerotate: rotate q and k once (`_rope_attn_rotate_kernel`) into a scratch [T, 2C] in
            qkv's dtype, which the kernels read without the rope tables; only the transposed
            rotation of dq and dk (once per program, in the store epilogue) still reads them.
            Costs 2 T C elements of qkv's dtype of transient memory. No effect without rope.
    """
    qkv, dout, out = (t if t.stride(1) == 1 else t.contiguous() for t in (qkv, dout, out))
    lse = lse.contiguous()  # indexed as a dense [H, T] (a saved-tensor hook may hand back a view)
    T, C, dh, S, rope_rows = _common(qkv, sin, seqinfo, num_heads, max_len)
    delta = torch.empty(num_heads, T, dtype=torch.float32, device=qkv.device)
    block_t = 64 if dh <= 64 else 32
    _rope_attn_bwd_delta_kernel[(triton.cdiv(T, block_t), num_heads)](
        out, dout, delta, T, out.stride(0), dout.stride(0), DH=dh, BLOCK_T=block_t)
    dqkv = torch.empty(T, 3 * C, dtype=qkv.dtype, device=qkv.device)
    sin = sin.contiguous() if sin is not None else qkv
    cos = cos.contiguous() if cos is not None else qkv
    prerotate = prerotate and rope_rows > 0
    qk = _rotated_qk(qkv, sin, cos, seqinfo, num_heads, max_len, S) if prerotate else qkv
    passes = [(config or bwd_config(max_len, dh), True, dq_config is None)]
    if dq_config is not None:
        passes.append((dq_config, False, True))
    for cfg, dkdv, dq in passes:
        for s0, n_seq in _sequence_chunks(S):
            grid = (triton.cdiv(max_len, cfg["BLOCK"]), n_seq, num_heads)
            _rope_attn_bwd_kernel[grid](
                qkv, qk, sin, cos, seqinfo if seqinfo is not None else qkv, dout, lse, delta, dqkv,
                T, max_len, rope_rows, qkv.stride(0), qk.stride(0), sin.stride(0), dout.stride(0),
                1.0 / math.sqrt(dh), s0,
                H=num_heads, DH=dh, HAS_ROPE=rope_rows > 0, PREROTATED=prerotate, VARLEN=seqinfo is not None,
                DKDV=dkdv, DQ=dq, DOT_PRECISION=dot_precision(qkv.dtype), **cfg)
    return dqkv


def apply_rope_triton(q, k, sin, cos, transpose: bool):
    """Rotate (transpose=False) or apply the transposed rotation to q, k [B, H, N, Dh]; contiguous outputs."""
    if q.stride(3) != 1:
        q = q.contiguous()
    if k.stride(3) != 1:
        k = k.contiguous()
    B, H, N, dh = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_n = 64 if dh <= 64 else 32
    _rope_kernel[(B * H, triton.cdiv(N, block_n))](
        q, k, q_out, k_out, sin.contiguous(), cos.contiguous(),
        H, N, N - sin.shape[0], *q.stride()[:3], *k.stride()[:3],
        DH=dh, BLOCK_N=block_n, TRANSPOSE=transpose)
    return q_out, k_out
