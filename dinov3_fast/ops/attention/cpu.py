"""CPU path of RoPE attention and of the standalone RoPE op: explicit fp32 math (fp64 for fp64
inputs), forward and backward functions, no autograd. The same formulas as the Triton kernels, so
the float64 gradcheck of this path checks the kernels' backward algebra too.

Packed layout shared with triton.py (legend: T tokens of all sequences, S sequences, H heads,
Dh head dim, C = H * Dh, R rope-table rows):
  qkv      [T, 3C]  each token's q | k | v, heads contiguous inside each (DINOv3's [.., 3, H, Dh])
  out      [T, C]   attention output, the layout the proj Linear consumes
  lse      [H, T]   natural-log logsumexp of each query row's scaled scores (fp32; fp64 here for fp64)
  sin, cos [R, Dh]  rope tables, or None for no rotation
  seqinfo  [S, 4]   int32 rows (first token, tokens, first rope row, rope rows), or None when the
                    T tokens are T // seq_len sequences of seq_len tokens sharing one table.
Token i of a sequence with n tokens and hw rope rows is a patch iff i >= n - hw; it is rotated by
table row (first rope row + i - (n - hw)). Prefix tokens are not rotated.
Rotation (rotate-half): y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 on the halves of Dh; its transpose,
used for gradients: g1 = y1 c1 + y2 s2, g2 = y2 c2 - y1 s1.
"""
from __future__ import annotations

import math

import torch

from dinov3_fast.ops._common import compute_dtype


def seq_runs(num_tokens: int, seq_len: int, rope_rows: int, seqinfo: torch.Tensor | None) -> list[list[int]]:
    """Runs of back-to-back sequences of one shape: [first token, count, tokens, first rope row, rope rows]."""
    if seqinfo is None:
        return [[0, num_tokens // seq_len, seq_len, 0, rope_rows]]
    runs: list[list[int]] = []
    for tok, n, r0, hw in seqinfo.tolist():
        last = runs[-1] if runs else None
        if last is not None and last[2:] == [n, r0, hw] and last[0] + last[1] * n == tok:
            last[1] += 1
        else:
            runs.append([tok, 1, n, r0, hw])
    return runs


def _tables(sin, cos, r0, hw, dtype):
    """(sin, cos) [hw, Dh] in `dtype`: the table rows of one sequence's hw patch tokens."""
    return sin[r0:r0 + hw].to(dtype), cos[r0:r0 + hw].to(dtype)


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin; x [..., hw, Dh], sin/cos [hw, Dh]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos[:, :h] - x2 * sin[:, :h], x2 * cos[:, h:] + x1 * sin[:, h:]), dim=-1)


def rotate_t(g: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Transpose of `rotate` (its vector-Jacobian product); the inverse rotation for DINOv3's tables."""
    h = g.shape[-1] // 2
    g1, g2 = g[..., :h], g[..., h:]
    return torch.cat((g1 * cos[:, :h] + g2 * sin[:, h:], g2 * cos[:, h:] - g1 * sin[:, :h]), dim=-1)


def _on_patches(fn, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """`fn` (rotate or rotate_t) on the last hw = len(sin) token rows of x [..., n, Dh]; the n - hw
    prefix rows pass through untouched, as in DINOv3 (an identity table row would not do: it turns
    an inf in one half into inf * 0 = NaN in the other)."""
    prefix = x.shape[-2] - sin.shape[0]
    return torch.cat((x[..., :prefix, :], fn(x[..., prefix:, :], sin, cos)), dim=-2)


def _split(qkv_run, cnt, n, num_heads, dtype):
    """[cnt * n, 3C] -> q, k, v each [cnt, H, n, Dh] in `dtype`."""
    x = qkv_run.reshape(cnt, n, 3, num_heads, -1).to(dtype)
    return (t.transpose(1, 2) for t in x.unbind(2))


def _rotated_qk(q, k, sin, cos, run, io_dtype, dtype):
    """Rotate q and k in `dtype` and round them to the input dtype, as DINOv3 does before SDPA."""
    if sin is None:
        return q, k, None
    tables = _tables(sin, cos, run[3], run[4], dtype)
    q = _on_patches(rotate, q, *tables).to(io_dtype).to(dtype)
    k = _on_patches(rotate, k, *tables).to(io_dtype).to(dtype)
    return q, k, tables


def rope_attention_fwd_cpu(qkv, sin, cos, seqinfo, num_heads: int, max_len: int):
    """out [T, C] in qkv's dtype and lse [H, T] for the packed layout above."""
    T, C = qkv.shape[0], qkv.shape[1] // 3
    dtype = compute_dtype(qkv)
    scale = 1.0 / math.sqrt(C // num_heads)
    out = qkv.new_empty(T, C)
    lse = qkv.new_empty(num_heads, T, dtype=dtype)
    for run in seq_runs(T, max_len, 0 if sin is None else sin.shape[0], seqinfo):
        tok, cnt, n = run[0], run[1], run[2]
        q, k, v = _split(qkv[tok:tok + cnt * n], cnt, n, num_heads, dtype)
        q, k, _ = _rotated_qk(q, k, sin, cos, run, qkv.dtype, dtype)
        scores = (q @ k.transpose(-1, -2)) * scale
        run_lse = torch.logsumexp(scores, dim=-1)                     # [cnt, H, n]
        o = torch.exp(scores - run_lse[..., None]) @ v                # [cnt, H, n, Dh]
        out[tok:tok + cnt * n] = o.transpose(1, 2).reshape(cnt * n, C).to(qkv.dtype)
        lse[:, tok:tok + cnt * n] = run_lse.transpose(0, 1).reshape(num_heads, cnt * n)
    return out, lse


def rope_attention_bwd_cpu(dout, qkv, out, lse, sin, cos, seqinfo, num_heads: int, max_len: int):
    """dqkv [T, 3C] (the gradient of the packed qkv) from dout [T, C]."""
    T, C = qkv.shape[0], qkv.shape[1] // 3
    dtype = compute_dtype(qkv)
    scale = 1.0 / math.sqrt(C // num_heads)
    dqkv = qkv.new_empty(qkv.shape)
    for run in seq_runs(T, max_len, 0 if sin is None else sin.shape[0], seqinfo):
        tok, cnt, n = run[0], run[1], run[2]
        sl = slice(tok, tok + cnt * n)
        q, k, v = _split(qkv[sl], cnt, n, num_heads, dtype)
        q, k, tables = _rotated_qk(q, k, sin, cos, run, qkv.dtype, dtype)
        do = dout[sl].reshape(cnt, n, num_heads, -1).transpose(1, 2).to(dtype)
        o = out[sl].reshape(cnt, n, num_heads, -1).transpose(1, 2).to(dtype)
        run_lse = lse[:, sl].reshape(num_heads, cnt, n).transpose(0, 1).to(dtype)
        p = torch.exp((q @ k.transpose(-1, -2)) * scale - run_lse[..., None])
        delta = (do * o).sum(-1, keepdim=True)
        ds = p * (do @ v.transpose(-1, -2) - delta)
        dq = (ds @ k) * scale
        dk = (ds.transpose(-1, -2) @ q) * scale
        dv = p.transpose(-1, -2) @ do
        if tables is not None:
            dq, dk = _on_patches(rotate_t, dq, *tables), _on_patches(rotate_t, dk, *tables)
        grads = torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2)  # [cnt, n, 3, H, Dh]
        dqkv[sl] = grads.reshape(cnt * n, 3 * C).to(qkv.dtype)
    return dqkv


def apply_rope_cpu(q, k, sin, cos, backward: bool):
    """Rotate (or, for backward, apply the transpose to) the last HW tokens of q, k [B, H, N, Dh]."""
    dtype = compute_dtype(q)
    tables = _tables(sin, cos, 0, sin.shape[0], dtype)
    fn = rotate_t if backward else rotate
    return (_on_patches(fn, q.to(dtype), *tables).to(q.dtype),
            _on_patches(fn, k.to(dtype), *tables).to(k.dtype))
