"""The public ops in the execution contexts training and evaluation put them in: autocast,
no_grad / inference_mode, and torch.compile with dynamic shapes (fullgraph), on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import dinov3_fast
from dinov3_fast.ops import gram_loss, koleo_loss, linear_soft_cross_entropy, sinkhorn_knopp, soft_cross_entropy
from dinov3_fast.ops import apply_rope, rope_attention
from dinov3_fast.ops.linear_soft_ce.reference import linear_soft_cross_entropy_ref
from test_attention import dinov3_rope

ROPE = dinov3_rope(4, 4, 32)  # 16 patch tokens after 5 prefix tokens

FUSED = ("cpu", "triton")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def probs(shape) -> torch.Tensor:
    return torch.softmax(torch.randn(shape), dim=-1)


# (name, call(inputs, backend), inputs(): tensors, those meant to require grad already do)
OPS = {
    "gram_identity": (lambda a, bk: gram_loss(*a, backend=bk),  # D < P, nothing clamped: the D x D form
                      lambda: (torch.randn(2, 9, 6, requires_grad=True), torch.randn(2, 9, 6))),
    "gram_remove_neg": (lambda a, bk: gram_loss(*a, remove_neg=True, backend=bk),
                        lambda: (torch.randn(2, 9, 6, requires_grad=True), torch.randn(2, 9, 6, requires_grad=True))),
    "gram_teacher_neg": (lambda a, bk: gram_loss(*a, remove_only_teacher_neg=True, img_level=False, backend=bk),
                         lambda: (torch.randn(2, 9, 6, requires_grad=True), torch.randn(2, 9, 6))),
    "koleo": (lambda a, bk: koleo_loss(*a, topk=2, backend=bk), lambda: (torch.randn(7, 5, requires_grad=True),)),
    "soft_ce": (lambda a, bk: soft_cross_entropy(*a, ignore_diagonal=True, backend=bk),
                lambda: (torch.randn(3, 4, 37, requires_grad=True), probs((2, 4, 37)).requires_grad_())),
    "sinkhorn": (lambda a, bk: sinkhorn_knopp(*a, 0.05, backend=bk), lambda: (torch.randn(6, 37),)),
    # attention's cpu path ran its fp32 score and output products in bf16 (7.8e-3 off)
    "rope_attention": (lambda a, bk: rope_attention(a[0], ROPE, num_heads=2, backend=bk).square().mean(),
                       lambda: (torch.randn(2, 21, 3 * 2 * 32, requires_grad=True),)),
    "apply_rope": (lambda a, bk: sum(t.square().mean() for t in apply_rope(*a, ROPE, backend=bk)),
                   lambda: tuple(torch.randn(2, 2, 21, 32, requires_grad=True) for _ in range(2))),
}


def _run(op: str, backend: str, inputs, autocast: bool):
    """The op's output and its inputs' gradients, forward and backward both inside the autocast
    region when `autocast` (as the trainer calls loss.backward())."""
    call, _ = OPS[op]
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = call(xs, backend)
        if out.requires_grad:
            (3.0 * out).backward()
    return out, [x.grad for x in xs]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", sorted(OPS))
def test_fused_ops_compute_the_same_under_autocast(op, backend):
    """Autocast does not see the custom ops (their inputs pass uncast) but stayed on inside them,
    where it recast the torch matmuls of the cpu paths and launchers: Gram's identity products
    (loss and gradient off by ~1e-3), Sinkhorn's scaling matrix-vector products (~2e-3), the
    soft-CE teacher gradient's einsum (~2e-3), and Gram's tiled cpu path raised (a bf16 product
    into an fp32 out= buffer). Every fused backend must compute what it computes without autocast."""
    inputs = OPS[op][1]()
    want, want_grads = _run(op, backend, inputs, autocast=False)
    out, grads = _run(op, backend, inputs, autocast=True)
    assert out.dtype == want.dtype == torch.float32
    assert rel_err(out, want) <= 1e-6
    for grad, want_grad in zip(grads, want_grads):
        assert (grad is None) == (want_grad is None)
        if grad is not None:
            assert grad.dtype == want_grad.dtype
            assert rel_err(grad, want_grad) <= 1e-6


def _as_views(t: torch.Tensor):
    return t.mT.contiguous() if t.dim() >= 2 else t


def _from_views(t: torch.Tensor):
    return t.mT if t.dim() >= 2 else t


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", sorted(OPS))
def test_saved_tensors_may_come_back_as_views(op, backend):
    """A saved-tensor hook (offloading, compression) may hand a backward its saved tensors as
    strided views of the same values: here each is kept transposed and unpacked as a transposed
    view. The backward launchers index saved tensors as dense arrays; the KoLeo backwards read
    them in memory order (gradients off by 100-170%). Every op must give the same gradients."""
    inputs = OPS[op][1]()
    want, want_grads = _run(op, backend, inputs, autocast=False)
    with torch.autograd.graph.saved_tensors_hooks(_as_views, _from_views):
        out, grads = _run(op, backend, inputs, autocast=False)
    assert rel_err(out, want) <= 1e-6
    for grad, want_grad in zip(grads, want_grads):
        assert (grad is None) == (want_grad is None)
        if grad is not None:
            assert rel_err(grad, want_grad) <= 1e-6


def _head_loss(backend, features, weight, teacher, weights, dtype, loss_scale):
    """linear_soft_cross_entropy (or its reference) under CPU autocast to `dtype`, then a backward
    (outside autocast, as torch recommends) with a loss scale, as fp16 training does (GradScaler
    starts at 2^16); returns the loss and the unscaled gradients."""
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        if backend == "reference":
            loss = linear_soft_cross_entropy_ref(f, w, teacher, 0.1, False, weights)
        else:
            loss = linear_soft_cross_entropy(f, w, teacher, weights=weights, backend=backend)
    (loss * loss_scale).backward()
    return loss, f.grad / loss_scale, w.grad / loss_scale


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_soft_ce_under_autocast_matches_the_linear_it_replaces(backend, dtype):
    """fp32 features and last-layer weight under autocast: the Linear this op replaces runs in the
    autocast dtype, so the op must too, and get the fp16 treatment then. It used to receive the
    fp32 tensors and let autocast recast its matmuls inside, so in fp16 the logits' gradient was
    formed in fp16 at upstream gradient 1 and, at iBOT's per-token weights (1 / masked tokens /
    images) and K prototypes, underflowed to zero before the loss scale could reach it."""
    rows, dim, k = 6, 16, 512
    features = F.normalize(torch.randn(rows, dim), dim=-1)
    weight = torch.randn(k, dim) * 0.5
    teacher = probs((rows, k))
    weights = torch.full((rows,), 1e-7)  # d loss / d logit ~ 1e-7 / temp / K: below fp16's subnormals
    loss, d_f, d_w = _head_loss(backend, features, weight, teacher, weights, dtype, 2.0**16)
    ref_loss, ref_f, ref_w = _head_loss("reference", features, weight, teacher, weights, dtype, 2.0**16)
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert d_f.dtype == d_w.dtype == torch.float32
    assert rel_err(loss, ref_loss) <= 1e-2
    assert rel_err(d_f, ref_f) <= 1e-2
    assert rel_err(d_w, ref_w) <= 1e-2


@pytest.mark.parametrize("backend", ("reference", *FUSED))
@pytest.mark.parametrize("op", sorted(OPS))
def test_forward_only_under_inference_mode(op, backend):
    """Teacher-side and evaluation calls: inference tensors in, no graph out, and the value of a
    grad-mode call."""
    inputs = OPS[op][1]()
    want, _ = _run(op, backend, inputs, autocast=False)
    with torch.inference_mode():
        out = OPS[op][0]([x.detach().clone() for x in inputs], backend)
    assert not out.requires_grad
    torch.testing.assert_close(out, want.detach(), rtol=1e-6, atol=0)


def _ibot_masks(batch: int) -> torch.Tensor:
    masks = torch.zeros(batch, 5, dtype=torch.bool)
    masks[:, :2] = True
    masks[0, 4] = True  # images with different masked counts: different weights
    return masks


def test_ibot_forward_masked_compiles_with_derived_weights():
    """forward_masked without masks_weight derives the weights by boolean indexing (as DINOv3
    does), whose length is data-dependent: the check against the rows must not need its value
    while tracing (it was a guard on an unbacked size, which fullgraph refused)."""
    loss = dinov3_fast.iBOTPatchLoss(37, backend="cpu")
    compiled = torch.compile(loss.forward_masked, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (3, 4):
        masks = _ibot_masks(batch)
        rows = int(masks.sum())
        s, t = torch.randn(rows, 37, requires_grad=True), probs((rows, 37))
        torch.testing.assert_close(compiled(s, t, masks), loss.forward_masked(s, t, masks))
    masks = _ibot_masks(3)
    s, t = torch.randn(int(masks.sum()) - 1, 37), probs((int(masks.sum()) - 1, 37))
    with pytest.raises(Exception):  # eager names it (a ValueError); compiled it is a runtime assert
        compiled(s, t, masks)


DYNAMIC = {
    "gram": (lambda s, t: gram_loss(s, t, backend="cpu"),
             lambda b: (torch.randn(b, 9, 6, requires_grad=True), torch.randn(b, 9, 6))),
    "koleo": (lambda x: koleo_loss(x, backend="cpu"), lambda b: (torch.randn(b + 3, 5, requires_grad=True),)),
    "soft_ce": (lambda s, t: soft_cross_entropy(s, t, backend="cpu"),
                lambda b: (torch.randn(3, b, 37, requires_grad=True), probs((2, b, 37)))),
    "linear_soft_ce": (lambda f, w, t: linear_soft_cross_entropy(f, w, t, backend="cpu"),
                       lambda b: (torch.randn(3, b, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True),
                                  probs((2, b, 37)))),
    "sinkhorn": (lambda x: sinkhorn_knopp(x, 0.05, backend="cpu"), lambda b: (torch.randn(b + 1, 37),)),
}


@pytest.mark.parametrize("op", sorted(DYNAMIC))
def test_one_graph_for_every_batch_size(op):
    """torch.compile(fullgraph=True, dynamic=True) traces each public op once for varying batch
    sizes (no recompile per call), forward and backward."""
    fn, make = DYNAMIC[op]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (11, 12, 13):
        out = compiled(*make(batch))
        if out.requires_grad:
            out.backward()
    assert counters["stats"]["unique_graphs"] == 1


TEACHER_SIDE = {
    "gram_identity": lambda s, t, bk: gram_loss(s, t, backend=bk),
    "gram_remove_neg": lambda s, t, bk: gram_loss(s, t, remove_neg=True, backend=bk),
    "soft_ce": lambda s, t, bk: soft_cross_entropy(s, t, backend=bk),
}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", sorted(TEACHER_SIDE))
def test_teacher_made_under_inference_mode(op, backend):
    """A teacher (or Gram teacher) run under torch.inference_mode gives inference tensors, which
    DINOv3's modules take beside a student that requires grad; autograd refuses to save them, and
    the fused ops saved the teacher for their backward, so they raised. Also through a retained
    graph (Gram's second backward recomputes from the saved inputs)."""
    s = torch.randn(2, 9, 6) if op.startswith("gram") else torch.randn(3, 4, 37)
    t = torch.randn(2, 9, 6) if op.startswith("gram") else probs((2, 4, 37))
    want = s.clone().requires_grad_()
    TEACHER_SIDE[op](want, t, backend).backward()
    with torch.inference_mode():
        t_inf = t.clone()
    student = s.clone().requires_grad_()
    loss = TEACHER_SIDE[op](student, t_inf, backend)
    first = torch.autograd.grad(loss, student, retain_graph=True)[0]
    second = torch.autograd.grad(loss, student)[0]
    torch.testing.assert_close(first, want.grad)
    torch.testing.assert_close(second, want.grad)
