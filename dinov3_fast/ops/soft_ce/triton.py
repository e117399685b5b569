"""Triton kernels and launchers for the soft-target cross-entropy. No autograd, no input checks.

Shapes: student (S, B, K) logits, teacher (T, B, K) probabilities, unit stride along K. For one
student row (s, b), with x = student * log2(e) / temp (log2 units, never stored):
    lse2 = log2 sum_k exp2(x_k),   CE(s, t, b) = -ln2 * (sum_k t_k x_k - lse2 * sum_k t_k)
The forward streams the student row once, with an online max m (tracked in raw logit units, so
it is exact and the backward recomputes the same scaled value), and accumulates for every
teacher crop d_t = sum_k t_k (x_k - r) and tsum_t = sum_k t_k; no log_softmax copy is made. The
shift r is the split's first-tile max and stays fixed, so d needs no rescaling when m grows
(|x - r| is bounded by the row's range, as |x - m| would be: nothing cancels badly); after the
loop d_t -= tsum_t (m - r). Tiles of -inf logits only (before any finite one, or a whole split)
are shifted by 0, not by their max: their exp terms are 0 and their d terms -inf (NaN where the
teacher is 0), as in the reference, where -inf - -inf made the row NaN. d and tsum are kept as
per-column partial sums, (T_PAD, BLOCK_K), and reduced once after the loop, and tsum is never
read inside it. Both on purpose: Triton 3.6's OptimizeThreadLocality pass rewrites a loop-carried
`acc += tl.sum(x, axis=1)` into such partials itself, but it then read tsum inside the loop (the
rescaling term tsum * (m_old - m_new)) as its initial zero (a 4.5% low loss on an H100,
2026-11-26, where the interpreter and Triton 3.9 were right), and it asserts when the reduced
result has more than one use after the loop.
Rows are split along K so that small batches still fill the GPU; programs of the same (split, b)
are adjacent, so the T teacher chunks they share are read from L2. A combine kernel merges the
splits per row. No launch fuses multiplies into adds (see the launchers).
Backward, one pass per student row, written in the student dtype: with G = dL/drow_loss (S, B),
    dL/dstudent[s, b, k] = G[s, b] / temp * (softmax_k * A[s, b] - sum_{t ~ s} teacher[t, b, k])
and A[s, b] = sum_{t ~ s} tsum[t, b] (t ~ s: the pair is counted) from the forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinov3_fast.ops._common import LN2, LOG2E
from dinov3_fast.ops._dispatch import triton_interpreting

LOG2E_C = tl.constexpr(LOG2E)  # kernels may only read constexpr globals
LN2_C = tl.constexpr(LN2)


@triton.jit
def _program_coords(S, nsplit):
    """(student crop, column split, row) of this program in a flat grid of S * nsplit * B
    programs, the crop fastest (the S crops of a row share its teacher columns in L2). One flat
    axis: CUDA caps grid axes 1 and 2 at 65535, and B is the number of iBOT tokens."""
    pid = tl.program_id(0)
    rest = pid // S
    return pid % S, rest % nsplit, rest // nsplit


@triton.jit
def _soft_ce_fwd_kernel(
    s_ptr,   # (S, B, K) student logits, strides (sss, ssb, 1)
    t_ptr,   # (T, B, K) teacher probs, strides (sts, stb, 1)
    m_ptr,   # (S, B, NSPLIT) fp32 out: max of the raw student logits over the split
    l_ptr,   # (S, B, NSPLIT) fp32 out: sum exp2(x - m)
    d_ptr,   # (S, B, NSPLIT, T_PAD) fp32 out: sum_k t_k (x_k - m)
    ts_ptr,  # (T, B, NSPLIT) fp32 out: sum_k t_k (written by the s == 0 programs)
    S, B, K, T, sss, ssb, sts, stb, scale, nsplit, cols_per_split,
    T_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    s_idx, split, b = _program_coords(S, nsplit)
    c0 = split * cols_per_split
    c1 = tl.minimum(c0 + cols_per_split, K)
    trow = tl.arange(0, T_PAD)
    tvalid = trow < T
    s_row = s_ptr + s_idx.to(tl.int64) * sss + b.to(tl.int64) * ssb
    t_rows = t_ptr + b.to(tl.int64) * stb + trow.to(tl.int64)[:, None] * sts  # (T_PAD, 1)
    m = float("-inf")  # running max, raw units
    r = 0.0            # the fixed shift of d: the first tile's max (the first above -inf), raw units
    l = 0.0
    d_acc = tl.zeros((T_PAD, BLOCK_K), tl.float32)  # per-column partial sums, reduced after the loop
    t_acc = tl.zeros((T_PAD, BLOCK_K), tl.float32)
    for k0 in range(c0, c1, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < c1
        raw = tl.load(s_row + cols, mask=cmask, other=0.0).to(tl.float32)
        t = tl.load(t_rows + cols[None, :], mask=tvalid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(tl.where(cmask, raw, float("-inf")), axis=0))
        # Shift by 0 while every logit so far is -inf (-inf - -inf would be NaN): their exp2 terms
        # are 0 and their d terms -inf (0 * -inf = NaN where t = 0), as in the reference, whatever r.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        first = m == float("-inf")  # nothing but -inf accumulated before this tile
        r = tl.where(first, m_ref, r)
        grow = tl.where(first, 0.0, m * scale - m_new * scale)
        xc = tl.where(cmask, raw * scale - m_ref * scale, float("-inf"))
        l = l * tl.exp2(grow) + tl.sum(tl.exp2(xc), axis=0)
        d_acc += t * tl.where(cmask, raw * scale - r * scale, 0.0)[None, :]
        t_acc += t
        m = m_new
    tsum = tl.sum(t_acc, axis=1)
    # d relative to the split's max m; a split of -inf logits keeps d relative to r = 0 (its
    # entries are -inf or NaN anyway) and the combine shifts it by -inf
    d = tl.sum(d_acc, axis=1) - tsum * tl.where(m == float("-inf"), 0.0, m * scale - r * scale)
    row = s_idx * B + b
    tl.store(m_ptr + row * nsplit + split, m)
    tl.store(l_ptr + row * nsplit + split, l)
    tl.store(d_ptr + (row * nsplit + split) * T_PAD + trow, d)
    if s_idx == 0:
        tl.store(ts_ptr + (trow * B + b) * nsplit + split, tsum, mask=tvalid)


@triton.jit
def _soft_ce_combine_kernel(
    m_ptr, l_ptr, d_ptr, ts_ptr,  # partials of _soft_ce_fwd_kernel
    loss_ptr,  # (S, B) fp32 out: sum over counted t of CE(s, t, b), nats
    max_ptr,   # (S, B) fp32 out: max_k student[s, b, k], raw units
    rest_ptr,  # (S, B) fp32 out: log sum_k exp((student - max) / temp), nats
    a_ptr,     # (S, B) fp32 out: sum over counted t of tsum[t, b]
    B, T, nsplit, scale,
    IGNORE_DIAGONAL: tl.constexpr, T_PAD: tl.constexpr, NS_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    s_idx = row // B
    b = row % B
    sp = tl.arange(0, NS_PAD)
    spm = sp < nsplit
    trow = tl.arange(0, T_PAD)
    tvalid = trow < T
    m = tl.load(m_ptr + row * nsplit + sp, mask=spm, other=float("-inf"))
    l = tl.load(l_ptr + row * nsplit + sp, mask=spm, other=0.0)
    m_max = tl.max(m, axis=0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    shift = tl.where(spm, m * scale - m_ref * scale, 0.0)
    log2_l = tl.log2(tl.sum(l * tl.exp2(shift), axis=0))
    d = tl.load(d_ptr + (row * nsplit + sp[None, :]) * T_PAD + trow[:, None], mask=spm[None, :], other=0.0)
    ts = tl.load(ts_ptr + (trow[:, None] * B + b) * nsplit + sp[None, :], mask=tvalid[:, None] & spm[None, :], other=0.0)
    dot = tl.sum(d + ts * shift[None, :], axis=1)   # (T_PAD,) sum_k t_k (x_k - m_max * scale)
    tsum = tl.sum(ts, axis=1)
    ce = -LN2_C * (dot - tsum * log2_l)
    counted = tvalid
    if IGNORE_DIAGONAL:
        counted = counted & (trow != s_idx)
    tl.store(loss_ptr + row, tl.sum(tl.where(counted, ce, 0.0), axis=0))
    tl.store(max_ptr + row, m_max)
    tl.store(rest_ptr + row, log2_l * LN2_C)
    tl.store(a_ptr + row, tl.sum(tl.where(counted, tsum, 0.0), axis=0))


@triton.jit
def _soft_ce_bwd_kernel(
    s_ptr,   # (S, B, K) student logits, strides (sss, ssb, 1)
    t_ptr,   # (T, B, K) teacher probs, strides (sts, stb, 1)
    max_ptr, rest_ptr, a_ptr,  # (S, B) fp32 from the forward
    g_ptr,   # (S, B) fp32 upstream gradient of row_loss
    ds_ptr,  # (S, B, K) out, contiguous, student dtype
    S, B, K, T, sss, ssb, sts, stb, scale, inv_temp, nsplit, cols_per_split,
    IGNORE_DIAGONAL: tl.constexpr, T_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    s_idx, split, b = _program_coords(S, nsplit)
    row = s_idx * B + b
    c0 = split * cols_per_split
    c1 = tl.minimum(c0 + cols_per_split, K)
    trow = tl.arange(0, T_PAD)
    counted = trow < T
    if IGNORE_DIAGONAL:
        counted = counted & (trow != s_idx)
    m2 = tl.load(max_ptr + row) * scale
    rest2 = tl.load(rest_ptr + row) * LOG2E_C
    a = tl.load(a_ptr + row)
    c = tl.load(g_ptr + row) * inv_temp
    s_row = s_ptr + s_idx.to(tl.int64) * sss + b.to(tl.int64) * ssb
    t_rows = t_ptr + b.to(tl.int64) * stb + trow.to(tl.int64)[:, None] * sts
    out_row = ds_ptr + row.to(tl.int64) * K
    for k0 in range(c0, c1, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < c1
        x = tl.load(s_row + cols, mask=cmask, other=0.0).to(tl.float32) * scale
        t = tl.load(t_rows + cols[None, :], mask=counted[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        grad = c * (tl.exp2((x - m2) - rest2) * a - tl.sum(t, axis=0))
        tl.store(out_row + cols, grad.to(ds_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- launchers
# Every launch passes enable_fp_fusion=False. The exponents are differences of products,
# x * scale - m * scale, with |x * scale| up to ~200 at DINOv3's temperatures; fused, one side
# of such a difference is exact and the other rounded, differently in the forward's tiles, its
# rescales, the combine's split shifts and the backward, so the softmax the backward rebuilds
# disagrees with the logsumexp the forward stored by up to ~1e-4 relative. Measured on an H100
# (2026-11-26): student gradient 4.7e-5 from the fp64 oracle at S=10 B=16 K=262144 (the loss
# passed); an fp32 emulation of the kernels' arithmetic gives 3.4e-5 mean / 1.0e-4 max per row
# softmax error with fusion and 5.3e-7 / 2.4e-6 without. The kernels are memory-bound, so the
# unfused multiply-adds should cost no time (not yet measured on a GPU).

def _config(device: torch.device, rows: int, K: int, T: int) -> tuple[int, int, int, int]:
    """(BLOCK_K, num_warps, nsplit, cols_per_split): split rows along K until ~4 waves of programs
    (small under the interpreter, so CPU tests exercise the splits). The forward keeps two
    (T_PAD, BLOCK_K) fp32 accumulators: BLOCK_K shrinks with T_PAD above 2 (DINOv3's T is 1 or 2)
    so that they stay in registers (90 per thread at T_PAD=2, docs/kernels.md)."""
    if triton_interpreting():
        block, warps, target = 128, 4, 4
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        block, warps, target = max(256, 4096 // max(2, triton.next_power_of_2(T))), 8, 4 * sms
    n_blocks = triton.cdiv(K, block)
    nsplit = min(n_blocks, max(1, triton.cdiv(target, rows)))
    cols = triton.cdiv(n_blocks, nsplit) * block
    return block, warps, triton.cdiv(K, cols), cols


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def soft_ce_fwd_triton(student: torch.Tensor, teacher: torch.Tensor, student_temp: float, ignore_diagonal: bool):
    """student (S, B, K), teacher (T, B, K). Returns (row_loss, row_max, lse_rest, a), each (S, B)
    fp32, as soft_ce_fwd_cpu: row_loss[s, b] = sum over counted t of CE(s, t, b) in nats,
    row_max = max_k student (raw), lse_rest = log sum_k exp((student - row_max) / temp),
    a[s, b] = sum over counted t of sum_k teacher[t, b, k]."""
    student, teacher = _unit_stride(student), _unit_stride(teacher)
    S, B, K = student.shape
    T = teacher.shape[0]
    dev = student.device
    block, warps, nsplit, cols = _config(dev, S * B, K, T)
    t_pad = triton.next_power_of_2(T)
    f32 = dict(device=dev, dtype=torch.float32)
    m, l = torch.empty((S, B, nsplit), **f32), torch.empty((S, B, nsplit), **f32)
    d, ts = torch.empty((S, B, nsplit, t_pad), **f32), torch.empty((T, B, nsplit), **f32)
    _soft_ce_fwd_kernel[(S * nsplit * B,)](
        student, teacher, m, l, d, ts, S, B, K, T, student.stride(0), student.stride(1),
        teacher.stride(0), teacher.stride(1), LOG2E / student_temp, nsplit, cols,
        T_PAD=t_pad, BLOCK_K=block, num_warps=warps, enable_fp_fusion=False)
    row_loss, row_max, lse_rest, a = (torch.empty((S, B), **f32) for _ in range(4))
    _soft_ce_combine_kernel[(S * B,)](
        m, l, d, ts, row_loss, row_max, lse_rest, a, B, T, nsplit, LOG2E / student_temp,
        IGNORE_DIAGONAL=ignore_diagonal, T_PAD=t_pad, NS_PAD=triton.next_power_of_2(nsplit), enable_fp_fusion=False)
    return row_loss, row_max, lse_rest, a


def soft_ce_bwd_student_triton(grad_row: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                               row_max: torch.Tensor, lse_rest: torch.Tensor, a: torch.Tensor, student_temp: float,
                               ignore_diagonal: bool) -> torch.Tensor:
    """d loss / d student, (S, B, K) contiguous in the student dtype. grad_row: (S, B) gradient
    of row_loss."""
    out_dtype = student.dtype
    student, teacher = _unit_stride(student), _unit_stride(teacher)
    # the forward's state is indexed as dense arrays: a saved-tensor hook may hand back views
    row_max, lse_rest, a = (t.contiguous() for t in (row_max, lse_rest, a))
    S, B, K = student.shape
    T = teacher.shape[0]
    block, warps, nsplit, cols = _config(student.device, S * B, K, T)
    ds = torch.empty((S, B, K), device=student.device, dtype=out_dtype)
    _soft_ce_bwd_kernel[(S * nsplit * B,)](
        student, teacher, row_max, lse_rest, a, grad_row.to(torch.float32).contiguous(), ds,
        S, B, K, T, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        LOG2E / student_temp, 1.0 / student_temp, nsplit, cols,
        IGNORE_DIAGONAL=ignore_diagonal, T_PAD=triton.next_power_of_2(T), BLOCK_K=block, num_warps=warps,
        enable_fp_fusion=False)
    return ds
