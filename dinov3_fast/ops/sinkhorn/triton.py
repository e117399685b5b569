"""Triton kernels and launcher for Sinkhorn-Knopp. No autograd and no input checks here.

Log-domain formulation. With y = logits * log2(e) / temp (never stored), the output is
Q = exp2(y_bk + a_k + beta_b), where a (K,) and beta (B,) are log2-domain potentials:
  prototype step  a_k    = -log2 sum_b exp2(y_bk + beta_b)   (sum over the global batch)
  sample step     beta_b = -log2 sum_k exp2(y_bk + a_k)
DINOv3's constants (1/sum Q, 1/K, 1/B_total, the final *B_total) cancel exactly, because every
normalisation is invariant to a global scale of Q, so they are not applied. Each sum is taken
relative to a shift so that nothing overflows or underflows unless the true value does:
  * first prototype step: the per-prototype max over the batch (online, per lane);
  * later prototype steps: the previous a_k. The terms are then entries of a matrix whose rows
    sum to 1, so each is <= 1 and each prototype's sum lies in [1/K, B];
  * sample steps: the running max over the row (online, per tile).
Kernels (each reads the (B, K) input once):
  _sinkhorn_proto_kernel   one program per (prototype block, batch split): shifted column sums
  _sinkhorn_sample_kernel  one program per (sample, K split): shifted row sum (online max)
  _sinkhorn_write_kernel   Q = exp2(y + a + beta), fp32
When a step has a single split (and no process group), the kernel writes the potential itself;
otherwise it writes per-split partials that `_combine_*` reduce (and all-reduce across ranks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from dinov3_fast.ops._common import LOG2E
from dinov3_fast.ops._dispatch import triton_interpreting

NEG_INF = float("-inf")


@triton.jit
def _sinkhorn_proto_kernel(
    x_ptr,     # (B, K) logits, any float dtype, row stride sxb, unit column stride
    beta_ptr,  # (B,) fp32 sample potentials; unused when FIRST
    a_ptr,     # (K,) fp32 prototype potentials: the shift when not FIRST; overwritten when FINALIZE
    m_ptr,     # (BSPLIT, K) fp32 out: shift of each partial sum (unless FINALIZE)
    s_ptr,     # (BSPLIT, K) fp32 out: sum_b exp2(y + beta - shift) over the split (unless FINALIZE)
    B, K, sxb, scale, rows_per_split,
    FIRST: tl.constexpr, FINALIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    r0 = split * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, B)
    row_ptr = x_ptr + r0.to(tl.int64) * sxb
    if FIRST:
        m = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_K,), tl.float32)
        for r in range(r0, r1):
            y = tl.load(row_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * scale
            row_ptr += sxb
            m_new = tl.maximum(m, y)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: sum stays 0
            s = s * tl.exp2(m - m_ref) + tl.exp2(y - m_ref)
            m = m_new
    else:
        a = tl.load(a_ptr + cols, mask=cmask, other=0.0)
        m = -a
        s = tl.zeros((BLOCK_K,), tl.float32)
        for r in range(r0, r1):
            y = tl.load(row_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * scale
            row_ptr += sxb
            s += tl.exp2(y + tl.load(beta_ptr + r) + a)
    if FINALIZE:
        tl.store(a_ptr + cols, -(m + tl.log2(s)), mask=cmask)
    else:
        tl.store(m_ptr + split * K + cols, m, mask=cmask)
        tl.store(s_ptr + split * K + cols, s, mask=cmask)


@triton.jit
def _sinkhorn_sample_kernel(
    x_ptr,     # (B, K) logits, row stride sxb
    a_ptr,     # (K,) fp32 prototype potentials
    m_ptr,     # (B, NSPLIT) fp32 out: running max of each partial (unless FINALIZE)
    s_ptr,     # (B, NSPLIT) fp32 out: sum_k exp2(y + a - max) over the split (unless FINALIZE)
    beta_ptr,  # (B,) fp32 out when FINALIZE: -(max + log2 sum)
    K, sxb, scale, cols_per_split,
    FINALIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)  # rows on axis 0: grid axes 1 and 2 stop at 65535 on CUDA
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    c0 = split * cols_per_split
    c1 = tl.minimum(c0 + cols_per_split, K)
    m = float("-inf")
    s = 0.0
    for k0 in range(c0, c1, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < c1
        y = tl.load(x_ptr + row.to(tl.int64) * sxb + cols, mask=cmask, other=0.0).to(tl.float32) * scale
        v = tl.where(cmask, y + tl.load(a_ptr + cols, mask=cmask, other=0.0), float("-inf"))
        m_new = tl.maximum(m, tl.max(v, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_ref) + tl.sum(tl.exp2(v - m_ref), axis=0)
        m = m_new
    if FINALIZE:
        tl.store(beta_ptr + row, -(m + tl.log2(s)))
    else:
        tl.store(m_ptr + row * nsplit + split, m)
        tl.store(s_ptr + row * nsplit + split, s)


@triton.jit
def _sinkhorn_write_kernel(
    x_ptr,     # (B, K) logits, row stride sxb
    a_ptr,     # (K,) fp32 prototype potentials
    beta_ptr,  # (B,) fp32 sample potentials
    out_ptr,   # (B, K) fp32 out, contiguous
    K, sxb, scale,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)  # rows on axis 0: grid axes 1 and 2 stop at 65535 on CUDA
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    y = tl.load(x_ptr + row.to(tl.int64) * sxb + cols, mask=cmask, other=0.0).to(tl.float32) * scale
    a = tl.load(a_ptr + cols, mask=cmask, other=0.0)
    q = tl.exp2(y + a + tl.load(beta_ptr + row))
    tl.store(out_ptr + row.to(tl.int64) * K + cols, q, mask=cmask)


# ----------------------------------------------------------------------------- launcher

def _target_programs(device: torch.device) -> int:
    """Programs per pass that keep every SM busy (a few waves); small under the interpreter so
    that CPU tests exercise the split paths."""
    if triton_interpreting():
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return 4 * sms


def _block_k() -> int:
    return 128 if triton_interpreting() else 1024


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _combine_proto(m: torch.Tensor, s: torch.Tensor, a_prev: torch.Tensor | None, group) -> torch.Tensor:
    """(BSPLIT, K) partials -> global a (K,). First step: shifts differ, rescale to their max."""
    if a_prev is None:
        shift = _all_reduce(m.amax(0), dist.ReduceOp.MAX, group)
        ref = torch.where(shift == NEG_INF, 0.0, shift)
        total = _all_reduce((s * torch.exp2(m - ref)).sum(0), dist.ReduceOp.SUM, group)
        return -(shift + torch.log2(total))
    total = _all_reduce(s.sum(0), dist.ReduceOp.SUM, group)
    return a_prev - torch.log2(total)


def _combine_sample(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(B, NSPLIT) partials -> beta (B,)."""
    shift = m.amax(1, keepdim=True)
    ref = torch.where(shift == NEG_INF, 0.0, shift)
    return -(shift + torch.log2((s * torch.exp2(m - ref)).sum(1, keepdim=True))).squeeze(1)


def sinkhorn_triton(logits: torch.Tensor, teacher_temp: float, n_iterations: int, group=None) -> torch.Tensor:
    """logits: (B, K) any float dtype (unit stride along K). Returns the (B, K) fp32 assignment.
    With `group`, prototype sums are all-reduced between passes (eager, between launches)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    B, K = logits.shape
    dev = logits.device
    f32 = dict(device=dev, dtype=torch.float32)
    if B == 0:  # no sample on this rank (reached with a group only): join each round's all-reduces
        # with neutral partials, shift -inf and sum 0, so the other ranks reduce their own terms
        m, s = torch.full((1, K), NEG_INF, **f32), torch.zeros((1, K), **f32)
        a = None
        for _ in range(n_iterations):
            a = _combine_proto(m, s, a, group)
        return torch.empty((0, K), **f32)
    scale = LOG2E / teacher_temp
    block = _block_k()
    n_kblocks = triton.cdiv(K, block)
    target = _target_programs(dev)
    bsplit = min(B, max(1, triton.cdiv(target, n_kblocks)))
    rows_per_split = triton.cdiv(B, bsplit)
    bsplit = triton.cdiv(B, rows_per_split)
    nsplit = min(n_kblocks, max(1, triton.cdiv(target, B)))
    cols_per_split = triton.cdiv(n_kblocks, nsplit) * block
    nsplit = triton.cdiv(K, cols_per_split)
    proto_final = bsplit == 1 and group is None
    sample_final = nsplit == 1

    a = torch.empty(K, **f32)
    beta = torch.zeros(B, **f32)
    empty = torch.empty((0,), **f32)
    pm, ps = (empty, empty) if proto_final else (torch.empty((bsplit, K), **f32), torch.empty((bsplit, K), **f32))
    sm, ss = (empty, empty) if sample_final else (torch.empty((B, nsplit), **f32), torch.empty((B, nsplit), **f32))
    for it in range(n_iterations):
        first = it == 0
        _sinkhorn_proto_kernel[(n_kblocks, bsplit)](
            logits, beta, a, pm, ps, B, K, logits.stride(0), scale, rows_per_split,
            FIRST=first, FINALIZE=proto_final, BLOCK_K=block)
        if not proto_final:
            a = _combine_proto(pm, ps, None if first else a, group)
        _sinkhorn_sample_kernel[(B, nsplit)](
            logits, a, sm, ss, beta, K, logits.stride(0), scale, cols_per_split,
            FINALIZE=sample_final, BLOCK_K=block)
        if not sample_final:
            beta = _combine_sample(sm, ss)
    out = torch.empty((B, K), **f32)
    _sinkhorn_write_kernel[(B, n_kblocks)](logits, a, beta, out, K, logits.stride(0), scale, BLOCK_K=block)
    return out

