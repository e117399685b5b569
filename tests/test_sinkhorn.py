"""Sinkhorn-Knopp: every backend against the float64 oracle, overflow range, errors, compile."""
import pytest
import torch

import dinov3_fast
from dinov3_fast._ext import native_has_cuda
from dinov3_fast.ops import sinkhorn_knopp
from dinov3_fast.ops.sinkhorn import _sinkhorn_knopp_fwd, sinkhorn_knopp_ref
from oracle import rel_err

BACKENDS = ["cpu", "triton"]
# (backend, device): the CPU cases run everywhere (triton under the interpreter); the GPU cases
# cover both GPU backends, the cuda kernel being the default for teacher-sized inputs
BACKEND_DEVICES = [("cpu", "cpu"), ("triton", "cpu"),
                   pytest.param("triton", "cuda", marks=pytest.mark.gpu, id="triton-cuda"),
                   pytest.param("cuda", "cuda", marks=pytest.mark.gpu, id="cuda-cuda")]


def dinov3_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    """DINOv3's DINOLoss.sinkhorn_knopp_teacher, single process, statement by statement (float64)."""
    teacher_output = teacher_output.double()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1] * 1
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def log_domain_oracle(logits, temp, n_iterations=3):
    """float64 log-domain Sinkhorn: finite wherever the true assignment is (checked equal to the
    reference below where the reference is finite)."""
    y = logits.double() / temp
    beta = torch.zeros(y.shape[0], 1, dtype=torch.float64)
    for _ in range(n_iterations):
        a = -torch.logsumexp(y + beta, dim=0)
        beta = -torch.logsumexp(y + a, dim=1, keepdim=True)
    return torch.exp(y + a + beta)


def test_reference_is_dinov3():
    x = torch.randn(6, 50, dtype=torch.float64)
    for n in (1, 3):
        torch.testing.assert_close(sinkhorn_knopp_ref(x, 0.07, n), dinov3_sinkhorn(x, 0.07, n), rtol=1e-12, atol=0)
        torch.testing.assert_close(log_domain_oracle(x, 0.07, n), dinov3_sinkhorn(x, 0.07, n), rtol=1e-10, atol=0)


def test_constants_cancel():
    """B_total, K, sum Q and a per-prototype shift of the logits do not change the result: every
    normalisation is scale-invariant. This is why the fused backends skip them."""
    x = torch.randn(5, 40, dtype=torch.float64)
    want = sinkhorn_knopp_ref(x, 0.05)
    for n_samples in (1, 7, torch.tensor([123.0], dtype=torch.float64)):
        torch.testing.assert_close(sinkhorn_knopp_ref(x, 0.05, n_samples=n_samples), want, rtol=1e-12, atol=0)
    shifted = x - x.amax(0, keepdim=True) + torch.randn(1, 40, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn_knopp_ref(shifted, 0.05), want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", [(1, 77), (3, 300), (37, 100), (2, 1000), (16, 257)],
                         ids=["B=1", "ragged", "batch_split", "k_split", "B16"])
@pytest.mark.parametrize("n_iterations", [1, 3])
def test_matches_oracle_fp32(backend, device, shape, n_iterations):
    logits = torch.randn(shape) * 1.5
    temp = 0.07
    want = sinkhorn_knopp_ref(logits.double(), temp, n_iterations)
    out = sinkhorn_knopp(logits.to(device), temp, n_iterations=n_iterations, backend=backend).cpu()
    assert out.dtype == torch.float32 and out.shape == shape and torch.isfinite(out).all()
    assert rel_err(out, want) < 1e-5
    torch.testing.assert_close(out.sum(1), torch.ones(shape[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_many_prototypes_few_samples(backend, device):
    """K = 65,536 prototypes, B = 2 samples: after the first round each sample's mass is a sum of
    ~K/B equal terms. The cpu backend summed them in one BLAS matrix-vector product, whose few
    sequential accumulators round the same way on every term: 2.6e-5 relative error (rows off 1
    by 3e-5; 1.2e-4 at B=4, K=262,144), where DINOv3's own fp32 code errs ~1e-7."""
    logits = torch.randn(2, 65536)
    want = sinkhorn_knopp_ref(logits.double(), 0.07)
    out = sinkhorn_knopp(logits.to(device), 0.07, backend=backend).cpu()
    assert torch.isfinite(out).all() and rel_err(out, want) < 1e-5
    torch.testing.assert_close(out.double().sum(1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_fp16_input(backend, device):
    logits = torch.randn(4, 333).half()
    want = sinkhorn_knopp_ref(logits.double(), 0.04)
    assert rel_err(sinkhorn_knopp(logits.to(device), 0.04, backend=backend).cpu(), want) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_non_contiguous(backend, device):
    base = torch.randn(200, 6)
    for logits in (base.t(), base.t()[:, ::3]):
        assert not logits.is_contiguous()
        want = sinkhorn_knopp_ref(logits.double(), 0.1)
        assert rel_err(sinkhorn_knopp(logits.to(device), 0.1, backend=backend).cpu(), want) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("view", ["column_slice", "every_other_row"])
def test_row_strided_logits_read_in_place(backend, device, view, triton_launches):
    """Logits with unit stride along K and a row stride other than K (the first 300 prototypes of
    400, or every other sample) are read in place with their row stride (test_non_contiguous's
    transposed views are copied to contiguous first)."""
    base = torch.randn(6, 400, device=device) * 1.5
    logits = base[:, :300] if view == "column_slice" else base[::2]
    assert logits.stride() == ((400, 1) if view == "column_slice" else (800, 1))
    if backend == "triton":
        from dinov3_fast.ops.sinkhorn import triton as sinkhorn_triton
        launches = triton_launches(sinkhorn_triton, "_sinkhorn_write_kernel")
    want = sinkhorn_knopp_ref(logits.double(), 0.1)
    out = sinkhorn_knopp(logits, 0.1, backend=backend)
    assert out.shape == logits.shape and torch.isfinite(out).all()
    assert rel_err(out.cpu(), want.cpu()) < 1e-5
    if backend == "triton":  # the kernels read the caller's memory, not a contiguous copy
        assert launches and all(args[0].data_ptr() == logits.data_ptr() and args[0].stride() == logits.stride()
                                for args in launches)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_finite_where_fp32_reference_overflows(backend, device):
    """logits / temp up to ~350: exp overflows fp32 (the DINOv3 code returns NaN) but not float64,
    so the plain float64 reference is the oracle."""
    logits = torch.randn(8, 500) * 3.0 + 4.0
    temp = 0.04
    assert (logits / temp).max() > 100
    assert torch.isnan(sinkhorn_knopp_ref(logits, temp)).any()  # fp32 DINOv3 code fails here
    want = sinkhorn_knopp_ref(logits.double(), temp)
    assert torch.isfinite(want).all()
    out = sinkhorn_knopp(logits.to(device), temp, backend=backend).cpu()
    assert torch.isfinite(out).all() and rel_err(out, want) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_finite_beyond_float64_range(backend, device):
    """logits / temp ~ 2000: float64 overflows too. The oracle is the float64 reference on
    per-prototype-shifted logits (the shift cancels exactly, test_constants_cancel) and the
    log-domain oracle, which agree. At |logits / temp| ~ 2000 any fp32 evaluation errs by about
    |y| * 2^-24 relative (the rounding of y itself), so the tolerance scales with it."""
    logits = torch.randn(6, 300) * 30.0
    temp = 0.04
    assert torch.isnan(sinkhorn_knopp_ref(logits.double(), temp)).any()
    want = sinkhorn_knopp_ref((logits - logits.amax(0, keepdim=True)).double(), temp)
    torch.testing.assert_close(log_domain_oracle(logits, temp), want, rtol=1e-8, atol=1e-12)
    out = sinkhorn_knopp(logits.to(device), temp, backend=backend).cpu()
    tol = 2 * (logits / temp).abs().max().item() * 2.0**-24
    assert 1e-5 < tol < 1e-3
    assert torch.isfinite(out).all() and rel_err(out, want) < tol


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_dominated_sample_stays_finite(backend, device):
    """A sample beaten by > 100 / temp nats in every prototype: exp underflows for it even after
    a per-prototype shift, and any linear-domain scheme divides 0 by 0. Log-domain potentials keep
    its row a proper distribution."""
    logits = torch.randn(5, 256)
    logits[2] = logits[[0, 1, 3, 4]].amax(0) - 5.0 - torch.rand(256)
    temp = 0.04
    want = log_domain_oracle(logits, temp)
    assert torch.isnan(sinkhorn_knopp_ref(logits - logits.amax(0, keepdim=True), temp)).any()  # shift alone
    out = sinkhorn_knopp(logits.to(device), temp, backend=backend).cpu()
    assert torch.isfinite(out).all() and rel_err(out, want) < 1e-5
    assert rel_err(out[2], want[2]) < 1e-5


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_cpu_non_finite_scaling_result_falls_back_to_log_domain(monkeypatch, bad):
    """The cpu scaling form's last guard: a non-finite entry in its result (inf from u * v past
    fp32's range, with every sample mass in range) sends the call to the log domain."""
    from dinov3_fast.ops.sinkhorn import cpu

    scaling = cpu._sinkhorn_scaling

    def poisoned(*args):
        out = scaling(*args)
        out[1, 3] = bad
        return out

    monkeypatch.setattr(cpu, "_sinkhorn_scaling", poisoned)
    logits = torch.randn(4, 100)
    out = sinkhorn_knopp(logits, 0.07, backend="cpu")
    assert torch.isfinite(out).all() and rel_err(out, log_domain_oracle(logits, 0.07)) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf - inf
def test_nan_propagates(backend, device, bad):
    """Non-finite entries exactly where the float64 reference's are: a NaN or +inf logit spreads to
    the whole assignment (through the global and per-prototype sums); a -inf logit is a
    prototype the sample cannot take (probability 0), and everything stays finite and accurate."""
    logits = torch.randn(4, 100)
    logits[1, 7] = bad
    want = sinkhorn_knopp_ref(logits.double(), 0.07)
    out = sinkhorn_knopp(logits.to(device), 0.07, backend=backend).cpu()
    assert torch.isfinite(want).all() == (bad == float("-inf"))
    assert torch.equal(torch.isfinite(out), torch.isfinite(want))
    if bad == float("-inf"):
        assert out[1, 7] == 0 and rel_err(out, want) < 1e-5


def test_n_samples_accepted_by_every_backend():
    logits = torch.randn(3, 64)
    want = sinkhorn_knopp_ref(logits.double(), 0.07)
    for backend in BACKENDS + ["reference"]:
        for n in (None, 3, torch.tensor([3])):
            assert rel_err(sinkhorn_knopp(logits, 0.07, n_samples=n, backend=backend), want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_empty_input(backend):
    """No row on this rank (iBOT with no masked patch), single process: an empty (0, K) result,
    whatever the (global) count says, with no division by it."""
    for n in (None, 0, torch.tensor([0])):
        out = sinkhorn_knopp(torch.randn(0, 64), 0.07, n_samples=n, backend=backend)
        assert out.shape == (0, 64) and out.dtype == torch.float32
    if backend != "triton":
        assert sinkhorn_knopp(torch.randn(0, 64, dtype=torch.float64), 0.07, backend=backend).dtype == torch.float64
    n_masked = torch.tensor([0])
    out = dinov3_fast.SinkhornKnoppTeacher(backend=backend)(torch.randn(0, 64), 0.07, n_masked)
    assert out.shape == (0, 64) and n_masked.item() == 0


def test_no_grad():
    logits = torch.randn(3, 64, requires_grad=True)
    assert not sinkhorn_knopp(logits, 0.07).requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.library.opcheck(_sinkhorn_knopp_fwd, (torch.randn(3, 50), 0.07, 3, backend))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph(device):
    """Default dispatch under torch.compile, on CUDA too (where it asks for the cuda kernel)."""
    def step(x):
        return sinkhorn_knopp(x, 0.05) * 2.0

    x = torch.randn(4, 96, device=device)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))


def test_tensor_temperature_under_torch_compile_names_the_argument():
    """Temperatures are Python floats (the custom op's schema): a tensor is refused with the same
    message under torch.compile as in eager, not a data-dependent guard error."""
    compiled = torch.compile(lambda x, t: sinkhorn_knopp(x, t), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="teacher_temp must be a Python float"):
        compiled(torch.randn(4, 7), torch.tensor(0.07))


def test_torch_compile_takes_triton_availability_as_a_constant(monkeypatch):
    """Dispatch asks whether triton imports (a cached answer); torch.compile takes it as a constant
    instead of tracing through the cache, which it warns about."""
    import warnings

    import torch._dynamo.utils

    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # dynamo warns once per process
    x = torch.randn(4, 7)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache")
        out = torch.compile(lambda t: sinkhorn_knopp(t, 0.05, backend="triton"), fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, sinkhorn_knopp(x, 0.05, backend="triton"))


def test_module_drop_in():
    logits = torch.randn(5, 70)
    mod = dinov3_fast.SinkhornKnoppTeacher()
    n_masked = torch.tensor([5])
    out = mod(logits, 0.07, n_masked, n_iterations=3)
    assert rel_err(out, sinkhorn_knopp_ref(logits.double(), 0.07)) < 1e-5
    assert n_masked.item() == 5  # no process group: left alone


@pytest.mark.parametrize("kwargs,error,match", [
    ({"logits": torch.randn(3, 4), "teacher_temp": 0.0}, ValueError, "teacher_temp must be > 0, got 0.0"),
    ({"logits": torch.randn(3, 4), "teacher_temp": -0.1}, ValueError, "teacher_temp must be > 0"),
    ({"logits": torch.randn(3, 4), "teacher_temp": torch.tensor(0.07)}, TypeError,
     r"teacher_temp must be a Python float, got a tensor of shape \(\); pass float\(teacher_temp\)"),
    ({"logits": torch.randn(2, 3, 4)}, ValueError, r"teacher_logits must be 2-D \(B, K\), got shape \(2, 3, 4\)"),
    ({"logits": torch.randn(4)}, ValueError, "teacher_logits must be 2-D"),
    ({"logits": torch.randn(3, 0)}, ValueError, r"teacher_logits must have K >= 1 prototypes, got shape \(3, 0\)"),
    ({"logits": torch.randn(0, 4, 2)}, ValueError, r"teacher_logits must be 2-D \(B, K\), got shape \(0, 4, 2\)"),
    ({"logits": torch.ones(0, 4, dtype=torch.int32)}, TypeError, "teacher_logits must be a floating-point.*int32"),
    ({"logits": torch.ones(3, 4, dtype=torch.int32)}, TypeError, "floating-point.*int32"),
    ({"n_iterations": 0}, ValueError, "n_iterations must be >= 1, got 0"),
    ({"n_iterations": 2.0}, TypeError, "n_iterations must be an int"),
    ({"n_samples": torch.ones(2)}, ValueError, "n_samples must be an int or a 1-element tensor"),
    ({"n_samples": 0}, ValueError, "n_samples must be >= 1"),
    ({"logits": torch.randn(0, 4), "n_samples": -1}, ValueError, "n_samples must be >= 0"),
    ({"n_samples": torch.tensor([0])}, ValueError, "n_samples must be >= 1 .*got 0"),
    ({"logits": torch.randn(0, 4), "n_samples": torch.tensor([-1])}, ValueError, "n_samples must be >= 0"),
    ({"backend": "tpu"}, ValueError, "backend must be one of"),
    ({"group": "x"}, TypeError, "group must be a torch.distributed ProcessGroup or None, got str"),
])
def test_bad_input(kwargs, error, match):
    logits = kwargs.pop("logits", torch.randn(3, 4))
    temp = kwargs.pop("teacher_temp", 0.07)
    with pytest.raises(error, match=match):
        sinkhorn_knopp(logits, temp, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_n_samples_tensor_value_checked_on_cpu(backend):
    """A CPU tensor count is checked as an int is (the reference backend divided by it: all NaN)."""
    for n in (0, torch.tensor([0]), torch.tensor([0.0])):
        with pytest.raises(ValueError, match="n_samples must be >= 1"):
            sinkhorn_knopp(torch.randn(3, 8), 0.1, n_samples=n, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_n_samples_any_one_element_tensor(backend):
    """Every 1-element count the checks accept is used, whatever its shape or real dtype: the
    reference backend divided the (K, B) matrix in place by a (1, 1, 1) tensor and raised torch's
    broadcast error."""
    logits = torch.randn(3, 40)
    want = sinkhorn_knopp_ref(logits.double(), 0.07)
    for n in (torch.tensor(3), torch.tensor([[[3]]]), torch.tensor([3], dtype=torch.int32), torch.tensor([3.0])):
        assert rel_err(sinkhorn_knopp(logits, 0.07, n_samples=n, backend=backend), want) < 1e-5


def test_n_samples_complex_tensor_named():
    with pytest.raises(TypeError, match="n_samples must be an integer or floating-point tensor, got torch.complex64"):
        sinkhorn_knopp(torch.randn(3, 8), 0.1, n_samples=torch.tensor([3 + 0j]))


def test_n_samples_device_tensor_value_not_read():
    """Off the CPU only the size is checked: reading a CUDA tensor's value would sync the host
    (a meta tensor stands in for it; the fused backends never read it)."""
    logits = torch.randn(3, 8)
    out = sinkhorn_knopp(logits, 0.1, n_samples=torch.zeros(1, device="meta"), backend="cpu")
    assert rel_err(out, sinkhorn_knopp_ref(logits.double(), 0.1)) < 1e-5
    with pytest.raises(ValueError, match="1-element tensor"):
        sinkhorn_knopp(logits, 0.1, n_samples=torch.zeros(2, device="meta"), backend="cpu")


def test_cuda_backend_needs_cuda_tensors():
    accepted = r"choose from \('cpu', 'triton', 'reference'\)"  # "reference" is always accepted
    with pytest.raises(ValueError, match=f"not implemented for cpu tensors; {accepted}"):
        sinkhorn_knopp(torch.randn(3, 4), 0.07, backend="cuda")


@pytest.mark.skipif(not native_has_cuda(), reason="dinov3_fast._C was built without nvcc")
def test_dispatch_batch_limit_is_the_kernels():
    from dinov3_fast._ext import native
    from dinov3_fast.ops.sinkhorn import CUDA_MAX_BATCH
    assert CUDA_MAX_BATCH == native().sinkhorn_max_batch()


@pytest.mark.skipif(not native_has_cuda(), reason="dinov3_fast._C was built without nvcc")
def test_cuda_launcher_refuses_bad_sizes_before_any_device_call():
    """B = 0 and K = 0 reached a division by zero in the launcher's plan (a host SIGFPE on a GPU
    machine), n_iter < 1 returned the uninitialised workspace: each is now cudaErrorInvalidValue,
    checked before any CUDA call (which is why this runs without a GPU too)."""
    from dinov3_fast._ext import native

    mod = native()
    for B, K in ((0, 8), (4, 0), (mod.sinkhorn_max_batch() + 1, 8), (-1, 8)):
        with pytest.raises(RuntimeError, match="invalid argument"):
            mod.sinkhorn_workspace_bytes(B, K, 0, 0)
    ptr = 256  # never dereferenced: the arguments are refused first
    for x, B, K, stride_b, n_iter in ((ptr, 0, 8, 8, 3), (ptr, 4, 0, 0, 3), (ptr, 4, 8, 8, 0), (ptr, 4, 8, -1, 3),
                                      (0, 4, 8, 8, 3)):
        with pytest.raises(RuntimeError, match="invalid argument"):
            mod.sinkhorn_knopp_cuda(x, 0, ptr, ptr, 1 << 20, B, K, stride_b, 1.0, n_iter, 0, 0)


def test_cuda_launcher_returns_empty_without_rows(monkeypatch):
    """No row (B = 0): an empty result without calling the extension, whose plan divides by B
    (a meta tensor stands in for a CUDA one)."""
    from dinov3_fast.ops.sinkhorn import cuda as sinkhorn_cuda_module

    monkeypatch.setattr(sinkhorn_cuda_module, "native", lambda: pytest.fail("the extension was called with B = 0"))
    out = sinkhorn_cuda_module.sinkhorn_cuda(torch.empty(0, 64, dtype=torch.bfloat16, device="meta"), 0.07, 3)
    assert out.shape == (0, 64) and out.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_launcher_leaves_the_current_device_alone():
    """The launcher makes the tensor's device current for its queries and launch, then restores the
    caller's: called directly (outside the op's device context) on cuda:1 from cuda:0, its bare
    cudaSetDevice(1) was never undone, and the workspace was sized with cuda:0's occupancy. Not
    yet run on a GPU."""
    if not native_has_cuda() or torch.cuda.device_count() < 2:
        pytest.skip("needs the CUDA kernels and two GPUs")
    from dinov3_fast.ops.sinkhorn.cuda import sinkhorn_cuda

    logits = torch.randn(8, 1000, device="cuda:1")
    with torch.cuda.device(0):
        out = sinkhorn_cuda(logits, 0.07, 3)
        assert torch.cuda.current_device() == 0
    assert out.device == logits.device
    assert rel_err(out, sinkhorn_knopp_ref(logits.double(), 0.07)) < 1e-5


@pytest.mark.parametrize("shape,dtype,group,cuda_first", [
    ((32, 262144), torch.float32, None, True), ((2048, 1024), torch.bfloat16, None, True),
    ((2049, 1024), torch.float32, None, False), ((512, 98305), torch.float32, None, False),
    ((32, 1024), torch.float64, None, False), ((32, 1024), torch.float32, "group", False)])
def test_dispatch_prefers_cuda_only_where_it_is_faster_and_able(shape, dtype, group, cuda_first):
    """cuda first up to CUDA_MAX_NUMEL elements (the measured crossover), within its batch limit,
    never for fp64 or with a process group; triton otherwise."""
    from dinov3_fast.ops.sinkhorn import _cuda_first
    assert _cuda_first(torch.empty(shape, dtype=dtype, device="meta"), group) is cuda_first


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 262144), (1, 1000), (37, 4099), (1274, 98304)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_matches_reference_and_triton(shape, dtype):
    if not native_has_cuda():
        pytest.skip("dinov3_fast._C was built without the CUDA kernels")
    logits = (torch.randn(shape, device="cuda") * 2.0).to(dtype)
    want = sinkhorn_knopp_ref(logits.double(), 0.04)
    out_cuda = sinkhorn_knopp(logits, 0.04, backend="cuda")
    out_triton = sinkhorn_knopp(logits, 0.04, backend="triton")
    assert torch.isfinite(out_cuda).all()
    assert rel_err(out_cuda, want) < 1e-5 and rel_err(out_triton, want) < 1e-5
    assert rel_err(out_cuda, out_triton.double()) < 1e-5
