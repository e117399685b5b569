"""KoLeo loss: every backend against the float64 oracle (value, neighbours, gradients)."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dinov3_fast
from dinov3_fast.ops import koleo_loss
from dinov3_fast.ops.koleo import _koleo_bwd, _koleo_fwd, koleo_loss_ref
from dinov3_fast.ops.koleo.reference import koleo_neighbors_ref
from oracle import loss_scale, rel_err

BACKENDS = ["cpu", "triton"]
UPSTREAM = 0.37  # the upstream gradient the checks backpropagate: a loss weight, not 1


def brute_force_koleo(x: torch.Tensor, eps: float, topk: int):
    """An independent float64 oracle: explicit loops over rows, DINOv3's rules spelled out
    (own entry scored -1, ties to the lowest index, ||y_i - y_j + 1e-8||, -mean log(d + eps))."""
    y = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(eps)
    n = y.shape[0]
    terms, neighbours = [], []
    for i in range(n):
        scores = [(-1.0 if j == i else float((y[i] * y[j]).detach().sum()), -j) for j in range(n)]
        best = sorted(range(n), key=lambda j: scores[j], reverse=True)[:topk]
        neighbours.append(best)
        for j in best:
            terms.append(torch.log(torch.linalg.vector_norm(y[i] - y[j] + 1e-8) + eps))
    return -torch.stack(terms).mean(), torch.tensor(neighbours)


def run_backend(x, backend, topk=1, eps=1e-8, upstream=UPSTREAM):
    """(loss, grad at the given upstream gradient, sorted neighbour indices) of the fused op."""
    x = x.detach().requires_grad_()
    loss = koleo_loss(x, topk=topk, eps=eps, backend=backend)
    (grad,) = torch.autograd.grad(loss, x, loss.new_tensor(upstream))
    idx = _koleo_fwd(x.detach(), 0, x.shape[0], eps, topk, backend)[1]
    return loss, grad, idx.sort(dim=1).values


def oracle(x: torch.Tensor, eps: float, topk: int, idx: torch.Tensor | None = None):
    """Float64 oracle: (loss, sorted neighbour indices) with exact ties. Dots are elementwise
    products summed per pair (not a GEMM, whose edge kernels round equal columns differently), so
    equal rows give equal dots and the stable sort picks the lowest index, as torch.max would.
    `idx` (n, topk) imposes the neighbours instead (a tie between exact copies decided otherwise)."""
    y = F.normalize(x, dim=-1, eps=eps)
    if idx is None:
        with torch.no_grad():
            dots = (y[:, None, :] * y[None, :, :]).sum(-1)
            dots.fill_diagonal_(-1)
            idx = torch.sort(dots, dim=1, descending=True, stable=True).indices[:, :topk]
    d = F.pairwise_distance(y[:, None, :].expand(-1, topk, -1), y[idx], eps=1e-8)
    return -torch.log(d + eps).mean(), idx.sort(dim=1).values


def check_against_oracle(x, backend, tol, topk=1, eps=1e-8):
    """Loss, gradient (backpropagated from UPSTREAM, so the backward must apply the upstream
    gradient) and neighbours against the oracle. The loss is a mean of -log d terms of
    either sign, and a random draw can make them cancel (|mean| below 1e-3 of the terms' mean
    magnitude in about 1 draw in 100 at n = 37): there ||out - ref|| / ||ref|| measures the
    cancellation, not the kernel. So the loss error is held to tol times the terms' mean
    magnitude plus 1: a relative rounding error e in d moves -log d by e, whatever log d is, so
    a term near 0 (d near 1: 4 draws in 600 at n = 2 read 2e-5 of |log d| = 0.004) still
    carries an absolute error of order e (elsewhere this is the contract's ratio up to a factor
    1 + 1 / |log d|)."""
    x64 = x.detach().double().requires_grad_()
    ref, ref_idx = oracle(x64, eps, topk)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    with torch.no_grad():
        y = F.normalize(x64, dim=-1, eps=eps)
        d = F.pairwise_distance(y[:, None, :].expand(-1, topk, -1), y[ref_idx], eps=1e-8)
        scale = (torch.log(d + eps).abs() + 1).mean().item()
    loss, grad, idx = run_backend(x, backend, topk, eps)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.dtype == x.dtype and grad.shape == x.shape
    if not torch.equal(idx, ref_idx):
        # Only a tie between exact copies may go another way: a GEMM's edge kernels (the Triton
        # interpreter's numpy dot; DINOv3's own torch.mm) can round equal columns differently. The
        # loss is the same either way; the gradient goes to the other copy, so the oracle takes the
        # kernel's choice.
        # Compared as sets of rows: with topk > 1 the copy's index can sort to another place among
        # the row's neighbours than the oracle's choice (a position-wise comparison failed 1 draw in
        # 10 of test_duplicate_rows_and_ties[2-triton]).
        for row in (idx != ref_idx).any(dim=1).nonzero().flatten().tolist():
            assert sorted(x[idx[row]].tolist()) == sorted(x[ref_idx[row]].tolist()), \
                "a neighbour differs from the oracle's and is no copy of it"
        ref, _ = oracle(x64, eps, topk, idx)
        (ref_grad,) = torch.autograd.grad(ref, x64)
    assert abs(loss.item() - ref.item()) < tol * scale, (loss.item(), ref.item(), scale)
    assert rel_err(grad, UPSTREAM * ref_grad) < tol


@pytest.mark.parametrize("topk", [1, 3])
def test_reference_matches_oracle(topk):
    x = torch.randn(33, 24, dtype=torch.float64, requires_grad=True)
    want, _ = oracle(x, 1e-8, topk)
    got = koleo_loss_ref(x, 1e-8, topk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0], rtol=1e-10, atol=0)


@pytest.mark.parametrize("topk", [1, 2, 4])
def test_reference_matches_brute_force(topk):
    x = torch.randn(9, 5, dtype=torch.float64)
    x[4] = x[1]  # exact duplicate: distance 0 up to the pairwise eps
    x[7] = x[1]  # triplicate: the neighbour is a tie, broken towards the lowest index
    want, want_idx = brute_force_koleo(x, 1e-8, topk)
    y = F.normalize(x, dim=-1, eps=1e-8)
    assert torch.equal(koleo_neighbors_ref(y, y, 0, topk), want_idx)
    torch.testing.assert_close(koleo_loss_ref(x, 1e-8, topk), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,topk", [((2, 5), 1), ((2, 5), 2), ((37, 20), 1), ((37, 20), 3), ((150, 33), 1),
                                        ((150, 33), 3)], ids=["n2", "n2_top2", "one_block", "one_block_top3",
                                                              "multi_block", "multi_block_top3"])
def test_matches_oracle_fp32(backend, shape, topk):
    check_against_oracle(torch.randn(shape), backend, 1e-5, topk=topk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_equal_to_n_includes_self(backend):
    """topk = n: the own row (scored -1) is a neighbour, d = ||1e-8 * 1||, as in DINOv3."""
    check_against_oracle(torch.randn(4, 7), backend, 1e-5, topk=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs(backend):
    check_against_oracle(torch.randn(45, 64).half(), backend, 1e-2, topk=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [1, 2])
def test_duplicate_rows_and_ties(backend, topk):
    """Duplicates have distance ||1e-8 * 1|| and a finite loss through eps; with three copies the
    neighbour is a tie and the gradient depends on which copy wins (the lowest index, unless the
    interpreter's GEMM rounds the copies' dots apart)."""
    x = torch.randn(20, 16)
    x[11] = x[3]
    x[17] = x[3]
    x[9] = x[5]
    check_against_oracle(x, backend, 1e-5, topk=topk)
    loss, _, idx = run_backend(x, backend, topk)
    assert loss.item() > 3  # 5 of the 20 rows have a twin: -log(4e-8 + 1e-8) = 16.8 each
    for row in (3, 11, 17):  # each copy's nearest neighbour is another copy (which one: see check_against_oracle)
        assert idx[row, 0] != row and torch.equal(x[idx[row, 0]], x[row])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_rows_are_clamped_like_f_normalize(backend):
    """||x|| <= eps: F.normalize divides by eps, and its gradient has no radial term."""
    x = torch.randn(12, 8, dtype=torch.float64 if backend == "cpu" else torch.float32)
    x[2] *= 1e-10
    check_against_oracle(x, backend, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = torch.randn(40, 30)
    for x in (base[:, ::2], base.T[:, :21], base[::2]):
        assert not x.is_contiguous()
        check_against_oracle(x, backend, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_argument(backend):
    check_against_oracle(torch.randn(10, 6), backend, 1e-5, eps=1e-3)


def _backend_or_fallback(backend: str, monkeypatch) -> str:
    """"cpu_fallback": the cpu backend without dinov3_fast._C (its PyTorch formulation)."""
    if backend == "cpu_fallback":
        from dinov3_fast.ops.koleo import cpu as koleo_cpu

        monkeypatch.setattr(koleo_cpu, "native", lambda: None)
        return "cpu"
    return backend


@pytest.mark.parametrize("backend", [*BACKENDS, "cpu_fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-3, 1.1e-8, 1e-5])
def test_rows_just_below_eps_have_no_radial_gradient(monkeypatch, backend, dtype, eps):
    """Rows with ||x|| < eps are divided by eps (F.normalize), so their gradient has no radial
    term, however close to eps their norm is. The backwards used to decide that by
    `1 / max(||x||, eps) * eps < 1`, which also holds for clamped rows where fl(1 / eps) * eps
    rounds below 1 (each of these eps on some backend and dtype): the cpu backend's gradient was
    44% off at eps = 1e-3 in fp32. They now test max(||x||, eps) > eps in its own dtype."""
    backend = _backend_or_fallback(backend, monkeypatch)
    x = torch.randn(12, 8, dtype=dtype)
    x[2] *= 0.5 * eps / x[2].norm()
    x[5] *= 0.9 * eps / x[5].norm()
    check_against_oracle(x, backend, 1e-10 if dtype == torch.float64 and backend == "cpu" else 1e-5, eps=eps)


@pytest.mark.parametrize("backend", [*BACKENDS, "cpu_fallback", "reference"])
def test_one_feature_rows_normalise_to_exactly_plus_or_minus_one(monkeypatch, backend):
    """D = 1: F.normalize maps every row to exactly +-1 (x / |x| is exact in IEEE arithmetic), so
    rows of the same sign are ||1e-8|| apart and the gradient is exactly zero (the normalised
    rows do not move). Normalising by a reciprocal, x * (1 / |x|), left 14% of fp32 rows an ulp
    off +-1: distances of 6e-8 instead of 1e-8, a loss of 17.48 instead of 17.73 and gradient
    entries up to 0.29 (the fp32 reference's own autograd gives up to 1: its gradient is not
    checked)."""
    backend = _backend_or_fallback(backend, monkeypatch)
    x = torch.randn(40, 1)
    x[:2] = x[:2].abs()
    x[2:4] = -x[2:4].abs()  # both signs have neighbours
    x64 = x.double()
    want, want_idx = oracle(x64, 1e-8, 1)
    loss, grad, idx = run_backend(x, backend) if backend != "reference" else (koleo_loss_ref(x), None, None)
    assert abs(loss.item() - want.item()) < 1e-5 * want.item(), (loss.item(), want.item())
    if grad is not None:
        assert grad.abs().max().item() < 1e-6, grad.abs().max().item()
        if backend == "cpu":  # exact dots: ties go to the lowest index (the triton search scales x x^T by 1 / |x|)
            assert torch.equal(idx, want_idx)
        assert torch.equal(x[idx.flatten()].sign(), x.sign())  # a neighbour of the same sign


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf / inf
def test_nan_propagates(bad):
    """A NaN or an infinity in one row (an infinite row normalises to NaN) gives a NaN loss and
    non-finite gradient entries exactly where the reference's are."""
    x = torch.randn(8, 4)
    x[3, 1] = bad
    want = None
    for backend in ["reference", *BACKENDS]:
        x = x.detach().requires_grad_()
        loss = koleo_loss(x, backend=backend)
        loss.backward()
        assert torch.isnan(loss) and not torch.isfinite(x.grad).all(), backend
        if want is None:
            want = torch.isfinite(x.grad)
        assert torch.equal(torch.isfinite(x.grad), want), backend


@pytest.mark.parametrize("topk", [1, 2])
def test_cpu_pytorch_fallback_without_extension(monkeypatch, topk):
    """Without dinov3_fast._C the cpu backend runs its PyTorch formulation, with the same numbers."""
    from dinov3_fast.ops.koleo import cpu as koleo_cpu

    monkeypatch.setattr(koleo_cpu, "native", lambda: None)
    x = torch.randn(30, 16)
    x[20] = x[4]
    x[25] = x[4]
    check_against_oracle(x, "cpu", 1e-5, topk=topk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [1, 2])
def test_gradient_scaled_by_upstream_and_retained_graphs(backend, topk):
    """The backward applies the upstream gradient: a weighted loss, a retained graph backpropagated
    several times with different weights, and saved-tensor hooks all give the oracle's gradient
    times the weight, and a later backward leaves an earlier returned gradient alone (cpu:
    float64; triton computes in fp32)."""
    dtype = torch.float64 if backend == "cpu" else torch.float32
    tol = 1e-10 if backend == "cpu" else 1e-5
    x = torch.randn(23, 10, dtype=dtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    expected, = torch.autograd.grad(oracle(x64, 1e-8, topk)[0], x64)

    (koleo_loss(x, topk=topk, backend=backend) * 0.3 + x.sum() * 0).backward()
    assert rel_err(x.grad, 0.3 * expected) < tol

    loss = koleo_loss(x, topk=topk, backend=backend)
    first, = torch.autograd.grad(loss, x, retain_graph=True)
    kept = first.clone()
    doubled, = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    halved, = torch.autograd.grad(loss * 0.5, x)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)  # a later backward does not rescale it
    assert rel_err(first, expected) < tol
    assert rel_err(doubled, 2 * expected) < tol
    assert rel_err(halved, 0.5 * expected) < tol

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        loss = koleo_loss(x, topk=topk, backend=backend)
        a, = torch.autograd.grad(loss * 0.5, x, retain_graph=True)
        b, = torch.autograd.grad(loss, x)
    assert rel_err(a, 0.5 * expected) < tol
    assert rel_err(b, expected) < tol


@pytest.mark.parametrize("topk", [1, 2])
def test_gradcheck_cpu_float64(topk):
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: koleo_loss(a, topk=topk, backend="cpu"), (x,))


def test_cpu_search_native_equals_pytorch_formulation():
    from dinov3_fast.ops.koleo.cpu import search_native, search_torch

    y = F.normalize(torch.randn(300, 24), dim=-1)
    y[200] = y[7]
    y[250] = y[7]
    for q0, nq in ((0, 300), (100, 60)):  # symmetric (all rows) and row-range searches
        for topk in (1, 3):
            assert torch.equal(search_native(y, q0, nq, topk), search_torch(y, q0, nq, topk))


def _search_oracle(y: torch.Tensor, q0: int, nq: int, topk: int) -> torch.Tensor:
    """(nq, topk) neighbours by elementwise products summed per pair (float64), own entry -1, NaN
    above every number, ties to the lowest index (a stable sort)."""
    y = y.double()
    dots = (y[q0:q0 + nq, None, :] * y[None, :, :]).sum(-1)
    dots[torch.arange(nq), torch.arange(q0, q0 + nq)] = -1
    return torch.sort(dots.nan_to_num(nan=float("inf")), dim=1, descending=True, stable=True).indices[:, :topk]


def test_cpu_native_search_at_tile_edges():
    """The C++ search (64 x 64 tiles; register blocks of 6 or 3 rows by one 64-byte panel of packed
    columns; ragged edges re-read a row or read zero panel columns; rows that no value of a tile can
    enter skipped after a max) at sizes on and off every multiple, D = 1 (every dot is +-1: nothing
    but exact ties, so the lowest-index rule decides every neighbour), topk up to M, symmetric and
    row-range searches, with and without a NaN row (its dots rank above every number), in float64
    (exact against the oracle, whose dots are the same products summed in another order)."""
    from dinov3_fast.ops.koleo.cpu import search_native

    for M in (1, 2, 3, 5, 7, 63, 64, 65, 129):
        for D in (1, 3, 17):
            for nan_row in (False, True):
                y = F.normalize(torch.randn(M, D, dtype=torch.float64), dim=-1)
                if M > 5:
                    y[M - 1] = y[1]
                    y[M // 2] = y[1]
                if nan_row:
                    y[(2 * M) // 3, 0] = float("nan")
                for topk in sorted({1, 2, M - 1, M} & set(range(1, M + 1))):
                    for q0, nq in sorted({(0, M), (M // 2, M - M // 2), (M - 1, 1), (0, 0)}):
                        assert torch.equal(search_native(y, q0, nq, topk), _search_oracle(y, q0, nq, topk)), \
                            (M, D, nan_row, topk, q0, nq)


def test_cpu_native_baseline_kernel():
    """The C++ search compiles its tile kernel twice and picks one at run time: AVX2 + FMA where
    the CPU has both, else baseline x86-64 (or whatever the compiler targets). torch's own switch,
    ATEN_CPU_CAPABILITY=default, forces the baseline one: the search tests run again in a process
    that takes it (checked), so both kernels are tested on an AVX2 machine."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    which = "from dinov3_fast._ext import native; print(native().koleo_search_kernel())"
    out = subprocess.run([sys.executable, "-c", which], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "baseline"
    tests = "native_search_at_tile_edges or native_equals_pytorch or independent_of_thread_count"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0 and re.search(r"^3 passed", run.stdout, re.M), run.stdout[-3000:] + run.stderr[-3000:]


def test_cpu_native_results_independent_of_thread_count():
    """Neighbours, pair statistics and the gradient of the C++ path are bitwise the same at 1 and 2
    OpenMP threads and from run to run (the search merges per-thread lists under a total order;
    stats and backward own whole pairs and rows), with exact ties (copies), sizes off the tile,
    topk > 1 and a row-range search. The loss is a torch mean (its reduction may split by thread)."""
    from dinov3_fast.ops.koleo.cpu import koleo_bwd_cpu, koleo_fwd_cpu

    x = torch.randn(203, 19)
    x[150] = x[7]
    x[151] = x[7]
    x[80] = x[200]
    threads = torch.get_num_threads()
    try:
        for topk, q0, nq in ((1, 0, 203), (3, 0, 203), (2, 61, 100)):
            results = []
            for n_threads in (1, 2, 2, 1):
                torch.set_num_threads(n_threads)
                _, idx, stats, r = koleo_fwd_cpu(x, q0, nq, 1e-8, topk)
                dx = koleo_bwd_cpu(torch.tensor(0.7), x, idx, stats, r, q0, nq, 1e-8, topk)
                results.append((idx, stats, dx))
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    assert torch.equal(a, b), (topk, q0, nq)
    finally:
        torch.set_num_threads(threads)


def test_cpu_native_arguments_are_checked():
    """The C++ kernels read raw pointers: search_native copies a strided view (a column-major y was
    read in memory order: other neighbours) and refuses a dtype it would read as raw bytes (bf16 y
    was read as fp32, twice its buffer's size); the bindings refuse sizes they would index with."""
    from dinov3_fast._ext import native
    from dinov3_fast.ops.koleo.cpu import search_native

    y = F.normalize(torch.randn(50, 8), dim=-1)
    col_major = y.T.contiguous().T
    assert torch.equal(search_native(col_major, 0, 50, 2), search_native(y, 0, 50, 2))
    for bad in (y.bfloat16(), y.half(), y.to(torch.int64)):
        with pytest.raises(TypeError, match="native KoLeo kernels need a CPU tensor"):
            search_native(bad, 0, 50, 1)
    lib, ptr = native(), 0  # null: a size that slipped through crashes here rather than corrupting memory
    for call in (lambda: lib.koleo_search(ptr, 50, 8, 0, -1, 1, ptr, False),   # nq < 0
                 lambda: lib.koleo_search(ptr, 50, 0, 0, 50, 1, ptr, False),   # D = 0
                 lambda: lib.koleo_search(ptr, 50, 8, 40, 11, 1, ptr, False),  # q0 + nq > M
                 lambda: lib.koleo_pair_stats(ptr, 8, 0, 50, 0, ptr, ptr, False),  # topk = 0
                 lambda: lib.koleo_pair_stats(ptr, 8, -1, 50, 1, ptr, ptr, False),  # q0 < 0
                 lambda: lib.koleo_backward(ptr, ptr, 50, 8, 10, 41, 1, ptr, ptr, ptr, ptr, 1.0, 1e-8, ptr, False),
                 lambda: lib.koleo_backward(ptr, ptr, 50, 8, 0, 50, 51, ptr, ptr, ptr, ptr, 1.0, 1e-8, ptr, False)):
        with pytest.raises(ValueError, match="need"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_reads_strided_saved_tensors(backend):
    """A saved-tensor hook may unpack idx and stats as strided views of the same values (here: kept
    transposed); the C++ and Triton backwards read them in memory order (gradients off by 100% and
    170%)."""
    dtype = torch.float64 if backend == "cpu" else torch.float32
    x = torch.randn(40, 6, dtype=dtype, requires_grad=True)
    want, = torch.autograd.grad(koleo_loss(x, topk=2, backend=backend), x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.mT.contiguous() if t.dim() >= 2 else t,
                                                  lambda t: t.mT if t.dim() >= 2 else t):
        loss = koleo_loss(x, topk=2, backend=backend)
    got, = torch.autograd.grad(loss, x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_native_pair_offsets_past_int32():
    """Row offsets of the C++ kernels are int64: pair statistics of rows that start past 2^31
    elements (a sparse 8 GiB mapping; only the rows written and read get pages) match those of the
    same rows copied out. (The search reads every row, 38 s at this size: not run here.)"""
    import mmap

    import numpy as np
    from dinov3_fast._ext import native

    D, M = 1 << 14, (1 << 17) + 3  # rows M - 3 .. M - 1 start past 2^31 elements
    try:
        mapping = mmap.mmap(-1, M * D * 4)
    except (OSError, OverflowError, ValueError) as exc:
        pytest.skip(f"no 8 GiB virtual mapping here: {exc}")
    y = torch.from_numpy(np.frombuffer(mapping, dtype=np.float32)).view(M, D)
    y[M - 3:] = F.normalize(torch.randn(3, D), dim=-1)
    idx = torch.tensor([[M - 3, M - 2]])
    stats = torch.empty(3, 1, 2)
    native().koleo_pair_stats(y.data_ptr(), D, M - 1, 1, 2, idx.data_ptr(), stats.data_ptr(), False)
    small, small_idx = y[M - 3:].clone(), torch.tensor([[0, 1]])
    want = torch.empty(3, 1, 2)
    native().koleo_pair_stats(small.data_ptr(), D, 2, 1, 2, small_idx.data_ptr(), want.data_ptr(), False)
    assert torch.equal(stats, want)
    del y


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(9, 6, requires_grad=True)
    for q0, nq, topk in ((0, 9, 1), (3, 3, 2)):
        torch.library.opcheck(_koleo_fwd, (x, q0, nq, 1e-8, topk, backend))
        _, idx, stats, r = _koleo_fwd(x.detach(), q0, nq, 1e-8, topk, backend)
        torch.library.opcheck(_koleo_bwd, (torch.tensor(1.0), x.detach(), idx, stats, r, q0, nq, 1e-8, topk, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    def step(x):
        return koleo_loss(x, topk=2, backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(14, 8, requires_grad=True)
    out = compiled(x)
    out.backward()
    x_ref = x.detach().clone().requires_grad_()
    want = step(x_ref)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    x = torch.randn(8, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="koleo_loss has no double backward.*backend='reference'"):
        torch.autograd.grad(koleo_loss(x, backend=backend), x, create_graph=True)


def test_meta_tensors_give_a_meta_loss():
    """Meta tensors (shape-only planning) take the reference, whose autocast-off section must not
    ask torch.autocast for the meta device (it raises there)."""
    loss = koleo_loss(torch.randn(6, 4, device="meta", requires_grad=True))
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32 and loss.requires_grad


def test_modules_match_reference():
    x = torch.randn(16, 12)
    torch.testing.assert_close(dinov3_fast.KoLeoLoss()(x), koleo_loss_ref(x))
    torch.testing.assert_close(dinov3_fast.KoLeoLoss()(x, eps=1e-4), koleo_loss_ref(x, 1e-4))
    module = dinov3_fast.KoLeoLossDistributed(topk=3, loss_group_size=16)  # one process: the group is the batch
    torch.testing.assert_close(module(x), koleo_loss_ref(x, 1e-8, 3))


def test_dispatch_and_forcing(monkeypatch):
    x = torch.randn(6, 4)
    monkeypatch.setenv("DINOV3_FAST_BACKEND", "reference")
    torch.testing.assert_close(koleo_loss(x), koleo_loss_ref(x))
    with pytest.raises(ValueError, match="not implemented"):
        koleo_loss(x, backend="cuda")


@pytest.mark.parametrize("x,kwargs,error,match", [
    (torch.randn(1, 8), {}, ValueError, r"at least 2 samples.*got 1.*\(1, 8\)"),
    (torch.randn(0, 8), {}, ValueError, "at least 2 samples"),
    (torch.randn(8), {}, ValueError, r"x must be 2-D \(n, D\), got shape \(8,\)"),
    (torch.randn(2, 4, 8), {}, ValueError, r"x must be 2-D \(n, D\), got shape \(2, 4, 8\)"),
    (torch.ones(4, 8, dtype=torch.int64), {}, TypeError, "x must be a floating-point tensor.*int64"),
    (torch.randn(4, 0), {}, ValueError, "at least one feature"),
    (torch.randn(4, 8), {"topk": 0}, ValueError, "topk must be a positive int, got 0"),
    (torch.randn(4, 8), {"topk": 5}, ValueError, r"topk must be <= the 4 samples searched, got topk=5"),
    (torch.randn(4, 8), {"eps": 0.0}, ValueError, "eps must be > 0"),
    (torch.randn(4, 8), {"eps": torch.tensor(1e-8)}, TypeError, r"eps must be a Python float, got a tensor"),
    (torch.randn(4, 8), {"loss_group_size": 6}, ValueError, "Loss group size size 6 must be a multiple of local batch size 4"),
    (torch.randn(4, 8), {"loss_group_size": 8}, ValueError, "Global batch size 4 must be divisible by loss group size 8"),
    (torch.randn(4, 8), {"loss_group_size": 0}, ValueError, "loss_group_size must be None or a positive int, got 0"),
])
def test_bad_input_errors(x, kwargs, error, match):
    for backend in BACKENDS + ["reference"]:
        with pytest.raises(error, match=match):
            koleo_loss(x, backend=backend, **kwargs)


def test_cpu_backend_never_allocates_n_by_n():
    """The cpu backend stays O(n D + tile) in memory; the reference allocates the n x n dots."""
    from dinov3_fast.bench.memory import peak_extra_bytes

    n, D = 2048, 16
    x = torch.randn(n, D, requires_grad=True)
    dots_bytes = n * n * 4
    assert peak_extra_bytes(lambda: koleo_loss_ref(x).backward(), x.device) >= dots_bytes
    assert peak_extra_bytes(lambda: koleo_loss(x, backend="cpu").backward(), x.device) < dots_bytes / 8


def _oracle_on_device(x: torch.Tensor, topk: int, eps: float = 1e-8, chunk: int = 4096):
    """Float64 neighbours by row chunks (no n x n matrix), for GPU-sized n: (idx, best dots)."""
    y = F.normalize(x.double(), dim=-1, eps=eps)
    idx, best = [], []
    for c0 in range(0, y.shape[0], chunk):
        dots = y[c0:c0 + chunk] @ y.T
        rows = torch.arange(dots.shape[0], device=y.device)
        dots[rows, rows + c0] = -1
        v, i = torch.topk(dots, topk, dim=1)
        idx.append(i)
        best.append(v)
    return torch.cat(idx), torch.cat(best), y


@pytest.mark.gpu
@pytest.mark.parametrize("n,D,dtype,topk", [
    (2, 4096, torch.bfloat16, 1), (16, 4096, torch.bfloat16, 1), (33, 1024, torch.bfloat16, 2),
    (5000, 1024, torch.bfloat16, 1), (4100, 4096, torch.float16, 3), (16384, 1024, torch.bfloat16, 1),
    (65536, 64, torch.float32, 1), (3000, 384, torch.float32, 4)])
def test_gpu_triton_matches_float64(n, D, dtype, topk):
    """On the GPU, in bf16/fp16/fp32 up to n = 65,536: the chosen neighbours are maxima up to the
    kernel's rounding, and loss and gradient match the float64 evaluation with those neighbours.
    fp16 backpropagates a loss scale (a power of two that brings the largest gradient to [1, 2),
    as fp16 training does): the unscaled gradients of a mean over n points are below fp16's range."""
    x = torch.randn(n, D, device="cuda", dtype=dtype, requires_grad=True)
    loss = koleo_loss(x, topk=topk, backend="triton")
    idx = _koleo_fwd(x.detach(), 0, n, 1e-8, topk, "triton")[1]
    want_idx, want_best, y = _oracle_on_device(x.detach(), topk)
    got_dots = (y[:, None, :] * y[idx]).sum(-1).sort(dim=1, descending=True).values
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    assert (got_dots >= want_best - (2e-3 if tf32 else 1e-5)).all()  # every neighbour is a maximum
    assert (idx.sort(1).values == want_idx.sort(1).values).float().mean() > 0.999
    x64 = x.detach().double().requires_grad_()
    y64 = F.normalize(x64, dim=-1, eps=1e-8)
    d = F.pairwise_distance(y64[:, None, :].expand(-1, topk, -1), y64[idx], eps=1e-8)
    ref = -torch.log(d + 1e-8).mean()
    (ref_grad,) = torch.autograd.grad(ref, x64)
    scale = loss_scale(ref_grad) if dtype == torch.float16 else 1.0
    (grad,) = torch.autograd.grad(loss, x, loss.new_tensor(scale))
    ref_grad = ref_grad * scale
    tol = 1e-5 if dtype == torch.float32 and not tf32 else 1e-2
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.dtype == dtype
    assert abs(loss.item() - ref.item()) < tol * (torch.log(d + 1e-8).abs() + 1).mean().item()  # see check_against_oracle
    assert rel_err(grad, ref_grad) < tol


@pytest.mark.gpu
def test_gpu_fused_never_allocates_n_by_n():
    n, D = 16384, 1024
    x = torch.randn(n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    from dinov3_fast.bench.memory import peak_extra_bytes

    assert peak_extra_bytes(lambda: koleo_loss(x, backend="triton").backward(), x.device) < n * n * 4 / 16
