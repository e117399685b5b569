"""Fused head last layer + soft cross-entropy: every backend against the float64 oracle (the unfused
Linear + loss), forward and backward, chunked or not; against the unfused composition in bf16."""
import pytest
import torch
import torch.nn.functional as F

from dinov3_fast.ops.linear_soft_ce import linear_soft_cross_entropy, linear_soft_cross_entropy_ref
from dinov3_fast.ops.soft_ce import soft_cross_entropy
from dinov3_fast.ops.soft_ce.reference import soft_cross_entropy_ref
from oracle import rel_err

BACKENDS = ["cpu", "triton"]


def teacher_probs(shape, dtype=torch.float32):
    return torch.softmax(torch.randn(shape) * 3, dim=-1).to(dtype)


def head_inputs(features_shape, num_classes, dtype=torch.float32):
    """Normalised bottleneck features and a last-layer weight whose logits are O(1)-O(10), as a
    trained DINO head's are."""
    features = F.normalize(torch.randn(features_shape), dim=-1).to(dtype)
    weight = (torch.randn(num_classes, features_shape[-1]) * 2).to(dtype)
    return features, weight


def fused_grads(features, weight, teacher, backend, upstream=2.5, **kwargs):
    """(upstream * loss, d features, d weight) through the fused op."""
    f, w = features.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = linear_soft_cross_entropy(f, w, teacher, backend=backend, **kwargs)
    (upstream * loss).backward()
    return loss.detach() * upstream, f.grad, w.grad


def oracle_grads(features, weight, teacher, upstream=2.5, weights=None, max_chunk_logits=None, **kwargs):
    f, w = features.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss = linear_soft_cross_entropy_ref(f, w, teacher.double(), weights=None if weights is None else weights.double(),
                                         **kwargs) * upstream
    return (loss.detach(), *torch.autograd.grad(loss, (f, w)))


def check_against_oracle(features, weight, teacher, backend, tol, **kwargs):
    got = fused_grads(features, weight, teacher, backend, **kwargs)
    want = oracle_grads(features, weight, teacher, **kwargs)
    assert got[1].dtype == features.dtype and got[2].dtype == weight.dtype
    for name, g, r in zip(("loss", "d features", "d weight"), got, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,T,B,d,K", [(3, 2, 5, 16, 37), (10, 2, 3, 8, 129), (1, 1, 1, 24, 70)],
                         ids=["ragged", "dino_crops", "one_image"])
@pytest.mark.parametrize("ignore_diagonal", [False, True])
@pytest.mark.parametrize("max_chunk_logits", [1, 2**26], ids=["one_image_per_chunk", "one_chunk"])
def test_dino_form_matches_oracle(backend, S, T, B, d, K, ignore_diagonal, max_chunk_logits):
    if ignore_diagonal and S == T == 1:
        pytest.skip("no pair left to average with ignore_diagonal and one crop each")
    features, weight = head_inputs((S, B, d), K)
    check_against_oracle(features, weight, teacher_probs((T, B, K)), backend, 1e-5, ignore_diagonal=ignore_diagonal,
                         max_chunk_logits=max_chunk_logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_token_form_matches_oracle(backend):
    """iBOT: (M, d) masked tokens with per-token weights, in chunks of 4 tokens (M not a multiple)."""
    M, d, K = 11, 16, 53
    features, weight = head_inputs((M, d), K)
    check_against_oracle(features, weight, teacher_probs((M, K)), backend, 1e-5, weights=torch.rand(M) / 4,
                         max_chunk_logits=4 * K)


def test_non_contiguous_inputs():
    features, weight = head_inputs((7, 2, 16), 40)
    teacher = teacher_probs((7, 2, 40)).transpose(0, 1)  # (T, B, K) = (2, 7, 40) view
    check_against_oracle(features.transpose(0, 1), weight.T.contiguous().T, teacher, "cpu", 1e-5,
                         max_chunk_logits=50)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_equals_the_unfused_linear_and_loss(backend, dtype):
    """In half precision the fused op is the unfused composition (the Linear's logits in the input
    dtype, then soft_cross_entropy) up to summation order: the logits round alike, and the weight
    gradient sums per-chunk products in fp32."""
    features, weight = head_inputs((4, 6, 32), 96, dtype)
    teacher = teacher_probs((2, 6, 96))
    got = fused_grads(features, weight, teacher, backend, ignore_diagonal=True, max_chunk_logits=2 * 4 * 96)
    f, w = features.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = 2.5 * soft_cross_entropy(F.linear(f, w), teacher, ignore_diagonal=True, backend=backend)
    want = (loss.detach(), *torch.autograd.grad(loss, (f, w)))
    for name, g, r, tol in zip(("loss", "d features", "d weight"), got, want, (1e-5, 1e-2, 1e-2)):
        assert g.dtype == r.dtype and rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_gradients_survive_a_loss_scale(backend):
    """fp16 gradients are formed in fp32 until the upstream gradient (a loss scale) is applied: formed
    in fp16 at upstream 1, iBOT-sized per-token weights (1/7500) flushed most weight-gradient
    entries to zero."""
    M, d, K = 8, 16, 32768
    features, weight = head_inputs((M, d), K, torch.float16)
    teacher, weights = teacher_probs((M, K)), torch.full((M,), 1 / 7500)
    got = fused_grads(features, weight, teacher, backend, upstream=2.0**16, weights=weights)
    want = oracle_grads_half_logits(features, weight, teacher, upstream=2.0**16, weights=weights)
    # the loss in fp32 (measured <= 2e-6 over 40 draws); the gradients land in the fp16 leaves' .grad,
    # whose rounding alone is up to 2^-11 = 4.9e-4 in norm (measured <= 2.4e-4)
    for name, g, r, tol in zip(("loss", "d features", "d weight"), got, want, (2e-5, 1e-3, 1e-3)):
        assert rel_err(g, r) < tol, (name, rel_err(g, r))
    assert (got[2] == 0).float().mean() < 0.01


def oracle_grads_half_logits(features, weight, teacher, upstream, weights=None, ignore_diagonal=False):
    """The float64 oracle with the logits rounded to the features' (half) dtype, as the op's Linear
    rounds them (the gradient passes the rounding straight through, as the op's does). Against the
    unrounded oracle the gradients differ by ~0.5% in fp16 from that rounding alone (logits up to
    ~10, fp16 ulp 2^-7 there), and by ~2-3% in bf16 (ulp 2^-4), over the 1e-2 bound."""
    f, w = features.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = F.linear(f, w)
    logits = exact + (exact.detach().to(features.dtype).double() - exact.detach())
    loss = soft_cross_entropy_ref(logits, teacher.double(), ignore_diagonal=ignore_diagonal,
                                  weights=None if weights is None else weights.double()) * upstream
    return (loss.detach(), *torch.autograd.grad(loss, (f, w)))


def test_under_autocast_the_operands_take_the_autocast_dtype():
    """Under CPU autocast the head's normalised bottleneck arrives in bf16 (autocast does not upcast
    norm there) beside an fp32 weight: both go to the autocast dtype, as the Linear's would."""
    features, weight = head_inputs((2, 3, 16), 40)
    teacher = teacher_probs((2, 3, 40))
    f, w = features.bfloat16().requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_soft_cross_entropy(f, w, teacher, ignore_diagonal=True, backend="cpu")
        ref = soft_cross_entropy(F.linear(f, w), teacher, ignore_diagonal=True, backend="cpu")
    grads, ref_grads = torch.autograd.grad(loss, (f, w)), torch.autograd.grad(ref, (f, w))
    assert rel_err(loss, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and rel_err(g, r) < 1e-2


def test_reference_loss_is_fp32_under_autocast():
    """The reference forms the logits in the autocast dtype, as the Linear would, and reduces them
    in fp32 as the fused backends do."""
    features, weight = head_inputs((2, 3, 16), 300)
    teacher = teacher_probs((2, 3, 300))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_soft_cross_entropy(features, weight, teacher, backend="reference")
    want = soft_cross_entropy_ref(F.linear(features.bfloat16(), weight.bfloat16()), teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want)


def test_gradients_are_released_with_the_graph():
    """The gradients formed in the forward are saved tensors: a backward without retain_graph frees
    them (they do not outlive the heads' backward into the backbone's), so a second one is refused."""
    features, weight = head_inputs((2, 3, 8), 20)
    loss = linear_soft_cross_entropy(features.requires_grad_(), weight.requires_grad_(), teacher_probs((2, 3, 20)),
                                     backend="cpu")
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_float64_gradcheck():
    features, weight = head_inputs((2, 3, 5), 7, torch.float64)
    teacher = teacher_probs((2, 3, 7), torch.float64)

    def fn(f, w):
        return linear_soft_cross_entropy(f, w, teacher, ignore_diagonal=True, max_chunk_logits=14, backend="cpu")

    assert torch.autograd.gradcheck(fn, (features.requires_grad_(), weight.requires_grad_()))


@pytest.mark.parametrize("frozen", ["weight", "features", "both"])
def test_only_the_needed_gradients_are_formed(frozen):
    """A frozen last layer (DINOv3 freezes it for the first epoch) gets no gradient and the
    features still get theirs; with nothing to differentiate only the loss is computed."""
    features, weight = head_inputs((2, 3, 8), 20)
    teacher = teacher_probs((2, 3, 20))
    f = features.requires_grad_(frozen not in ("features", "both"))
    w = weight.requires_grad_(frozen not in ("weight", "both"))
    loss = linear_soft_cross_entropy(f, w, teacher, backend="cpu")
    ref = linear_soft_cross_entropy_ref(features.detach().double(), weight.detach().double(), teacher.double())
    assert rel_err(loss, ref) < 1e-5
    if frozen == "both":
        assert not loss.requires_grad
        return
    loss.backward()
    assert (f.grad is None) == (frozen == "features") and (w.grad is None) == (frozen == "weight")


def test_retained_graph_gives_the_same_gradients_twice():
    features, weight = head_inputs((2, 3, 8), 20)
    f, w = features.requires_grad_(), weight.requires_grad_()
    loss = linear_soft_cross_entropy(f, w, teacher_probs((2, 3, 20)), backend="cpu")
    first = torch.autograd.grad(loss, (f, w), retain_graph=True)
    second = torch.autograd.grad(loss, (f, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_double_backward_is_refused():
    features, weight = head_inputs((2, 3, 8), 20)
    f, w = features.requires_grad_(), weight.requires_grad_()
    loss = linear_soft_cross_entropy(f, w, teacher_probs((2, 3, 20)), backend="cpu")
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, f, create_graph=True)


def test_compiles_without_graph_breaks():
    features, weight = head_inputs((2, 3, 8), 20)
    teacher = teacher_probs((2, 3, 20))
    fn = torch.compile(lambda f, w: linear_soft_cross_entropy(f, w, teacher, ignore_diagonal=True, backend="cpu"),
                       fullgraph=True, backend="aot_eager")
    f, w = features.requires_grad_(), weight.requires_grad_()
    loss = fn(f, w)
    loss.backward()
    ref = oracle_grads(features, weight, teacher, upstream=1.0, ignore_diagonal=True)
    assert rel_err(loss, ref[0]) < 1e-5 and rel_err(f.grad, ref[1]) < 1e-5 and rel_err(w.grad, ref[2]) < 1e-5


@pytest.mark.parametrize("args,kwargs,error,match", [
    (((2, 3, 8), (20, 7), (2, 3, 20)), {}, ValueError, r"weight must have shape \(K, d\) with d = 8"),
    (((4, 5), (5, 11), (4, 11)), {}, ValueError,
     r"weight must have shape \(K, d\) with d = 5 \(the last dim of features \(4, 5\)\), got \(5, 11\)"),
    (((2, 3, 8), (20, 8, 1), (2, 3, 20)), {}, ValueError, r"weight must be 2-D \(K, d\)"),
    (((2, 3, 8), (20, 8), (2, 3, 21)), {}, ValueError, "agree on B = 3 and K = 20"),
    (((2, 3, 8), (20, 8), (3, 20)), {}, ValueError, r"teacher_probs must be 3-D \(T, B, K\)"),
    (((2, 3, 8), (20, 8), (2, 3, 20)), {"max_chunk_logits": 0}, ValueError, "max_chunk_logits must be >= 1"),
    (((2, 3, 8), (20, 8), (2, 3, 20)), {"max_chunk_logits": 2.5}, TypeError,
     "max_chunk_logits must be an int or None, got float"),
    (((2, 3, 8), (20, 8), (2, 3, 20)), {"max_chunk_logits": "4096"}, TypeError,
     "max_chunk_logits must be an int or None, got str"),
    (((3, 8), (20, 8), (3, 20)), {"weights": torch.rand(3, requires_grad=True)}, ValueError,
     "weights must not require grad"),
    (((1, 3, 8), (20, 8), (1, 3, 20)), {"ignore_diagonal": True}, ValueError, "leaves no pair"),
])
def test_bad_input(args, kwargs, error, match):
    f_shape, w_shape, t_shape = args
    with pytest.raises(error, match=match):
        linear_soft_cross_entropy(torch.randn(f_shape), torch.randn(w_shape), teacher_probs(t_shape), **kwargs)


def test_bad_dtypes_and_teacher_gradient():
    features, weight = head_inputs((2, 3, 8), 20)
    teacher = teacher_probs((2, 3, 20))
    with pytest.raises(TypeError, match="weight and features must have the same dtype"):
        linear_soft_cross_entropy(features, weight.double(), teacher)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        linear_soft_cross_entropy(features, weight.long(), teacher)
    with pytest.raises(ValueError, match="teacher_probs must not require grad"):
        linear_soft_cross_entropy(features, weight, teacher.requires_grad_())


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["dino_global", "dino_local", "ibot"])
def test_gpu_bf16_matches_oracle(form, poisoned_cuda_cache):
    """bf16 on the GPU, as the trainer runs both heads' last layers, at ViT-L's recipe (bottleneck
    256, K = 65,536): DINO's 2 global crops without the diagonal and 8 local crops against the 2
    teacher crops (B = 32), and iBOT's M = 1200 masked tokens with per-token weights (78.6M logits:
    two chunks of the default 2^26). Against the float64 oracle with the logits rounded to bf16
    (oracle_grads_half_logits); the rest of the error is the bf16 rounding of the logits' gradient
    and of the products (~3e-3 measured on the cpu backend)."""
    d, K = 256, 65536
    if form == "ibot":
        M = 1200
        features, weight = head_inputs((M, d), K, torch.bfloat16)
        teacher, kwargs = teacher_probs((M, K)), {"weights": torch.rand(M) * 2 / M}
    else:
        S, T, B = (2, 2, 32) if form == "dino_global" else (8, 2, 32)
        features, weight = head_inputs((S, B, d), K, torch.bfloat16)
        teacher, kwargs = teacher_probs((T, B, K)), {"ignore_diagonal": form == "dino_global"}
    features, weight, teacher = features.cuda(), weight.cuda(), teacher.cuda()
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    got = fused_grads(features, weight, teacher, "triton", **kwargs)
    want = oracle_grads_half_logits(features, weight, teacher, upstream=2.5, **kwargs)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for name, g, r in zip(("loss", "d features", "d weight"), got, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 1e-2, (name, rel_err(g, r))
