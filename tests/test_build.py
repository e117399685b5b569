"""Build and dispatch plumbing: the extension, its CUDA part, and backend reporting/forcing."""
import shutil

import pytest
import torch

import dinov3_fast
from dinov3_fast import _ext
from dinov3_fast.ops import _dispatch, gram_loss


def test_extension_is_built_with_openmp():
    mod = _ext.native()
    assert mod is not None, _ext.native_error()
    assert mod.build_info()["openmp"] is True


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA sources are not compiled here")
def test_cuda_kernels_compiled_when_nvcc_present():
    """CI has nvcc but no GPU: kernels/*.cu must still be compiled (sm_80, sm_90a, -Werror)."""
    info = _ext.native().build_info()
    assert info["cuda"] is True and "90a" in info["cuda_archs"]


def test_backends_report_reasons():
    report = dinov3_fast.backends("cpu")
    assert set(report) == set(_dispatch.BACKENDS)
    assert report["reference"]["available"] and report["cpu"]["available"]
    assert not report["cuda"]["available"] and "CUDA tensors" in report["cuda"]["reason"]


def test_missing_extension_degrades_to_other_backends(monkeypatch):
    monkeypatch.setattr(_ext, "_load", lambda: (None, "extension dinov3_fast._C not importable (test)"))
    ok, why = _dispatch.backend_status("cuda", "cuda")
    assert not ok and "not importable" in why
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    torch.testing.assert_close(gram_loss(s, t), gram_loss(s, t, backend="reference"))


def test_cuda_availability_is_a_constant_under_compile():
    """Dispatch on CUDA tensors asks whether the cuda backend is built (the extension's build info)
    inside traced code; torch.compile(fullgraph=True) must see a constant, not a call into _C."""
    fn = torch.compile(lambda x: x + _dispatch.backend_status("cuda", torch.device("cuda"))[0], fullgraph=True,
                       backend="eager")
    assert fn(torch.zeros(1)).item() == float(_ext.native_has_cuda())


def test_env_forcing_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("DINOV3_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="DINOV3_FAST_BACKEND=triton unavailable"):
        gram_loss(torch.randn(1, 4, 3), torch.randn(1, 4, 3))


def test_env_forcing_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("DINOV3_FAST_BACKEND", "tpu")
    with pytest.raises(ValueError, match="DINOV3_FAST_BACKEND must be one of"):
        gram_loss(torch.randn(1, 4, 3), torch.randn(1, 4, 3))
