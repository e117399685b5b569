"""Standalone fused RoPE (`apply_rope`): DINOv3's SelfAttention.apply_rope, forward and backward."""
import pytest
import torch

from dinov3_fast.ops import apply_rope
from dinov3_fast.ops.attention import _apply_rope_fwd, apply_rope_ref
from test_attention import BACKENDS, dinov3_rope, grid_for, random_rescale, rel_err


def qk_views(b, n, h, dh, dtype=torch.float32, device="cpu"):
    """q, k [B, H, N, Dh] as DINOv3 makes them: transposed views of the packed qkv output."""
    qkv = torch.randn(b, n, 3, h, dh, dtype=dtype, device=device)
    q, k, _ = (t.transpose(1, 2) for t in qkv.unbind(2))
    return q.detach().requires_grad_(), k.detach().requires_grad_()


def check_against_oracle(q, k, rope, backend, tol):
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    ref = apply_rope_ref(q64, k64, tuple(t.double() for t in rope))
    grads = [torch.randn_like(r) for r in ref]
    ref_g = torch.autograd.grad(ref, (q64, k64), grads)
    out = apply_rope(q, k, rope, backend=backend)
    got_g = torch.autograd.grad(out, (q, k), [g.to(q.dtype) for g in grads])
    for o, r, t in zip(out, ref, (q, k)):
        assert o.dtype == t.dtype and o.shape == t.shape and o.is_contiguous()
        assert rel_err(o, r) < tol
    for g, r in zip(got_g, ref_g):
        assert torch.isfinite(g).all() and rel_err(g, r) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("n,prefix", [(6, 5), (54, 5), (261, 5), (54, 0)])
def test_matches_oracle(backend, head_dim, n, prefix):
    q, k = qk_views(2, n, 3, head_dim)
    rope = dinov3_rope(*grid_for(n - prefix), head_dim, rescale=random_rescale())
    check_against_oracle(q, k, rope, backend, 1e-6)
    q16, k16 = (t.detach().half().requires_grad_() for t in (q, k))
    check_against_oracle(q16, k16, rope, backend, 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_inverse_rotation(backend):
    """DINOv3's tables are true rotations: the transposed rotation undoes the forward one."""
    q, k = qk_views(1, 21, 2, 64)
    rope = dinov3_rope(4, 4, 64, rescale=1.9)
    q_rot, k_rot = apply_rope(q, k, rope, backend=backend)
    back_q, back_k = torch.autograd.grad((q_rot, k_rot), (q, k), (q_rot, k_rot))
    assert rel_err(back_q, q) < 1e-6 and rel_err(back_k, k) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_stay_where_the_reference_puts_them(backend):
    """inf in a prefix (CLS/register) token passes through untouched, as in DINOv3, where only the
    patch tokens are rotated; in a patch token it spreads to its rotate-half partner. Same for the
    gradient. The pattern of inf and NaN matches the reference's, forward and backward."""
    q, k = qk_views(1, 9, 2, 32)
    with torch.no_grad():
        q[0, 1, 3, 6] = float("inf")    # prefix token 3 (tokens 0-4 are prefix)
        k[0, 0, 7, 20] = float("-inf")  # patch token 7
        q[0, 0, 2, 30] = float("nan")   # prefix token 2
    rope = dinov3_rope(2, 2, 32, rescale=random_rescale())
    grads = [torch.zeros(1, 2, 9, 32) for _ in range(2)]
    grads[0][0, 0, 4, 1] = float("inf")  # gradient at prefix token 4
    grads[1][0, 1, 6, 17] = float("inf")  # gradient at patch token 6

    def outputs(impl):
        if impl == "reference":
            out = apply_rope_ref(q, k, rope)
        else:
            out = apply_rope(q, k, rope, backend=impl)
        return (*out, *torch.autograd.grad(out, (q, k), grads))

    for got, want in zip(outputs(backend), outputs("reference")):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
        assert torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_tables_agree_to_their_dtype(backend):
    """fp32 q, k with bf16 tables: the reference rotates in bf16 (DINOv3's apply_rope casts q and k
    to the tables' dtype), the fused backends in fp32; they agree to bf16's tolerance, not fp32's,
    and the fused result is the one within fp32's tolerance of the float64 oracle on the same
    (bf16-valued) tables."""
    q, k = qk_views(2, 21, 2, 32)
    rope = tuple(t.bfloat16() for t in dinov3_rope(4, 4, 32, rescale=random_rescale()))
    out = apply_rope(q, k, rope, backend=backend)
    ref = apply_rope_ref(q, k, rope)
    oracle = apply_rope_ref(q.double(), k.double(), tuple(t.double() for t in rope))
    for o, r, o64 in zip(out, ref, oracle):
        assert 1e-5 < rel_err(o, r) < 1e-2 and rel_err(o, o64) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_requiring_grad_need_the_reference(backend):
    q, k = qk_views(1, 10, 2, 32)
    rope = tuple(t.requires_grad_() for t in dinov3_rope(3, 3, 32))
    with pytest.raises(ValueError, match=r"rope sin/cos require grad.*backend='reference'"):
        apply_rope(q, k, rope, backend=backend)
    sum(t.sum() for t in apply_rope(q, k, rope, backend="reference")).backward()
    assert all(t.grad is not None for t in rope)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    q, k = qk_views(1, 10, 2, 32)
    q_rot, _ = apply_rope(q, k, dinov3_rope(3, 3, 32), backend=backend)
    with pytest.raises(RuntimeError, match="apply_rope has no double backward.*backend='reference'"):
        torch.autograd.grad(q_rot.square().sum(), q, create_graph=True)


def test_gradcheck_cpu_float64():
    q, k = (t.double().detach().requires_grad_() for t in qk_views(2, 7, 2, 8))
    rope = tuple(torch.randn(4, 8, dtype=torch.float64) for _ in range(2))  # general tables, not rotations
    assert torch.autograd.gradcheck(lambda a, b: apply_rope(a, b, rope, backend="cpu"), (q, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k = qk_views(2, 9, 2, 32)
    sin, cos = dinov3_rope(2, 2, 32)
    torch.library.opcheck(_apply_rope_fwd, (q, k, sin, cos, backend))


def test_torch_compile_fullgraph():
    rope = dinov3_rope(2, 3, 32)
    q, k = qk_views(2, 11, 2, 32)

    def f(a, b):
        qa, kb = apply_rope(a, b, rope, backend="cpu")
        return (qa @ kb.transpose(-1, -2)).sum()

    out = torch.compile(f, fullgraph=True)(q, k)
    got = torch.autograd.grad(out, (q, k))
    want_out = f(q, k)
    want = torch.autograd.grad(want_out, (q, k))
    assert rel_err(out, want_out) < 1e-5 and all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))


def test_bad_input():
    q, k = qk_views(1, 10, 2, 64)
    rope = dinov3_rope(3, 3, 64)
    with pytest.raises(ValueError, match="HW = 9 rows but the sequence has only N = 8"):
        apply_rope(q[:, :, :8], k[:, :, :8], rope)
    with pytest.raises(ValueError, match="rope last dim must equal head_dim = 64"):
        apply_rope(q, k, dinov3_rope(3, 3, 32))
    with pytest.raises(ValueError, match="head_dim must be even"):
        apply_rope(q[..., :7], k[..., :7], (torch.zeros(9, 7), torch.zeros(9, 7)))
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        apply_rope(q, k[:, :1], rope)
    with pytest.raises(ValueError, match="q must be 4-D"):
        apply_rope(q[0], k[0], rope)
    with pytest.raises(TypeError, match="rope must be a"):
        apply_rope(q, k, None)
    with pytest.raises(ValueError, match="rope sin and q must be on the same device, got meta and cpu"):
        apply_rope(q, k, tuple(t.to("meta") for t in rope), backend="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_bf16(head_dim):
    q, k = qk_views(8, 261, 4, head_dim, torch.bfloat16, "cuda")
    rope = dinov3_rope(16, 16, head_dim, rescale=random_rescale(), device="cuda")
    check_against_oracle(q, k, rope, "triton", 1e-2)
