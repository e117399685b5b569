"""CPU path of the Gram loss: loss and input gradients in one pass, never a P x P matrix per image.

`gram_loss_cpu` returns the loss together with dL/dstudent (and dL/dteacher when asked) at an
upstream gradient of 1, computed in the same sweep over the rows (the pattern of Liger-Kernel's
fused linear cross-entropy): the autograd backward then only scales that gradient, so nothing
but the gradient itself outlives the forward, and no Gram product is formed twice.

Two formulations, both over features grouped as (G, P, D) (G = B images, or G = 1 flattened):
  identity  with Sig = Ys + Yt and Del = Ys - Yt, Ys Ys^T - Yt Yt^T = (Sig Del^T + Del Sig^T) / 2, so
            ||Ys Ys^T - Yt Yt^T||_F^2 = (<Sig^T Sig, Del^T Del> + <Sig^T Del, Del^T Sig>) / 2:
            O(P D^2) work and D x D state; only valid without clamping, only run on normalised
            rows (see `dinov3_fast.ops.gram.uses_identity`). Unlike the expansion
            ||Ys^T Ys||^2 - 2 ||Yt^T Ys||^2 + ||Yt^T Yt||^2, no two large terms cancel when the
            student is close to the teacher (both terms scale with |Del|^2). Two sweeps over the
            rows of each image: one accumulates the D x D products, one writes the gradient rows.
  tiled     row blocks of both P x P Grams, formed, clamped, differenced and reduced block by block,
            O(P^2 D) work, block memory bounded by _CHUNK_ELEMS.
Both run on BLAS (torch.matmul), which beats a hand-written OpenMP loop here; the choice between
them is made by the caller (`dinov3_fast.ops.gram`) from the FLOP counts.
Math in fp32 (fp64 for fp64 inputs); the final reductions accumulate in fp64.
"""
from __future__ import annotations

import torch

from dinov3_fast.ops._common import CLAMP_BOTH, CLAMP_NONE, CLAMP_TEACHER, compute_dtype

_CHUNK_ELEMS = 1 << 18  # elements of one tiled (rows, P) block: 1 MiB in fp32
_IDENTITY_ROWS = 384  # rows per identity sweep step: BLAS-efficient blocks at small scratch (docs/architecture.md)
_EPS = 1e-12  # F.normalize's default


def _row_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor | None:
    """(..., D) -> (..., 1) row norms in the compute dtype, or None without normalisation."""
    if not normalize:
        return None
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=compute_dtype(x))


def _inverse(norms: torch.Tensor) -> torch.Tensor:
    """1 / max(norms, eps), the scale F.normalize divides by (as a reciprocal: multiplying beats
    dividing, and differs from x / n by at most one rounding)."""
    return norms.clamp_min(_EPS).reciprocal_()


def normalize_rows(x: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(..., D) -> (Y, norms) with Y = x / max(||x||, eps) in the compute dtype, norms (..., 1).
    Without normalisation Y may alias x: callers must not modify it in place."""
    norms = _row_norms(x, normalize)
    x = x.to(compute_dtype(x))
    return (x, None) if norms is None else (x / norms.clamp_min(_EPS), norms)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., D), (..., D) -> (..., 1) row-wise dot products, as a batched matmul: unlike
    linalg.vecdot it allocates no (..., D) product."""
    d = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, d), b.reshape(-1, d, 1)).reshape(*a.shape[:-1], 1)


def normalize_rows_backward(grad_y: torch.Tensor, x: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """Gradient through y = x / max(||x||, eps), in place in grad_y, from the raw rows x (so no
    normalised copy has to be kept): with r = 1 / ||x||, (g - y (y.g)) r = (g - r^2 x (x.g)) r, or
    g / eps where the norm was clamped. x: (..., D) any float dtype, norms: (..., 1)."""
    if norms is None:
        return grad_y
    inv = _inverse(norms)
    radial = _row_dot(x.to(grad_y.dtype), grad_y).mul_(inv.square()).masked_fill_(norms <= _EPS, 0.0)
    return grad_y.addcmul_(x, radial, value=-1.0).mul_(inv)


def _grad_buffer(x: torch.Tensor, needed: bool) -> torch.Tensor:
    """A contiguous gradient buffer for x in the compute dtype (so fp16 gradients cannot underflow
    before the upstream gradient, e.g. a loss scale, is applied), or an empty one if not needed."""
    return torch.empty(x.shape if needed else (0,), dtype=compute_dtype(x))


# ----------------------------------------------------------------------------- identity form

_SYM_BLOCK = 128  # column block of the symmetric products: wide enough for BLAS, fine enough to skip work


def _sym_bounds(D: int) -> list[int]:
    k = max(1, round(D / _SYM_BLOCK))
    return [round(i * D / k) for i in range(k + 1)]


def sym_product_fraction(D: int) -> float:
    """The fraction of a full (D, D) product's FLOPs that `_add_sym_product_` runs."""
    b = _sym_bounds(D)
    return sum((b[i + 1] - b[i]) * (D - b[i]) for i in range(len(b) - 1)) / D**2


def _add_sym_product_(out: torch.Tensor, y: torch.Tensor) -> None:
    """out += the upper block triangle of y^T y (out: (D, D), y: (R, D)) over k x k column blocks
    of about _SYM_BLOCK, (k + 1) / 2k of a full product's FLOPs (2/3 at D = 384); `_mirror_upper_`
    fills the rest afterwards. torch exposes no syrk. One GEMM per block row (the diagonal block
    and all to its right): at R = 256 MKL runs a single 128 x 128 block on one core, a block row
    on both (143 against 116 GFLOP/s at D = 384 on the 2-core CI machine)."""
    b = _sym_bounds(y.shape[1])
    for i in range(len(b) - 1):
        out[b[i]:b[i + 1], b[i]:].addmm_(y[:, b[i]:b[i + 1]].T, y[:, b[i]:])


def _mirror_upper_(g: torch.Tensor) -> None:
    """Copy the strictly-upper blocks written by `_add_sym_product_` to the lower ones."""
    b = _sym_bounds(g.shape[-1])
    for i in range(1, len(b) - 1):
        g[b[i]:b[i + 1], :b[i]] = g[:b[i], b[i]:b[i + 1]].T


class _SigDelRows:
    """Scratch for the identity sweeps: fills [Sig | Del] of a row block of the current image
    straight from the raw rows and their inverse norms (no normalised copy of either side is
    kept). One (rows, 2D) buffer per call."""

    def __init__(self, P: int, D: int, dtype: torch.dtype):
        self.z = torch.empty((min(_IDENTITY_ROWS, P), 2 * D), dtype=dtype)  # [Sig | Del]
        self.y = None  # (rows, D) Ys or Yt, made where an image needs it (`side_rows`)

    def set_image(self, xs: torch.Tensor, xt: torch.Tensor) -> None:
        """xs, xt: (P, D) student and teacher features of one image."""
        self.xs, self.xt = xs, xt
        self.ns, self.nt = _row_norms(xs, True), _row_norms(xt, True)
        self.rs, self.rt = _inverse(self.ns), _inverse(self.nt)

    def fill(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (Z, Sig, Del) for `rows`, Z = [Sig | Del] of shape (R, 2D). Del = Ys - Yt is
        formed directly from the normalised rows, never as Sig - 2 Yt (which would cancel)."""
        dim = self.xs.shape[1]
        z = self.z[: rows.stop - rows.start]
        sig, dlt = z[:, :dim], z[:, dim:]
        xs, xt, rt = self.xs[rows], self.xt[rows], self.rt[rows]
        torch.mul(xs, self.rs[rows], out=sig)  # Ys
        torch.mul(xt, rt, out=dlt)             # Yt
        torch.sub(sig, dlt, out=dlt)
        sig.addcmul_(xt, rt)
        return z, sig, dlt

    def side_rows(self, rows: slice, student: bool) -> torch.Tensor:
        """Ys (or Yt) of `rows`, (R, D), in a buffer of its own."""
        x, r = (self.xs, self.rs) if student else (self.xt, self.rt)
        if self.y is None:
            self.y = torch.empty((self.z.shape[0], x.shape[1]), dtype=self.z.dtype)
        return torch.mul(x[rows], r[rows], out=self.y[: rows.stop - rows.start])

    def has_clamped_rows(self, student: bool) -> bool:
        """Whether a row of that side has a norm at or near eps, where F.normalize clamps it (see
        `_identity`)."""
        return bool(((self.ns if student else self.nt) <= 2 * _EPS).any())

    def normalize_backward_(self, grad_y: torch.Tensor, rows: slice, student: bool) -> torch.Tensor:
        """grad_y (R, D) = dL/dY of `rows` on the student's (or teacher's) side, taken through the
        normalisation in place."""
        x, norms = (self.xs, self.ns) if student else (self.xt, self.nt)
        return normalize_rows_backward(grad_y, x[rows], norms[rows])


def _row_slices(P: int):
    for r0 in range(0, P, _IDENTITY_ROWS):
        yield slice(r0, min(P, r0 + _IDENTITY_ROWS))


def _write_grad_rows(out: torch.Tensor, rows_scratch: _SigDelRows, weights: torch.Tensor, student: bool) -> None:
    """out (P, D) = dL/dX of one side: Z W taken through the normalisation, one row block at a
    time. weights (2D, D) stacks the D x D factors of Sig and Del, scaled by 1 / M already."""
    for rows in _row_slices(out.shape[0]):
        z, _, _ = rows_scratch.fill(rows)
        rows_scratch.normalize_backward_(torch.mm(z, weights, out=out[rows]), rows, student)


def _swap_halves(f: torch.Tensor) -> torch.Tensor:
    """(2D, D) [Sig^T Y; Del^T Y] -> [Del^T Y; Sig^T Y], the order of the gradient's weights."""
    d = f.shape[1]
    return torch.cat((f[d:], f[:d]))


def _identity(xs, xt, need_student, need_teacher):
    """Identity form on normalised rows. Returns (M * loss in fp64, dL/dxs, dL/dxt).

    The gradients' D x D factors, M dL/dYs = Sig (2 Del^T Ys) + Del (2 Sig^T Ys) and
    M dL/dYt = -Sig (2 Del^T Yt) - Del (2 Sig^T Yt), are sums of the loss's products:
    2 Del^T Ys = B + C^T, 2 Sig^T Ys = A + C (2 Del^T Yt = C^T - B, 2 Sig^T Yt = A - C), at no
    extra cost. Those sums cancel up to their rounding where a side's rows are small; that only
    matters where F.normalize clamps a row's norm (the gradient reaching x is then dL/dy / eps,
    1e12 times it; in an all-zero image the exact gradient is 0). An image with such rows on a
    differentiated side takes that side's factors as direct products, Z^T Y with Z = [Sig | Del],
    which vanish with Y."""
    G, P, D = xs.shape
    inv_m = 1.0 / (G * P * P)
    d_s, d_t = _grad_buffer(xs, need_student), _grad_buffer(xt, need_teacher)
    total = torch.zeros((), dtype=torch.float64)
    dtype = compute_dtype(xs)
    # weights = [B; A] (B = Del^T Del, A = Sig^T Sig), then [B + C^T; A + C]: the student's factors.
    weights = torch.empty((2 * D, D), dtype=dtype)
    C = torch.empty((D, D), dtype=dtype)
    scratch = _SigDelRows(P, D, dtype)
    for g in range(G):
        scratch.set_image(xs[g], xt[g])
        # the direct products Z^T Ys and Z^T Yt, for the sides that need them
        f_s = torch.zeros((2 * D, D), dtype=dtype) if need_student and scratch.has_clamped_rows(True) else None
        f_t = torch.zeros((2 * D, D), dtype=dtype) if need_teacher and scratch.has_clamped_rows(False) else None
        B, A = weights[:D].zero_(), weights[D:].zero_()
        C.zero_()
        for rows in _row_slices(P):
            z, sig, dlt = scratch.fill(rows)
            _add_sym_product_(A, sig)
            _add_sym_product_(B, dlt)
            C.addmm_(sig.T, dlt)
            if f_s is not None:
                f_s.addmm_(z.T, scratch.side_rows(rows, student=True))
            if f_t is not None:
                f_t.addmm_(z.T, scratch.side_rows(rows, student=False))
        _mirror_upper_(A)
        _mirror_upper_(B)
        # M L = (<A, B> + <C, C^T>) / 2: both terms scale with |Del|^2. Row sums in the compute
        # dtype, the rest in fp64.
        total += 0.5 * (_row_dot(A, B).double().sum() + _row_dot(C, C.mT).double().sum())
        if need_teacher:  # M dL/dYt = Sig (B - C^T) - Del (A - C)
            if f_t is not None:
                teacher_weights = _swap_halves(f_t).mul_(-2.0)
            else:
                teacher_weights = torch.empty_like(weights)
                torch.sub(B, C.mT, out=teacher_weights[:D])
                torch.sub(C, A, out=teacher_weights[D:])
            _write_grad_rows(d_t[g], scratch, teacher_weights.mul_(inv_m), student=False)
            del teacher_weights
        if need_student:  # M dL/dYs = Sig (B + C^T) + Del (A + C)
            if f_s is not None:
                weights.copy_(_swap_halves(f_s)).mul_(2.0)
            else:
                B.add_(C.mT)
                A.add_(C)
            _write_grad_rows(d_s[g], scratch, weights.mul_(inv_m), student=True)
    return total, d_s, d_t


# ----------------------------------------------------------------------------- tiled form

def _student_dead(s: torch.Tensor, t: torch.Tensor, clamp: int) -> torch.Tensor | None:
    """Where the student's similarity is zeroed (and passes no gradient): S < 0 with remove_neg,
    S < 0 & T < 0 (unclamped T) with remove_only_teacher_neg; None without clamping."""
    if clamp == CLAMP_BOTH:
        return s < 0
    if clamp == CLAMP_TEACHER:
        return (s < 0) & (t < 0)
    return None


def _clamped_diff_(s: torch.Tensor, t: torch.Tensor, clamp: int, dead: torch.Tensor | None) -> torch.Tensor:
    """f(S) - g(T), computed in place in `s` (t is clamped in place too): block memory stays low.
    dead: `_student_dead(s, t, clamp)`, computed by the caller before t is clamped."""
    if dead is not None:
        s.masked_fill_(dead, 0)
    if clamp != CLAMP_NONE:
        t.clamp_min_(0)
    return s.sub_(t)


def _tiled(xs, xt, normalize, clamp, need_student, need_teacher):
    """Tiled form, one image at a time, in (rows, P) blocks of about _CHUNK_ELEMS elements (per
    image and contiguous: strided multi-image slices sent matmuls and reductions down slow paths,
    ~6x). Returns (M * loss in fp64, dL/dxs, dL/dxt).

    With E = f(S) - g(T), M L = sum E^2 and, E being symmetric, M dL/dYs = 4 (E * f'(S)) Ys and
    M dL/dYt = -4 (E * g'(T)) Yt: zeroed entries pass no gradient to their own side (f' = 0 where
    the student is zeroed, g'(T) = [T >= 0])."""
    G, P, _ = xs.shape
    inv_m = 1.0 / (G * P * P)
    d_s, d_t = _grad_buffer(xs, need_student), _grad_buffer(xt, need_teacher)
    total = torch.zeros((), dtype=torch.float64)
    block_rows = max(1, _CHUNK_ELEMS // P)
    for g in range(G):
        ys, ns = normalize_rows(xs[g], normalize)
        yt, nt = normalize_rows(xt[g], normalize)
        for r0 in range(0, P, block_rows):
            rows = slice(r0, min(P, r0 + block_rows))
            s = ys[rows] @ ys.T
            t = yt[rows] @ yt.T
            s_dead = _student_dead(s, t, clamp)
            t_dead = t < 0 if need_teacher and clamp != CLAMP_NONE else None
            diff = _clamped_diff_(s, t, clamp, s_dead)
            total += _row_dot(diff, diff).double().sum()
            if need_student:
                # The teacher's gradient needs diff unmasked by the student's dead entries.
                student_e = diff if s_dead is None else diff.masked_fill(s_dead, 0) if need_teacher \
                    else diff.masked_fill_(s_dead, 0)
                torch.mm(student_e, ys, out=d_s[g, rows])
            if need_teacher:
                torch.mm(diff if t_dead is None else diff.masked_fill_(t_dead, 0), yt, out=d_t[g, rows])
        if need_student:
            normalize_rows_backward(d_s[g].mul_(4.0 * inv_m), xs[g], ns)
        if need_teacher:
            normalize_rows_backward(d_t[g].mul_(-4.0 * inv_m), xt[g], nt)
    return total, d_s, d_t


# ----------------------------------------------------------------------------- entry point

def gram_loss_cpu(xs: torch.Tensor, xt: torch.Tensor, normalize: bool, clamp: int, identity: bool,
                  need_student: bool, need_teacher: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and its input gradients in one pass.

    Args:
        xs, xt: (G, P, D) student and teacher features, any strides and float dtype.
        normalize, clamp: as `dinov3_fast.ops.gram_loss` (clamp: CLAMP_NONE / _BOTH / _TEACHER).
        identity: use the D x D identity (caller guarantees clamp == CLAMP_NONE and normalize).
        need_student, need_teacher: which gradients to compute; the others cost nothing.

    Returns:
        (loss, d_student, d_teacher): loss 0-dim in the compute dtype (fp32, fp64 for fp64 input);
        dL/dxs and dL/dxt for an upstream gradient of 1, contiguous (G, P, D) in the compute dtype
        (the caller casts after applying the upstream gradient), or empty (0,) tensors when not
        needed.
    """
    G, P, _ = xs.shape
    if identity:
        total, d_s, d_t = _identity(xs, xt, need_student, need_teacher)
    else:
        total, d_s, d_t = _tiled(xs, xt, normalize, clamp, need_student, need_teacher)
    return (total / (G * P * P)).to(compute_dtype(xs)), d_s, d_t
