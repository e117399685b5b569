"""CPU path of the KoLeo loss: C++ (csrc/koleo_cpu.cpp, OpenMP) with a PyTorch fallback.

  search       the only O(n^2 D) part: tiles of dots in registers / L1, a running top-k per row,
               and, when every row is a query, only the upper triangle of y y^T (half the FLOPs).
  pair stats   d, y_q.u, y_j.u per (query, neighbour) pair.
  backward     one pass per row over its own pairs and the pairs that chose it (CSR inverse index
               from a stable sort), fp64 sums, written once: no temporaries, no atomics.
Measured here the C++ path beats the best PyTorch formulation (row chunks of y @ y.T on MKL +
torch.max, then O(n topk D) tensor ops, whose many n x D temporaries dominate on this machine);
see docs/architecture.md for both figures. The PyTorch formulation (`search_torch`,
`pair_stats_torch`, `backward_torch`) runs when the extension is not built. Neither allocates
more than a tile / row chunk of dots.

Notation as in triton.py: queries are rows [q0, q0 + nq) of x (M, D); nrm = max(||x||, eps);
y = x / nrm (a division, as F.normalize: a reciprocal's extra rounding leaves D = 1 rows an ulp
off +-1); u = y_q - y_j + 1e-8; d = ||u||. Math in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

from dinov3_fast._ext import native
from dinov3_fast.ops._common import compute_dtype

PDIST_EPS = 1e-8
_CHUNK_ELEMS = 1 << 22  # dots per row chunk of the PyTorch search: 16 MiB in fp32


def _normalized(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, D) -> (y (M, D) contiguous, nrm (M,)) in the compute dtype, y = x / nrm as F.normalize."""
    x = x.to(compute_dtype(x))
    nrm = torch.linalg.vector_norm(x, dim=-1).clamp_min(eps)
    return (x / nrm[:, None]).contiguous(), nrm


def _native_arg(t: torch.Tensor, name: str, *dtypes: torch.dtype) -> torch.Tensor:
    """`t` as the C++ kernels read it: a dense row-major CPU array of one of `dtypes`. They take
    raw pointers, so a strided view would be read as its storage in memory order (a wrong result)
    and a narrower dtype as raw bytes (past the end of its buffer): views are copied, a wrong
    dtype or device refused. Keep the returned tensor alive for the duration of the call."""
    if t.device.type != "cpu" or t.dtype not in dtypes:
        raise TypeError(f"{name}: the native KoLeo kernels need a CPU tensor of {dtypes}, got {t.dtype} on {t.device}")
    return t.contiguous()


def search_native(y: torch.Tensor, q0: int, nq: int, topk: int) -> torch.Tensor:
    """(nq, topk) int64 neighbours of rows [q0, q0 + nq) of y (M, D) fp32/fp64, via dinov3_fast._C."""
    y = _native_arg(y, "y", torch.float32, torch.float64)
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


def pair_stats_torch(y: torch.Tensor, idx: torch.Tensor, q0: int, nq: int) -> torch.Tensor:
    """(3, nq, topk): d, y_q.u and y_j.u of every (query, slot) pair."""
    y_q, y_j = y[q0:q0 + nq, None], y[idx]
    u = y_q - y_j + PDIST_EPS
    return torch.stack((torch.linalg.vector_norm(u, dim=-1), (y_q * u).sum(-1), (y_j * u).sum(-1)))


def backward_torch(grad: torch.Tensor, y: torch.Tensor, nrm: torch.Tensor, idx: torch.Tensor, stats: torch.Tensor,
                   q0: int, nq: int, eps: float, topk: int) -> torch.Tensor:
    """The PyTorch formulation of the backward (see koleo_bwd_cpu), (M, D) fp64."""
    y_q, nrm_q = y[q0:q0 + nq], nrm[q0:q0 + nq, None]
    d, a_dot, b_dot = stats
    self_pair = idx == torch.arange(q0, q0 + nq)[:, None]
    c = torch.where(self_pair | (d == 0), 0.0, -grad.to(d.dtype) / (nq * topk * (d + eps) * d))
    radial = (nrm > eps).to(nrm.dtype)[:, None]  # compared in nrm's dtype, which holds eps rounded
    dx = torch.zeros(y.shape, dtype=torch.float64)
    for s in range(topk):
        j = idx[:, s]
        y_j = y[j]
        u = y_q - y_j + PDIST_EPS
        dx[q0:q0 + nq] += (u - radial[q0:q0 + nq] * a_dot[:, s, None] * y_q).mul_(c[:, s, None]).div_(nrm_q)
        theirs = (u - radial[j] * b_dot[:, s, None] * y_j).mul_(c[:, s, None]).div_(nrm[j, None])
        dx.index_add_(0, j, theirs.double(), alpha=-1)
    return dx


def koleo_fwd_cpu(x: torch.Tensor, q0: int, nq: int, eps: float, topk: int):
    """Forward. x: (M, D); queries are rows [q0, q0 + nq).

    Returns:
        loss: 0-dim fp32 (fp64 for fp64 inputs).
        idx: (nq, topk) int64 neighbour indices into x, best first.
        stats: (3, nq, topk): d, y_q.u and y_j.u per pair (for the backward).
        nrm: (M,) row norms clamped to eps, max(||x||, eps).
    """
    y, nrm = _normalized(x, eps)
    lib = native()
    if lib is None:
        idx = search_torch(y, q0, nq, topk)
        stats = pair_stats_torch(y, idx, q0, nq)
    else:
        idx = search_native(y, q0, nq, topk)
        stats = y.new_empty((3, nq, topk))
        lib.koleo_pair_stats(y.data_ptr(), y.shape[1], q0, nq, topk, idx.data_ptr(), stats.data_ptr(),
                             y.dtype == torch.float64)
    return -torch.log(stats[0] + eps).mean(), idx, stats, nrm


def koleo_bwd_cpu(grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, stats: torch.Tensor, nrm: torch.Tensor,
                  q0: int, nq: int, eps: float, topk: int) -> torch.Tensor:
    """Backward. grad: 0-dim upstream gradient; the rest as returned by the forward.

    Returns:
        (M, D) gradient w.r.t. x, in x's dtype. Per pair, with c = -grad / (nq topk (d + eps) d):
        dx_q += c (u - y_q (y_q.u)) / nrm_q and dx_j -= c (u - y_j (y_j.u)) / nrm_j, the radial
        term dropped for rows with nrm = eps (F.normalize divides by eps there) and c = 0 for a row
        paired with itself (topk = n). Terms are computed in the compute dtype and summed in fp64:
        a duplicated row gets equal and opposite terms of size ~1 / (n d^2) from its own pair and
        its twin's, which must cancel without swamping the rest of its gradient.
    """
    y = (x.to(nrm.dtype) / nrm[:, None]).contiguous()
    lib = native()
    if lib is None:
        return backward_torch(grad, y, nrm, idx, stats, q0, nq, eps, topk).to(x.dtype)
    # idx, stats and nrm are saved tensors: a saved-tensor hook may unpack them as strided views
    nrm = _native_arg(nrm, "nrm", torch.float32, torch.float64)
    idx = _native_arg(idx, "idx", torch.int64)
    stats = _native_arg(stats, "stats", nrm.dtype)
    sorted_idx, order = torch.sort(idx.flatten(), stable=True)
    start = torch.searchsorted(sorted_idx, torch.arange(y.shape[0] + 1))
    dx = torch.empty_like(y)
    lib.koleo_backward(y.data_ptr(), nrm.data_ptr(), y.shape[0], y.shape[1], q0, nq, topk, idx.data_ptr(),
                       stats.data_ptr(), order.data_ptr(), start.data_ptr(), -float(grad) / (nq * topk), eps,
                       dx.data_ptr(), y.dtype == torch.float64)
    return dx.to(x.dtype)
