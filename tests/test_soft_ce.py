"""Soft-target cross-entropy: every backend against the float64 oracle, forward and backward."""
import pytest
import torch

from dinov3_fast.ops import soft_cross_entropy
from dinov3_fast.ops.soft_ce import _soft_ce_bwd, _soft_ce_fwd, soft_cross_entropy_ref
from oracle import rel_err

BACKENDS = ["cpu", "triton"]


def teacher_probs(shape, dtype=torch.float32):
    return torch.softmax(torch.randn(shape) * 3, dim=-1).to(dtype)


def check(student, teacher, backend, tol, weights=None, ignore_diagonal=False, temp=0.1, grad_tol=None):
    """Loss within tol of the float64 oracle; gradients within grad_tol (default tol)."""
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_()
    w64 = weights.detach().double().requires_grad_() if weights is not None else None
    ref = soft_cross_entropy_ref(s64, t64, temp, ignore_diagonal, w64)
    inputs = (s64, t64) + ((w64,) if w64 is not None else ())
    ref_grads = torch.autograd.grad(ref, inputs)
    s = student.detach().requires_grad_()
    t = teacher.detach().requires_grad_()
    w = weights.detach().requires_grad_() if weights is not None else None
    out = soft_cross_entropy(s, t, student_temp=temp, ignore_diagonal=ignore_diagonal, weights=w, backend=backend)
    grads = torch.autograd.grad(out, (s, t) + ((w,) if w is not None else ()))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert grads[0].dtype == student.dtype and grads[0].shape == student.shape
    assert rel_err(out, ref) < tol, (out.item(), ref.item())
    for name, g, r in zip(("student", "teacher", "weights"), grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel_err(g, r) < (grad_tol or tol), where_grad_errs(name, g, r, student)


def where_grad_errs(name, g, r, student):
    """Failure message: which row and element err most, and whether that element is its row's
    largest logit (the softmax's top entry) or not (the teacher term dominates there)."""
    err = (g.double() - r).reshape(-1, g.shape[-1])
    row_err = err.norm(dim=-1) / r.reshape(-1, r.shape[-1]).norm(dim=-1).clamp_min(1e-30)
    row = row_err.argmax().item()
    k = err[row].abs().argmax().item()
    top = student.reshape(-1, student.shape[-1])[row].argmax().item() if name == "student" else None
    return (f"{name} grad: rel err {rel_err(g, r):.2e}; worst row {row} ({row_err[row].item():.2e}); "
            f"worst element k={k}: {g.reshape(-1, g.shape[-1])[row, k].item():.6e} vs "
            f"{r.reshape(-1, r.shape[-1])[row, k].item():.6e}; the row's top logit is k={top}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,T,B,K", [(3, 2, 4, 300), (1, 1, 1, 1000), (2, 2, 3, 77), (10, 2, 2, 129)],
                         ids=["ragged", "B=1_k_split", "small", "dino_crops"])
@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_dino_form_matches_oracle(backend, S, T, B, K, ignore_diagonal):
    if ignore_diagonal and S == T == 1:
        pytest.skip("no pair left")
    check(torch.randn(S, B, K) * 2, teacher_probs((T, B, K)), backend, 1e-5, ignore_diagonal=ignore_diagonal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_diagonal_s_neq_t(backend):
    """S != T both ways: only the min(S, T) pairs s == t are skipped."""
    for S, T in ((4, 2), (2, 3)):
        check(torch.randn(S, 3, 200), teacher_probs((T, 3, 200)), backend, 1e-5, ignore_diagonal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_token_form(backend):
    """iBOT: (M, K) tokens with per-token weights (differentiable)."""
    M = 9
    check(torch.randn(M, 333) * 3, teacher_probs((M, 333)), backend, 1e-5, weights=torch.rand(M) / 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs(backend):
    check(torch.randn(2, 3, 250).half(), teacher_probs((2, 3, 250), torch.float16), backend, 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,grad_tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scale", [3.0, 3000.0])
def test_half_students_are_computed_in_fp32(backend, dtype, grad_tol, scale, interpreter_bf16_dots):
    """Half-precision logits are widened before anything else (fp16 12000 / 0.1 overflows): the
    loss is fp32-accurate, the gradient as accurate as its dtype (2^-11, 2^-8) allows."""
    student = (torch.randn(4, 5, 3000) * scale).to(dtype)
    check(student, teacher_probs((2, 5, 3000)), backend, 1e-5, ignore_diagonal=True, grad_tol=grad_tol)


def test_cpu_row_chunks(monkeypatch):
    """The cpu backend's chunked passes: one row per chunk, and chunks that do not divide B."""
    from dinov3_fast.ops.soft_ce import cpu

    student, teacher = torch.randn(3, 7, 130) * 5, teacher_probs((2, 7, 130))
    for elems in (1, 3 * 130 * 3, 130 * 2):  # forward rows hold S * K elements, backward rows K
        monkeypatch.setattr(cpu, "_CHUNK_ELEMS", elems)
        check(student, teacher, "cpu", 1e-5, ignore_diagonal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_are_stable(backend):
    """student / temp ~ 1000: the online max keeps every exp finite (fp32 reference would too,
    via log_softmax); no cancellation in the dot products. The loss is held to 1e-5. The student
    gradient is held to the rounding of x = student / temp itself, |x| * 2^-24 at the largest |x|
    (~4000 here), which every fp32 evaluation carries into the softmax: the fp32 reference erred
    as the backends do, over 1e-5 in about 1 draw in 100 (up to 2.8e-5, measured), so 1e-5 made
    the test flaky."""
    student = torch.randn(2, 2, 300) * 100
    grad_tol = max(1e-5, (student / 0.1).abs().max().item() * 2.0**-24)
    check(student, teacher_probs((2, 2, 300)), backend, 1e-5, grad_tol=grad_tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    base = torch.randn(2, 400, 3)
    student = base.transpose(1, 2)[:, :, ::2]  # (2, 3, 200), strided K
    teacher = teacher_probs((3, 2, 200)).transpose(0, 1)
    assert not student.is_contiguous() and not teacher.is_contiguous()
    check(student, teacher, backend, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_and_batch_strided_inputs_read_in_place(backend, triton_launches):
    """Logits and targets with unit stride along K but crop and batch strides other than a
    contiguous (S, B, K) tensor's ((B, S, K) tensors viewed crop-first) are read in place with
    their strides (test_non_contiguous's strided-K inputs are copied to contiguous first)."""
    S, T, B, K = 3, 2, 4, 300
    student = (torch.randn(B, S, K) * 2).transpose(0, 1)
    teacher = teacher_probs((B, T, K)).transpose(0, 1)
    assert student.stride() == (K, S * K, 1) and teacher.stride() == (K, T * K, 1)
    if backend == "triton":
        from dinov3_fast.ops.soft_ce import triton as soft_ce_triton
        launches = [triton_launches(soft_ce_triton, k) for k in ("_soft_ce_fwd_kernel", "_soft_ce_bwd_kernel")]
    check(student, teacher, backend, 1e-5, ignore_diagonal=True)
    if backend == "triton":  # forward and backward kernels read the caller's memory, not a copy
        assert all(launches) and all(args[0].data_ptr() == student.data_ptr() and args[0].stride() == student.stride()
                                     and args[1].data_ptr() == teacher.data_ptr()
                                     for calls in launches for args in calls)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_without_grad_gets_none(backend):
    s = torch.randn(2, 2, 50, requires_grad=True)
    t = teacher_probs((2, 2, 50))
    soft_cross_entropy(s, t, backend=backend).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf - inf
def test_nan_propagates(backend, bad):
    """A NaN or an infinite logit gives a non-finite loss, of the reference's kind: NaN for NaN and
    +inf (inf - inf in the log-softmax), +inf for -inf (its log-probability is -inf)."""
    s = torch.randn(2, 2, 60)
    s[1, 0, 5] = bad
    t = teacher_probs((2, 2, 60))
    ref = soft_cross_entropy(s, t, backend="reference")
    loss = soft_cross_entropy(s, t, backend=backend)
    assert not torch.isfinite(ref)
    assert torch.isnan(loss) == torch.isnan(ref) and torch.isinf(loss) == torch.isinf(ref), (loss, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cols", [slice(0, 256), slice(256, 512)], ids=["leading_tiles", "whole_split"])
@pytest.mark.parametrize("teacher_there", [True, False], ids=["teacher_mass", "teacher_zero"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: 0 * inf
def test_blocks_of_minus_inf_logits(backend, cols, teacher_there):
    """A run of -inf logits that fills whole tiles (the first tiles of a row, or a whole K split
    under the interpreter: 128-column tiles, 4 splits of 256 for one row) is a set of prototypes
    of probability 0, as a single -inf is: the loss is +inf where the teacher puts mass there and
    NaN (0 * -inf) where it does not, as the reference's, and the student gradient stays finite
    and equal to the reference's (the reference's is finite in both cases)."""
    s = torch.randn(1, 1, 1000)
    s[..., cols] = float("-inf")
    t = teacher_probs((1, 1, 1000))
    if not teacher_there:
        t[..., cols] = 0.0
    s64 = s.double().requires_grad_()
    ref = soft_cross_entropy_ref(s64, t.double())
    (ref_grad,) = torch.autograd.grad(ref, s64)
    s = s.requires_grad_()
    loss = soft_cross_entropy(s, t, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isnan(loss) == torch.isnan(ref) and torch.isinf(loss) == torch.isinf(ref), (loss, ref)
    assert torch.isfinite(ref_grad).all() and torch.isfinite(grad).all()
    assert rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    s = torch.randn(2, 3, 9, requires_grad=True)
    loss = soft_cross_entropy(s, teacher_probs((2, 3, 9)), backend=backend)
    with pytest.raises(RuntimeError, match="soft_cross_entropy has no double backward.*backend='reference'"):
        torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_fp32_loss_under_autocast(backend, ignore_diagonal):
    """Under autocast every backend returns the fp32 loss it returns without it (the reference's
    einsum would otherwise run in bf16)."""
    s, t = torch.randn(3, 4, 300), teacher_probs((2, 4, 300))
    want = soft_cross_entropy(s, t, ignore_diagonal=ignore_diagonal, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = soft_cross_entropy(s, t, ignore_diagonal=ignore_diagonal, backend=backend)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want)


def test_gradcheck_cpu_float64():
    s = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 2, 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: soft_cross_entropy(a, b, ignore_diagonal=True, weights=c, student_temp=0.5, backend="cpu"),
        (s, t, w))
    assert torch.autograd.gradcheck(lambda a, b: soft_cross_entropy(a, b, backend="cpu"), (s, t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("permuted", [False, True])
def test_opcheck(backend, permuted):
    """Fake impls agree with the real ones, also for a permuted (non-contiguous) student."""
    s = torch.randn(2, 3, 40).transpose(0, 1) if permuted else torch.randn(3, 2, 40)
    s.requires_grad_()
    t = teacher_probs((2, 2, 40)).requires_grad_()
    for ignore in (False, True):
        torch.library.opcheck(_soft_ce_fwd, (s, t, 0.1, ignore, backend))
        _, row_max, rest, a = _soft_ce_fwd(s.detach(), t.detach(), 0.1, ignore, backend)
        torch.library.opcheck(_soft_ce_bwd, (torch.rand(3, 2), s.detach(), t.detach(), row_max, rest, a, 0.1, ignore,
                                             backend, True, True))


def test_torch_compile_fullgraph():
    def step(s, t):
        return soft_cross_entropy(s, t, ignore_diagonal=True) * 2.0

    s = torch.randn(3, 2, 64, requires_grad=True)
    t = teacher_probs((2, 2, 64))
    out = torch.compile(step, fullgraph=True)(s, t)
    out.backward()
    s_ref = s.detach().clone().requires_grad_()
    step(s_ref, t).backward()
    torch.testing.assert_close(out, step(s_ref, t))
    torch.testing.assert_close(s.grad, s_ref.grad)


@pytest.mark.parametrize("student,teacher,kwargs,error,match", [
    (torch.randn(2, 3, 4), torch.rand(2, 3, 5), {}, ValueError, r"\(2, 3, 4\).*\(2, 3, 5\).*agree on B = 3 and K = 4"),
    (torch.randn(2, 3, 4), torch.rand(2, 2, 4), {}, ValueError, r"agree on B = 3 and K = 4"),
    (torch.randn(2, 3, 4), torch.rand(3, 4), {}, ValueError, r"teacher_probs must be 3-D \(T, B, K\)"),
    (torch.randn(4), torch.rand(4), {}, ValueError, "student_logits must be 2-D or 3-D"),
    (torch.randn(2, 3, 4), torch.rand(2, 3, 4), {"student_temp": 0.0}, ValueError, "student_temp must be > 0"),
    (torch.randn(2, 3, 4), torch.rand(2, 3, 4), {"student_temp": torch.tensor(0.1)}, TypeError,
     r"student_temp must be a Python float, got a tensor of shape \(\)"),
    (torch.randn(2, 3, 4).to(torch.float8_e5m2), torch.rand(2, 3, 4), {}, TypeError,
     r"student_logits must be a floating-point tensor \(float16, bfloat16, float32 or float64\), "
     r"got torch.float8_e5m2"),
    (torch.randn(2, 3, 4), torch.rand(2, 3, 4), {"weights": torch.rand(2)}, ValueError, r"weights must have shape \(3,\)"),
    (torch.randn(3, 4), torch.rand(3, 4), {"ignore_diagonal": True}, ValueError, "leaves no pair"),
    (torch.randn(0, 3, 4), torch.rand(0, 3, 4), {}, ValueError, "non-empty"),
    (torch.ones(2, 3, 4, dtype=torch.int64), torch.rand(2, 3, 4), {}, TypeError, "student_logits must be a floating"),
    (torch.randn(2, 3, 4), torch.rand(2, 3, 4), {"backend": "cuda"}, ValueError, "not implemented"),
])
def test_bad_input(student, teacher, kwargs, error, match):
    with pytest.raises(error, match=match):
        soft_cross_entropy(student, teacher, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,T,B,K,ignore_diagonal", [(10, 2, 16, 262144, True), (4, 4, 8, 100003, True),
                                                     (8, 2, 32, 65536, False)],
                         ids=["dino_7b", "T=4_ragged_K", "local_crops"])
def test_gpu_dino_shape(dtype, S, T, B, K, ignore_diagonal, poisoned_cuda_cache):
    """DINOv3 7B's DINO loss shape (K split over programs, many tiles per split: the running max
    grows mid-split), T = 4 teacher crops (smaller tiles) with K off every block size, and DINO's
    local-crop term (every student crop against every teacher crop, ignore_diagonal=False: 8 local
    crops against the 2 global teacher crops at ViT-L's K = 65,536, batch 32)."""
    s = (torch.randn(S, B, K, device="cuda") * 3).to(dtype)
    t = torch.softmax(torch.randn(T, B, K, device="cuda") * 3, -1)
    check(s, t, "triton", 1e-5 if dtype == torch.float32 else 1e-2, ignore_diagonal=ignore_diagonal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_ibot_token_form(dtype, poisoned_cuda_cache):
    """iBOT's form: M = 1001 masked tokens (M, K) at ViT-L's K = 65,536, with per-token weights of
    iBOT's size (1 / masked tokens of the image / images, ~1 / M), whose gradient is checked too."""
    M, K = 1001, 65536
    s = (torch.randn(M, K, device="cuda") * 3).to(dtype)
    t = torch.softmax(torch.randn(M, K, device="cuda") * 3, -1)
    w = torch.rand(M, device="cuda") * 2 / M
    check(s, t, "triton", 1e-5 if dtype == torch.float32 else 1e-2, weights=w)
