"""DINOLoss / iBOTPatchLoss drop-ins against DINOv3's code transcribed statement by statement."""
import math

import pytest
import torch
import torch.nn.functional as F

import dinov3_fast
from oracle import rel_err

BACKENDS = ["cpu", "triton", "reference"]


def dinov3_dino_forward(student_logits, teacher_probs, ignore_diagonal, student_temp=0.1):
    """DINOLoss.forward (dino_clstoken_loss.py)."""
    student_crops, B, K = student_logits.shape
    teacher_crops, _, _ = teacher_probs.shape
    student_logits = F.log_softmax(student_logits.double() / student_temp, dim=-1)
    if not ignore_diagonal:
        loss = -torch.einsum("s b k, t b k -> ", student_logits, teacher_probs)
        return loss / (B * student_crops * teacher_crops)
    loss = -torch.einsum("s b k, t b k -> s t", student_logits, teacher_probs)
    min_st = min(student_crops, teacher_crops)
    loss = torch.diagonal_scatter(loss, loss.new_zeros(min_st))
    return loss.sum() / (B * student_crops * teacher_crops - B * min_st)


def lossfunc(t, s, temp):
    return torch.sum(t.double() * F.log_softmax(s.double() / temp, dim=-1), dim=-1)


def dinov3_ibot_forward(s, t, masks, student_temp=0.1):
    """iBOTPatchLoss.forward."""
    loss = lossfunc(t, s, student_temp)
    loss = torch.sum(loss * masks.double(), dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
    return -loss.mean()


def dinov3_ibot_forward_masked(s, t, masks, n_masked_patches=None, masks_weight=None, student_temp=0.1):
    """iBOTPatchLoss.forward_masked."""
    loss = lossfunc(t, s, student_temp)
    if masks_weight is None:
        masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    loss = loss * masks_weight
    return -loss.sum() / masks.shape[0]


def probs(shape):
    return torch.softmax(torch.randn(shape) * 3, dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,T,ignore", [(4, 2, True), (2, 2, True), (3, 2, False), (2, 3, True)])
def test_dino_forward(backend, S, T, ignore):
    loss_fn = dinov3_fast.DINOLoss(130, backend=backend)
    s = torch.randn(S, 5, 130, requires_grad=True)
    t = probs((T, 5, 130))
    out = loss_fn(s, t, ignore_diagonal=ignore)
    s64 = s.detach().double().requires_grad_()
    want = dinov3_dino_forward(s64, t.double(), ignore)
    assert rel_err(out, want) < 1e-5
    assert rel_err(torch.autograd.grad(out, s)[0], torch.autograd.grad(want, s64)[0]) < 1e-5
    assert rel_err(loss_fn(list(s.unbind(0)), list(t.unbind(0)), ignore_diagonal=ignore), want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_forward(backend):
    B, N, K = 3, 7, 90
    masks = torch.rand(B, N) < 0.5
    masks[1] = False  # an image with no masked token: clamp(min=1)
    s, t = torch.randn(B, N, K, requires_grad=True), probs((B, N, K))
    out = dinov3_fast.iBOTPatchLoss(K, backend=backend)(s, t, masks)
    s64 = s.detach().double().requires_grad_()
    want = dinov3_ibot_forward(s64, t, masks)
    assert rel_err(out, want) < 1e-5
    assert rel_err(torch.autograd.grad(out, s)[0], torch.autograd.grad(want, s64)[0]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["default_weights", "tensor_count_and_weights", "int_count"])
def test_ibot_forward_masked(backend, variant):
    B, N, K = 4, 6, 75
    masks = torch.rand(B, N) < 0.4
    masks[0, 0] = True
    n = int(masks.sum())
    upper = n + 3  # DINOv3 pads the gathered tokens to an upper bound
    s, t = torch.randn(upper, K, requires_grad=True), probs((upper, K))
    kwargs = {}
    if variant == "tensor_count_and_weights":
        kwargs = {"n_masked_patches": torch.tensor([n]), "masks_weight": torch.rand(n)}
    elif variant == "int_count":
        kwargs = {"n_masked_patches": n}
    else:
        s, t = s[:n].detach().requires_grad_(), t[:n]
    out = dinov3_fast.iBOTPatchLoss(K, backend=backend).forward_masked(s, t, masks, **kwargs)
    s64 = s.detach().double().requires_grad_()
    ref_kwargs = {k: (int(v) if k == "n_masked_patches" else v) for k, v in kwargs.items()}
    want = dinov3_ibot_forward_masked(s64, t, masks, **ref_kwargs)
    assert rel_err(out, want) < 1e-5
    g, g_ref = torch.autograd.grad(out, s)[0], torch.autograd.grad(want, s64)[0]
    assert rel_err(g, g_ref) < 1e-5 and (g[n:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True])
def test_ibot_forward_masked_without_masked_patch(backend, padded):
    """A rank with no masked patch: DINOv3's empty sum, 0, still differentiable back through the
    head (zero gradients, not None), so the head's backward runs on this rank as on the others."""
    B, N, K = 4, 6, 75
    head = torch.nn.Linear(16, K)
    rows = 3 if padded else 0  # DINOv3 pads the gathered tokens to an upper bound
    s, t = head(torch.randn(rows, 16)), probs((rows, K))
    masks = torch.zeros(B, N, dtype=torch.bool)
    kwargs = {"n_masked_patches": torch.tensor([0]), "masks_weight": torch.rand(0)} if padded else {}
    out = dinov3_fast.iBOTPatchLoss(K, backend=backend).forward_masked(s, t, masks, **kwargs)
    assert out.shape == () and out.dtype == torch.float32 and out.item() == 0.0
    out.backward()
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))
    assert torch.equal(head.bias.grad, torch.zeros_like(head.bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_forms_equal_the_last_layer_then_the_loss(backend):
    """forward_linear / forward_masked_linear (the head's last layer fused with the loss) give
    DINOv3's loss of F.linear(features, weight), with its gradients for both."""
    d, K = 12, 90
    weight = torch.randn(K, d, requires_grad=True)
    feats = F.normalize(torch.randn(4, 5, d), dim=-1).requires_grad_()
    t = probs((2, 5, K))
    out = dinov3_fast.DINOLoss(K, backend=backend).forward_linear(feats, weight, t, ignore_diagonal=True)
    f64, w64 = feats.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = dinov3_dino_forward(F.linear(f64, w64), t.double(), True)
    assert rel_err(out, want) < 1e-5
    for g, r in zip(torch.autograd.grad(out, (feats, weight)), torch.autograd.grad(want, (f64, w64))):
        assert rel_err(g, r) < 1e-5
    masks = torch.rand(3, 6) < 0.5
    masks[0, 0] = True
    n = int(masks.sum())
    tokens = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    t = probs((n, K))
    out = dinov3_fast.iBOTPatchLoss(K, backend=backend).forward_masked_linear(tokens, weight, t, masks)
    x64 = tokens.detach().double().requires_grad_()
    want = dinov3_ibot_forward_masked(F.linear(x64, w64), t, masks)
    assert rel_err(out, want) < 1e-5
    for g, r in zip(torch.autograd.grad(out, (tokens, weight)), torch.autograd.grad(want, (x64, w64))):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_masked_form_without_masked_patch_still_reaches_the_last_layer(backend):
    """M = 0: 0, with a zero gradient (not None) for the last layer too, so FSDP2 reduces the same
    parameters on this rank as on the others."""
    weight = torch.randn(75, 16, requires_grad=True)
    feats = torch.randn(0, 16, requires_grad=True)
    out = dinov3_fast.iBOTPatchLoss(75, backend=backend).forward_masked_linear(
        feats, weight, probs((0, 75)), torch.zeros(4, 6, dtype=torch.bool))
    assert out.shape == () and out.dtype == torch.float32 and out.item() == 0.0
    out.backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_ibot_forward_bad_input():
    """Errors name the argument the caller passed and the expected shape (not the op's internals)."""
    loss, masks = dinov3_fast.iBOTPatchLoss(11), torch.rand(3, 4) < 0.5
    s, t = torch.randn(3, 4, 11), probs((3, 4, 11))
    with pytest.raises(ValueError, match=r"student_patch_tokens and teacher_patch_tokens must have the same shape, "
                                         r"got \(3, 4, 11\) and \(3, 4, 10\)"):
        loss(s, probs((3, 4, 10)), masks)
    with pytest.raises(ValueError, match=r"student_patch_tokens must be 3-D \(B, N, K\), got shape \(12, 11\)"):
        loss(s.flatten(0, 1), t.flatten(0, 1), masks)
    with pytest.raises(ValueError, match=r"student_masks_flat must have shape \(B, N\) = \(3, 4\), got \(3, 3\)"):
        loss(s, t, masks[:, :3])


def test_ibot_forward_masked_bad_input():
    loss = dinov3_fast.iBOTPatchLoss(11)
    masks = torch.zeros(3, 4, dtype=torch.bool)
    masks[:, :2] = True  # 6 masked patches
    s, t = torch.randn(6, 11), probs((6, 11))
    with pytest.raises(TypeError, match=r"student_masks_flat must be a bool \(B, N\) mask, got torch.int64"):
        loss.forward_masked(s, t, masks.long())
    with pytest.raises(ValueError, match="student_masks_flat marks 6 patches but student_patch_tokens_masked has "
                                         "5 rows"):
        loss.forward_masked(s[:5], t[:5], masks)
    with pytest.raises(ValueError, match=r"masks_weight must have shape \(M,\) = \(6,\), got \(4,\)"):
        loss.forward_masked(s, t, masks, masks_weight=torch.rand(4))
    with pytest.raises(ValueError, match=r"student_patch_tokens_masked and teacher_patch_tokens_masked must have the "
                                         r"same shape, got \(6, 11\) and \(6, 10\)"):
        loss.forward_masked(s, probs((6, 10)), masks)
    with pytest.raises(ValueError, match=r"student_features_masked \(5, 8\) and teacher_patch_tokens_masked "
                                         r"\(6, 11\) must have the same number of rows"):
        loss.forward_masked_linear(torch.randn(5, 8), torch.randn(11, 8), t, masks)


@pytest.mark.parametrize("cls,dim_shape", [(dinov3_fast.DINOLoss, (1, 40)), (dinov3_fast.iBOTPatchLoss, (1, 1, 40))])
def test_center_state_and_softmax_centering(cls, dim_shape):
    mod = cls(40, center_momentum=0.8)
    assert mod.center.shape == dim_shape and torch.isnan(mod.center).all() and "center" in mod.state_dict()
    mod.init_weights()
    x = torch.randn(6, 40) if cls is dinov3_fast.DINOLoss else torch.randn(6, 5, 40)
    torch.testing.assert_close(mod.softmax_center_teacher(x, 0.07), F.softmax(x / 0.07, dim=-1))
    mod.update_center(x)
    assert not mod.updated
    batch_center = x.mean(0, keepdim=True) if cls is dinov3_fast.DINOLoss else x.mean(1).mean(0, keepdim=True)
    want_center = batch_center * 0.2
    y = torch.randn_like(x)
    torch.testing.assert_close(mod.softmax_center_teacher(y, 0.05), F.softmax((y - want_center) / 0.05, dim=-1))
    assert mod.updated
    torch.testing.assert_close(mod.center, want_center.reshape(dim_shape))
    z = torch.randn_like(x) + 1.0  # a pending update that would move the centre
    mod.update_center(z)
    assert not mod.updated
    out = mod.softmax_center_teacher(y, 0.05, update_centers=False)  # pending update not applied
    torch.testing.assert_close(out, F.softmax((y - want_center) / 0.05, dim=-1))
    torch.testing.assert_close(mod.center, want_center.reshape(dim_shape))
    assert not mod.updated
    z_center = z.mean(0, keepdim=True) if cls is dinov3_fast.DINOLoss else z.mean(1).mean(0, keepdim=True)
    next_center = want_center * 0.8 + z_center * 0.2
    out = mod.softmax_center_teacher(y, 0.05)  # the next default call applies it
    torch.testing.assert_close(out, F.softmax((y - next_center) / 0.05, dim=-1))
    torch.testing.assert_close(mod.center, next_center.reshape(dim_shape))
    assert mod.updated


def test_teacher_methods():
    logits = torch.randn(6, 50)
    from dinov3_fast.ops.sinkhorn import sinkhorn_knopp_ref
    want = sinkhorn_knopp_ref(logits.double(), 0.07, 3)
    assert rel_err(dinov3_fast.DINOLoss(50).sinkhorn_knopp_teacher(logits, 0.07, n_iterations=3), want) < 1e-5
    ibot = dinov3_fast.iBOTPatchLoss(50)
    assert isinstance(ibot.sinkhorn_knopp_teacher, dinov3_fast.SinkhornKnoppTeacher)
    out = ibot.sinkhorn_knopp_teacher(logits, 0.07, n_masked_patches_tensor=torch.tensor([6]), n_iterations=3)
    assert rel_err(out, want) < 1e-5
    assert math.isclose(out.sum().item(), 6.0, rel_tol=1e-5)


def test_a_one_rank_group_runs_the_single_process_paths(monkeypatch):
    """One GPU trains under FSDP2 on a group of one rank: the losses treat it as no group (nothing to
    reduce), so Sinkhorn keeps its one-launch cuda kernel on a GPU and no collective runs."""
    import torch.distributed as dist

    from dinov3_fast.nn import _loss_group
    from dinov3_fast.ops.koleo import koleo_loss
    from dinov3_fast.ops.sinkhorn import sinkhorn_knopp

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective ran on a 1-rank group")

    logits, x = torch.randn(12, 40), torch.randn(10, 16)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        world = dist.group.WORLD
        assert _loss_group(None) is None and _loss_group(world) is None
        expected = [sinkhorn_knopp(logits, 0.07, backend=b) for b in BACKENDS]
        expected_koleo = koleo_loss(x)
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
            monkeypatch.setattr(dist, name, no_collective)
        for b, want in zip(BACKENDS, expected):
            assert torch.equal(sinkhorn_knopp(logits, 0.07, group=world, backend=b), want), b
        assert torch.equal(koleo_loss(x, group=world), expected_koleo)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
