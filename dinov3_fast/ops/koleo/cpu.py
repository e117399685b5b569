"""CPU path of the KoLeo loss: C++ blocked neighbour search, then O(n topk D) PyTorch.

The search is the only O(n^2 D) part. `csrc/koleo_cpu.cpp` (OpenMP, AVX-512/AVX2 clones) runs it
tile by tile and, when every row is a query, over the upper triangle of y y^T only (half the
FLOPs); measured here it beats the best PyTorch formulation (row chunks of y @ y.T + max on MKL),
see docs/architecture.md. That PyTorch formulation stays as the fallback when the extension is not
built. Neither allocates more than a tile / row chunk of dots. Everything else (distances, loss,
backward) is a handful of O(n topk D) tensor ops; the backward scatters neighbour gradients with
`index_add_`, which is deterministic on the CPU, and runs in fp64 (see koleo_bwd_cpu).

Notation as in triton.py: queries are rows [q0, q0 + nq) of x (M, D); r = 1 / max(||x||, eps);
y = r x; u = y_q - y_j + 1e-8; d = ||u||. Math in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

from dinov3_fast._ext import native

PDIST_EPS = 1e-8
_CHUNK_ELEMS = 1 << 22  # dots per row chunk of the PyTorch search: 16 MiB in fp32


def _normalized(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, D) -> (y (M, D) contiguous, r (M,)) in the compute dtype."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    r = 1.0 / torch.linalg.vector_norm(x, dim=-1).clamp_min(eps)
    return (x * r[:, None]).contiguous(), r


def search_native(y: torch.Tensor, q0: int, nq: int, topk: int) -> torch.Tensor:
    """(nq, topk) int64 neighbours of rows [q0, q0 + nq) of y (M, D) contiguous, via dinov3_fast._C."""
    out = torch.empty((nq, topk), dtype=torch.int64)
    native().koleo_search(y.data_ptr(), y.shape[0], y.shape[1], q0, nq, topk, out.data_ptr(),
                          y.dtype == torch.float64)
    return out


def search_torch(y: torch.Tensor, q0: int, nq: int, topk: int) -> torch.Tensor:
    """The same search as `search_native` in row chunks of y @ y.T (the PyTorch formulation)."""
    M = y.shape[0]
    out = torch.empty((nq, topk), dtype=torch.int64)
    rows = max(1, _CHUNK_ELEMS // M)
    for c0 in range(0, nq, rows):
        chunk = y[q0 + c0:q0 + min(nq, c0 + rows)]
        dots = chunk @ y.T
        own = torch.arange(chunk.shape[0])
        dots[own, own + q0 + c0] = -1
        if topk == 1:
            out[c0:c0 + chunk.shape[0]] = torch.max(dots, dim=1).indices[:, None]
        else:  # a stable sort keeps the lowest index first among equal dots
            out[c0:c0 + chunk.shape[0]] = torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :topk]
    return out


def _pairs(y: torch.Tensor, idx: torch.Tensor, q0: int, nq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y_q (nq, 1, D), y_j (nq, topk, D), u (nq, topk, D)."""
    y_q = y[q0:q0 + nq, None]
    y_j = y[idx]
    return y_q, y_j, y_q - y_j + PDIST_EPS


def koleo_fwd_cpu(x: torch.Tensor, q0: int, nq: int, eps: float, topk: int):
    """Forward. x: (M, D); queries are rows [q0, q0 + nq).

    Returns:
        loss: 0-dim fp32 (fp64 for fp64 inputs).
        idx: (nq, topk) int64 neighbour indices into x, best first.
        stats: (3, nq, topk): d, y_q.u and y_j.u per pair (for the backward).
        r: (M,) inverse row norms.
    """
    y, r = _normalized(x, eps)
    search = search_native if native() is not None else search_torch
    idx = search(y, q0, nq, topk)
    y_q, y_j, u = _pairs(y, idx, q0, nq)
    d = torch.linalg.vector_norm(u, dim=-1)
    stats = torch.stack((d, (y_q * u).sum(-1), (y_j * u).sum(-1)))
    return -torch.log(d + eps).mean(), idx, stats, r


def koleo_bwd_cpu(grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, stats: torch.Tensor, r: torch.Tensor,
                  q0: int, nq: int, eps: float, topk: int) -> torch.Tensor:
    """Backward. grad: 0-dim upstream gradient; the rest as returned by the forward.

    Returns:
        (M, D) gradient w.r.t. x, in x's dtype. Per pair, with c = -grad / (nq topk (d + eps) d):
        dx_q += c r_q (u - y_q (y_q.u)) and dx_j -= c r_j (u - y_j (y_j.u)), the radial term
        dropped for rows with ||x|| <= eps (F.normalize divides by eps there) and c = 0 for a row
        paired with itself (topk = n).
    """
    # fp64 math: a duplicated row receives equal and opposite terms of size ~1 / (n d^2) from its
    # own pair and its twin's pair, which must cancel without swamping the rest of its gradient.
    r = r.double()
    y = (x.double() * r[:, None]).contiguous()
    y_q, y_j, u = _pairs(y, idx, q0, nq)
    d, a_dot, b_dot = stats.double()
    self_pair = idx == torch.arange(q0, q0 + nq)[:, None]  # topk = n: its two gradients cancel exactly
    c = torch.where((d > 0) & ~self_pair, -grad.double() / (nq * topk * (d + eps) * d), 0.0)[..., None]
    radial = (r * eps < 1).double()
    r_q, r_j = r[q0:q0 + nq, None, None], r[idx][..., None]
    own = (c * r_q * (u - radial[q0:q0 + nq, None, None] * a_dot[..., None] * y_q)).sum(1)
    theirs = c * r_j * (u - radial[idx][..., None] * b_dot[..., None] * y_j)
    dx = torch.zeros_like(y)
    dx[q0:q0 + nq] = own
    dx.index_add_(0, idx.flatten(), theirs.flatten(0, 1), alpha=-1)
    return dx.to(x.dtype)
