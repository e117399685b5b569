"""CPU path of the Gram loss: the best PyTorch formulation, never a P x P matrix per image.

Two formulations, both over features grouped as (G, P, D) (G = B images, or G = 1 flattened):
  identity  with Sig = Ys + Yt and Del = Ys - Yt, Ys Ys^T - Yt Yt^T = (Sig Del^T + Del Sig^T) / 2, so
            ||Ys Ys^T - Yt Yt^T||_F^2 = (<Sig^T Sig, Del^T Del> + <Sig^T Del, Del^T Sig>) / 2:
            O(P D^2) work and D x D state; only valid without clamping. Unlike the expansion
            ||Ys^T Ys||^2 - 2 ||Yt^T Ys||^2 + ||Yt^T Yt||^2, no two large terms cancel when the
            student is close to the teacher (both terms scale with |Del|^2).
  tiled     row blocks of both P x P Grams, formed, clamped, differenced and reduced block by block,
            O(P^2 D) work, block memory bounded by _CHUNK_ELEMS.
Both run on BLAS (torch.matmul), which beats a hand-written OpenMP loop here; the choice between
them is made by the caller (`dinov3_fast.ops.gram`) from the FLOP counts.
Math in fp32 (fp64 for fp64 inputs); the final reductions accumulate in fp64.
"""
from __future__ import annotations

import torch

CLAMP_NONE, CLAMP_BOTH, CLAMP_TEACHER = 0, 1, 2
_CHUNK_ELEMS = 1 << 18  # elements of one (rows, width) row block: 1 MiB in fp32
_EPS = 1e-12  # F.normalize's default


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize_rows(x: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(..., D) -> (Y, norms) with Y = x / max(||x||, eps) in the compute dtype, norms (..., 1).
    Without normalisation Y may alias x: callers must not modify it in place."""
    x = x.to(_compute_dtype(x))
    if not normalize:
        return x, None
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norms.clamp_min(_EPS), norms


def normalize_rows_backward(grad_y: torch.Tensor, y: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """Gradient through y = x / max(||x||, eps), in place in grad_y: (g - y (y.g)) / ||x||, or
    g / eps where the norm was clamped."""
    if norms is None:
        return grad_y
    radial = torch.linalg.vecdot(y, grad_y).unsqueeze(-1).masked_fill_(norms <= _EPS, 0.0)
    return grad_y.addcmul_(y, radial, value=-1.0).div_(norms.clamp_min(_EPS))


def _student_dead(s: torch.Tensor, t: torch.Tensor, clamp: int) -> torch.Tensor | None:
    """Where the student's similarity is zeroed (and passes no gradient): S < 0 with remove_neg,
    S < 0 & T < 0 (unclamped T) with remove_only_teacher_neg; None without clamping."""
    if clamp == CLAMP_BOTH:
        return s < 0
    if clamp == CLAMP_TEACHER:
        return (s < 0) & (t < 0)
    return None


def _clamped_diff_(s: torch.Tensor, t: torch.Tensor, clamp: int) -> torch.Tensor:
    """f(S) - g(T), computed in place in `s` (t is clamped in place too): block memory stays low."""
    dead = _student_dead(s, t, clamp)
    if dead is not None:
        s.masked_fill_(dead, 0)
    if clamp != CLAMP_NONE:
        t.clamp_min_(0)
    return s.sub_(t)


def _row_blocks(G: int, P: int, width: int):
    """(group, row slice) pairs covering all rows, such that a (rows, width) block holds about
    _CHUNK_ELEMS elements. One group at a time keeps every block contiguous: strided multi-group
    slices send CPU matmuls and reductions down slow paths (measured ~6x)."""
    rows = max(1, _CHUNK_ELEMS // max(1, width))
    for g in range(G):
        for r0 in range(0, P, rows):
            yield g, slice(r0, min(P, r0 + rows))


def _add_sym_product_(out: torch.Tensor, y: torch.Tensor) -> None:
    """out += upper block triangle of y^T y (out: (D, D), y: (R, D)), 3/4 of a full product's
    FLOPs; `_mirror_upper_` fills the lower block afterwards. torch exposes no syrk."""
    h = y.shape[1] // 2
    out[:h, :h].addmm_(y[:, :h].T, y[:, :h])
    out[h:, h:].addmm_(y[:, h:].T, y[:, h:])
    out[:h, h:].addmm_(y[:, :h].T, y[:, h:])


def _mirror_upper_(g: torch.Tensor) -> torch.Tensor:
    h = g.shape[-1] // 2
    g[..., h:, :h] = g[..., :h, h:].mT
    return g


def _identity_products(xs: torch.Tensor, xt: torch.Tensor, normalize: bool):
    """A = Sig^T Sig, B = Del^T Del, C = Sig^T Del, each (G, D, D), with Sig = Ys + Yt and
    Del = Ys - Yt, accumulated over row blocks so no normalised row exists in full."""
    G, P, D = xs.shape
    A, B, C = (xs.new_zeros((G, D, D), dtype=_compute_dtype(xs)) for _ in range(3))
    for g, rows in _row_blocks(G, P, D):
        ys = normalize_rows(xs[g, rows], normalize)[0]
        yt = normalize_rows(xt[g, rows], normalize)[0]
        sig = ys + yt
        dlt = ys - yt
        _add_sym_product_(A[g], sig)
        _add_sym_product_(B[g], dlt)
        C[g].addmm_(sig.T, dlt)
    return _mirror_upper_(A), _mirror_upper_(B), C


def gram_fwd_cpu(xs: torch.Tensor, xt: torch.Tensor, normalize: bool, clamp: int, identity: bool):
    """Forward. xs, xt: (G, P, D). Returns (loss 0-dim, state): for the identity formulation the
    state is (G, 2, D, D) = [B + C^T, A + C] (see `_identity_products`), what the student's
    gradient needs; for the tiled one it is empty."""
    G, P, _ = xs.shape
    n_entries = G * P * P
    if identity:
        A, B, C = _identity_products(xs, xt, normalize)
        # M L = (<A, B> + <C, C^T>) / 2: both terms scale with |Ys - Yt|^2, so nothing large cancels
        # when the student is close to the teacher. Row sums in the compute dtype, the rest in fp64.
        total = 0.5 * (torch.linalg.vecdot(A, B).double().sum() + torch.linalg.vecdot(C, C.mT).double().sum())
        return (total / n_entries).to(A.dtype), torch.stack((B + C.mT, A + C), dim=1)
    ys, _ = normalize_rows(xs, normalize)
    yt, _ = normalize_rows(xt, normalize)
    total = torch.zeros((), dtype=torch.float64)
    for g, rows in _row_blocks(G, P, P):
        diff = _clamped_diff_(ys[g, rows] @ ys[g].T, yt[g, rows] @ yt[g].T, clamp)
        total += diff.pow_(2).sum(dtype=torch.float64)
    return (total / n_entries).to(ys.dtype), torch.empty((0,), dtype=ys.dtype)


def _identity_grad(xa, xb, u, v, scale, normalize):
    """dL/dXa through the normalisation of scale (Sig U + Del_a V), with Sig = Ya + Yb and
    Del_a = Ya - Yb, one row block at a time."""
    G, P, D = xa.shape
    out = torch.empty((G, P, D), dtype=xa.dtype)
    for g, rows in _row_blocks(G, P, D):
        ya, na = normalize_rows(xa[g, rows], normalize)
        yb, _ = normalize_rows(xb[g, rows], normalize)
        sig, dlt = ya + yb, ya - yb
        grad_y = torch.addmm(sig @ u[g], dlt, v[g], beta=scale, alpha=scale)
        out[g, rows] = normalize_rows_backward(grad_y, ya, na)
    return out


def gram_bwd_cpu(grad: torch.Tensor, xs: torch.Tensor, xt: torch.Tensor, state: torch.Tensor,
                 normalize: bool, clamp: int, identity: bool, need_student: bool, need_teacher: bool):
    """Backward. grad: 0-dim upstream gradient. Returns (d student, d teacher) as (G, P, D) in the
    inputs' dtypes; an empty tensor for a gradient that is not needed.

    With E = 2/M (f(S) - g(T)) the loss gradient w.r.t. the Gram entries, dL/dYs = 2 (E * f'(S)) Ys
    and dL/dYt = -2 (E * g'(T)) Yt, since E is symmetric. In the identity form (Sig = Ys + Yt,
    Del = Ys - Yt, A = Sig^T Sig, B = Del^T Del, C = Sig^T Del), M dL/dYs = Sig (B + C^T) + Del (A + C)
    and M dL/dYt = Sig (B - C^T) - Del (A - C).
    """
    G, P, _ = xs.shape
    scale = float(grad) / (G * P * P)
    empty_s = torch.empty((0,), dtype=xs.dtype)
    empty_t = torch.empty((0,), dtype=xt.dtype)
    if identity:
        d_student = _identity_grad(xs, xt, state[:, 0], state[:, 1], scale, normalize) if need_student else empty_s
        d_teacher = empty_t
        if need_teacher:
            A, B, C = _identity_products(xs, xt, normalize)
            # Del for the teacher side is Yt - Ys = -Del: dL/dYt = Sig (B - C^T) + (-Del)(A - C).
            d_teacher = _identity_grad(xt, xs, B - C.mT, A - C, scale, normalize)
        return d_student, d_teacher
    scale = 2 * scale
    ys, ns = normalize_rows(xs, normalize)
    yt, nt = normalize_rows(xt, normalize)
    dys = torch.empty(ys.shape, dtype=ys.dtype) if need_student else None  # contiguous, as the fake says
    dyt = torch.empty(yt.shape, dtype=yt.dtype) if need_teacher else None
    for g, rows in _row_blocks(G, P, P):
        s = ys[g, rows] @ ys[g].T
        t = yt[g, rows] @ yt[g].T
        # Zeroed entries pass no gradient to their own side (f' = 0 where the student is zeroed,
        # g'(T) = [T >= 0]).
        s_dead = _student_dead(s, t, clamp) if need_student else None
        t_dead = t < 0 if need_teacher and clamp != CLAMP_NONE else None
        diff = _clamped_diff_(s, t, clamp)
        if need_student:
            ds = diff if s_dead is None else diff.masked_fill(s_dead, 0)
            torch.mm(ds, ys[g], out=dys[g, rows])
        if need_teacher:
            dt = diff if t_dead is None else diff.masked_fill_(t_dead, 0)
            torch.mm(dt, yt[g], out=dyt[g, rows])
    d_student = normalize_rows_backward(dys.mul_(2 * scale), ys, ns).to(xs.dtype) if need_student else empty_s
    d_teacher = normalize_rows_backward(dyt.mul_(-2 * scale), yt, nt).to(xt.dtype) if need_teacher else empty_t
    return d_student, d_teacher
