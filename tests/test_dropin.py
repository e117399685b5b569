"""The drop-in promise, module by module: DINOv3's constructor, method and forward signatures, its
state_dict, and its numbers where the op tests do not already pin them down.

Facts come from DINOv3's sources: dinov3/loss/{dino_clstoken_loss, ibot_patch_loss, koleo_loss,
gram_loss}.py and dinov3/layers/attention.py. The oracles below restate each formula in float64
in our own words (the op tests hold the statement-by-statement transcriptions).
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

import dinov3_fast
from oracle import rel_err

SOFT_CE_BACKENDS = ["cpu", "triton", "reference"]
REQUIRED = inspect.Parameter.empty

# DINOv3's parameters (name, default) after self, in order. Ours may add optional ones after them.
DINOV3_SIGNATURES = {
    (dinov3_fast.GramLoss, "__init__"): [("apply_norm", True), ("img_level", True), ("remove_neg", True),
                                         ("remove_only_teacher_neg", False)],
    (dinov3_fast.GramLoss, "forward"): [("output_feats", REQUIRED), ("target_feats", REQUIRED), ("img_level", True)],
    (dinov3_fast.KoLeoLoss, "__init__"): [],
    (dinov3_fast.KoLeoLoss, "forward"): [("student_output", REQUIRED), ("eps", 1e-8)],
    (dinov3_fast.KoLeoLoss, "pairwise_NNs_inner"): [("x", REQUIRED)],
    (dinov3_fast.KoLeoLossDistributed, "__init__"): [("topk", 1), ("loss_group_size", None)],
    (dinov3_fast.KoLeoLossDistributed, "forward"): [("student_output", REQUIRED), ("eps", 1e-8)],
    (dinov3_fast.KoLeoLossDistributed, "pairwise_NNs_inner"): [("x", REQUIRED), ("all_x", REQUIRED),
                                                               ("rank", REQUIRED)],
    (dinov3_fast.DINOLoss, "__init__"): [("out_dim", REQUIRED), ("student_temp", 0.1), ("center_momentum", 0.9)],
    (dinov3_fast.DINOLoss, "init_weights"): [],
    (dinov3_fast.DINOLoss, "softmax_center_teacher"): [("teacher_output", REQUIRED), ("teacher_temp", REQUIRED),
                                                       ("update_centers", True)],
    (dinov3_fast.DINOLoss, "sinkhorn_knopp_teacher"): [("teacher_output", REQUIRED), ("teacher_temp", REQUIRED),
                                                       ("n_iterations", 3)],
    (dinov3_fast.DINOLoss, "forward"): [("student_logits", REQUIRED), ("teacher_probs", REQUIRED),
                                        ("ignore_diagonal", False)],
    (dinov3_fast.DINOLoss, "update_center"): [("teacher_output", REQUIRED)],
    (dinov3_fast.DINOLoss, "reduce_center_update"): [("teacher_output", REQUIRED)],
    (dinov3_fast.DINOLoss, "apply_center_update"): [],
    (dinov3_fast.SinkhornKnoppTeacher, "__init__"): [],
    (dinov3_fast.SinkhornKnoppTeacher, "forward"): [("teacher_output", REQUIRED), ("teacher_temp", REQUIRED),
                                                    ("n_masked_patches_tensor", REQUIRED), ("n_iterations", 3)],
    (dinov3_fast.iBOTPatchLoss, "__init__"): [("patch_out_dim", REQUIRED), ("student_temp", 0.1),
                                              ("center_momentum", 0.9)],
    (dinov3_fast.iBOTPatchLoss, "init_weights"): [],
    (dinov3_fast.iBOTPatchLoss, "softmax_center_teacher"): [("teacher_patch_tokens", REQUIRED),
                                                            ("teacher_temp", REQUIRED), ("update_centers", True)],
    (dinov3_fast.iBOTPatchLoss, "forward"): [("student_patch_tokens", REQUIRED), ("teacher_patch_tokens", REQUIRED),
                                             ("student_masks_flat", REQUIRED)],
    (dinov3_fast.iBOTPatchLoss, "forward_masked"): [
        ("student_patch_tokens_masked", REQUIRED), ("teacher_patch_tokens_masked", REQUIRED),
        ("student_masks_flat", REQUIRED), ("n_masked_patches", None), ("masks_weight", None)],
    (dinov3_fast.iBOTPatchLoss, "update_center"): [("teacher_patch_tokens", REQUIRED)],
    (dinov3_fast.iBOTPatchLoss, "reduce_center_update"): [("teacher_patch_tokens", REQUIRED)],
    (dinov3_fast.iBOTPatchLoss, "apply_center_update"): [],
    (dinov3_fast.SelfAttention, "__init__"): [
        ("dim", REQUIRED), ("num_heads", 8), ("qkv_bias", False), ("proj_bias", True), ("attn_drop", 0.0),
        ("proj_drop", 0.0), ("mask_k_bias", False), ("device", None)],
    (dinov3_fast.SelfAttention, "apply_rope"): [("q", REQUIRED), ("k", REQUIRED), ("rope", REQUIRED)],
    (dinov3_fast.SelfAttention, "forward"): [("x", REQUIRED), ("attn_bias", None), ("rope", None)],
    (dinov3_fast.SelfAttention, "forward_list"): [("x_list", REQUIRED), ("attn_bias", None), ("rope_list", None)],
    (dinov3_fast.SelfAttention, "compute_attention"): [("qkv", REQUIRED), ("attn_bias", None), ("rope", None)],
}


@pytest.mark.parametrize("cls,method", list(DINOV3_SIGNATURES), ids=lambda v: getattr(v, "__name__", v))
def test_signatures_extend_dinov3s(cls, method):
    """DINOv3's parameters come first, with its names, kinds and defaults, so positional and keyword
    calls written for DINOv3 bind the same way; what we add after them is optional."""
    params = list(inspect.signature(getattr(cls, method)).parameters.values())[1:]
    want = DINOV3_SIGNATURES[(cls, method)]
    got = [(p.name, p.default) for p in params[:len(want)]]
    assert got == want
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:len(want)])
    assert all(p.default is not REQUIRED for p in params[len(want):]), "added parameters must be optional"


# DINOv3's attributes, set in __init__ (a drop-in's users read them, e.g. .center_momentum).
DINOV3_ATTRIBUTES = [
    (lambda: dinov3_fast.GramLoss(), ["apply_norm", "remove_neg", "remove_only_teacher_neg"]),
    (lambda: dinov3_fast.KoLeoLossDistributed(topk=2, loss_group_size=8), ["topk", "loss_group_size"]),
    (lambda: dinov3_fast.DINOLoss(7), ["student_temp", "center_momentum", "updated", "reduce_handle",
                                       "len_teacher_output", "async_batch_center"]),
    (lambda: dinov3_fast.iBOTPatchLoss(7), ["student_temp", "center_momentum", "updated", "reduce_handle",
                                            "len_teacher_patch_tokens", "async_batch_center",
                                            "sinkhorn_knopp_teacher"]),
    (lambda: dinov3_fast.SelfAttention(16, 2), ["num_heads", "scale", "qkv", "attn_drop", "proj", "proj_drop"]),
]


@pytest.mark.parametrize("make,names", DINOV3_ATTRIBUTES)
def test_dinov3_attributes(make, names):
    module = make()
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing


def test_state_dicts_are_dinov3s_and_a_dinov3_checkpoint_loads():
    """DINOv3's SSLMetaArch saves `dino_loss.center` (1, K) and `ibot_patch_loss.center` (1, 1, K);
    its Gram, KoLeo and SinkhornKnoppTeacher modules hold no state."""
    K = 12

    class Losses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dino_loss = dinov3_fast.DINOLoss(K)
            self.ibot_patch_loss = dinov3_fast.iBOTPatchLoss(K)
            self.koleo_loss = dinov3_fast.KoLeoLossDistributed()
            self.gram_loss = dinov3_fast.GramLoss()

    losses = Losses()
    assert {k: tuple(v.shape) for k, v in losses.state_dict().items()} == {
        "dino_loss.center": (1, K), "ibot_patch_loss.center": (1, 1, K)}
    for module in (dinov3_fast.KoLeoLoss(), dinov3_fast.SinkhornKnoppTeacher()):
        assert not module.state_dict()
    ckpt = {"dino_loss.center": torch.randn(1, K), "ibot_patch_loss.center": torch.randn(1, 1, K)}
    losses.load_state_dict(ckpt, strict=True)
    for name, value in ckpt.items():
        assert torch.equal(losses.state_dict()[name], value)
    # the loaded centre is what the next centring subtracts, and stays a buffer after an EMA step
    x = torch.randn(5, K)
    torch.testing.assert_close(losses.dino_loss.softmax_center_teacher(x, 0.07),
                               F.softmax((x - ckpt["dino_loss.center"]) / 0.07, dim=-1))
    losses.dino_loss.update_center(x)
    losses.dino_loss.apply_center_update()
    assert set(dict(losses.dino_loss.named_buffers())) == {"center"}


def test_ibot_centring_takes_dinov3s_keyword():
    """DINOv3 names iBOT's first argument teacher_patch_tokens (DINOLoss's: teacher_output)."""
    ibot = dinov3_fast.iBOTPatchLoss(10)
    ibot.init_weights()
    tokens = torch.randn(3, 4, 10)
    out = ibot.softmax_center_teacher(teacher_patch_tokens=tokens, teacher_temp=0.05, update_centers=False)
    torch.testing.assert_close(out, F.softmax(tokens / 0.05, dim=-1))
    dino = dinov3_fast.DINOLoss(10)
    dino.init_weights()
    out = dino.softmax_center_teacher(teacher_output=tokens[0], teacher_temp=0.05, update_centers=False)
    torch.testing.assert_close(out, F.softmax(tokens[0] / 0.05, dim=-1))


# ----------------------------------------------------------------------------- float64 oracles

def cross_entropy_rows(student, teacher, temp):
    """-sum_k teacher_k log softmax(student / temp)_k per row: only the student is divided."""
    return -(teacher.double() * F.log_softmax(student.double() / temp, dim=-1)).sum(-1)


def dino_oracle(student, teacher, temp, ignore_diagonal):
    """Mean over the counted (student crop, teacher crop, sample) triples; with ignore_diagonal the
    pairs s == t are not counted (min(S, T) of them)."""
    S, T = student.shape[0], teacher.shape[0]
    per_triple = cross_entropy_rows(student[:, None], teacher[None], temp)  # (S, T, B)
    counted = ~torch.eye(S, T, dtype=torch.bool) if ignore_diagonal else torch.ones(S, T, dtype=torch.bool)
    return per_triple[counted].mean()


def ibot_oracle(student, teacher, masks, temp):
    """Per image, the mean loss over its masked tokens (an image without any: 0); then the mean."""
    per_token = cross_entropy_rows(student, teacher, temp)
    per_image = (per_token * masks).sum(-1) / masks.sum(-1).clamp(min=1)
    return per_image.mean()


def ibot_masked_oracle(student, teacher, masks, temp, n_masked_patches=None, masks_weight=None):
    """The masked tokens' losses, each weighted by masks_weight (default 1 / its image's masked
    count), summed, divided by the number of images."""
    per_token = cross_entropy_rows(student, teacher, temp)
    if n_masked_patches is not None:
        per_token = per_token[:int(n_masked_patches)]
    if masks_weight is None:
        counts = masks.sum(-1, keepdim=True).expand_as(masks)
        masks_weight = 1.0 / counts[masks].double()
    return (per_token * masks_weight.double()).sum() / masks.shape[0]


@pytest.mark.parametrize("backend", SOFT_CE_BACKENDS)
@pytest.mark.parametrize("temp", [0.2, 0.04])
def test_student_temperature_and_unnormalised_teacher_rows(backend, temp):
    """A non-default student_temp divides the student logits only, and the cross-entropy is linear in
    the teacher rows: DINOv3's formulas do not assume rows that sum to 1 (bf16 rounding, the caller's
    weights), so neither may ours."""
    K = 37
    dino = dinov3_fast.DINOLoss(K, student_temp=temp, backend=backend)
    s = torch.randn(3, 4, K, requires_grad=True)
    t = torch.rand(2, 4, K) * 0.2
    s64 = s.detach().double().requires_grad_()
    for ignore in (False, True):
        out, want = dino(s, t, ignore_diagonal=ignore), dino_oracle(s64, t, temp, ignore)
        assert rel_err(out, want) < 1e-5
        assert rel_err(torch.autograd.grad(out, s)[0], torch.autograd.grad(want, s64)[0]) < 1e-5

    ibot = dinov3_fast.iBOTPatchLoss(K, student_temp=temp, backend=backend)
    masks = torch.rand(3, 5) < 0.5
    masks[0, 1], masks[2] = True, False
    s = torch.randn(3, 5, K, requires_grad=True)
    t = torch.rand(3, 5, K) * 0.2
    s64 = s.detach().double().requires_grad_()
    out, want = ibot(s, t, masks), ibot_oracle(s64, t, masks, temp)
    assert rel_err(out, want) < 1e-5
    assert rel_err(torch.autograd.grad(out, s)[0], torch.autograd.grad(want, s64)[0]) < 1e-5

    n = int(masks.sum())
    sm, tm = s.detach()[masks].requires_grad_(), t[masks]
    sm64 = sm.detach().double().requires_grad_()
    for kwargs in ({}, {"n_masked_patches": n, "masks_weight": torch.rand(n)}):
        out, want = ibot.forward_masked(sm, tm, masks, **kwargs), ibot_masked_oracle(sm64, tm, masks, temp, **kwargs)
        assert rel_err(out, want) < 1e-5
        assert rel_err(torch.autograd.grad(out, sm)[0], torch.autograd.grad(want, sm64)[0]) < 1e-5


def sinkhorn_oracle(logits, temp, n_iterations, n_samples):
    """Alternate: every prototype's total mass 1/K, every sample's 1/n_samples; then scale samples
    to 1. Returns (B, K)."""
    q = torch.exp(logits.double() / temp).T  # (K, B)
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(1, keepdim=True) / q.shape[0]
        q = q / q.sum(0, keepdim=True) / n_samples
    return (q * n_samples).T


@pytest.mark.parametrize("n_iterations", [1, 5])
def test_sinkhorn_modules_teacher_temperature_and_iterations(n_iterations):
    """Both Sinkhorn-Knopp entry points with their non-default arguments; fp16 logits give fp32
    assignments, as DINOv3's .float() does."""
    logits = torch.randn(9, 41) * 2
    want = sinkhorn_oracle(logits, 0.03, n_iterations, 9)
    dino = dinov3_fast.DINOLoss(41).sinkhorn_knopp_teacher(logits, teacher_temp=0.03, n_iterations=n_iterations)
    ibot = dinov3_fast.iBOTPatchLoss(41).sinkhorn_knopp_teacher(
        logits, teacher_temp=0.03, n_masked_patches_tensor=torch.tensor([9]), n_iterations=n_iterations)
    for out in (dino, ibot):
        assert out.shape == (9, 41) and out.dtype == torch.float32 and not out.requires_grad
        assert rel_err(out, want) < 1e-5
    half = dinov3_fast.DINOLoss(41).sinkhorn_knopp_teacher(logits.half(), 0.03, n_iterations)
    assert half.dtype == torch.float32
    assert rel_err(half, sinkhorn_oracle(logits.half(), 0.03, n_iterations, 9)) < 1e-5


def gram_oracle(student, teacher, apply_norm, img_level, remove_neg, remove_only_teacher_neg):
    """Mean squared difference of the patch Gram matrices: per image (img_level, (B, P, D) inputs)
    or over all tokens of the batch ((B, P, D) flattened, or (N, D)). remove_neg clamps both Grams
    at 0; remove_only_teacher_neg clamps the teacher's and zeroes the student's entries only where
    both are negative."""
    def gram(x):
        x = x.double()
        if apply_norm:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if not img_level:
            x = x.reshape(-1, x.shape[-1])
        return x @ x.transpose(-1, -2)

    s, t = gram(student), gram(teacher)
    if remove_neg:
        s, t = s.clamp(min=0), t.clamp(min=0)
    elif remove_only_teacher_neg:
        s = torch.where((s < 0) & (t < 0), 0.0, s)
        t = t.clamp(min=0)
    return ((s - t) ** 2).mean()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("options", [
    dict(apply_norm=True, remove_neg=True, remove_only_teacher_neg=False),
    dict(apply_norm=True, remove_neg=False, remove_only_teacher_neg=True),
    dict(apply_norm=False, remove_neg=False, remove_only_teacher_neg=False),
    dict(apply_norm=False, remove_neg=True, remove_only_teacher_neg=False),
], ids=["norm_remove_neg", "norm_teacher_neg", "raw", "raw_remove_neg"])
@pytest.mark.parametrize("form", ["image", "batch_3d", "tokens_2d"])
def test_gram_module_options_and_forms(backend, options, form):
    """Every constructor option through the module, and the three inputs DINOv3's trainer passes:
    (B, P, D) per image, (B, P, D) over the batch (img_level=False), and the (N, D) selected tokens
    of gram.tokens_used = masked / unmasked (img_level=False)."""
    shape = (6 * 5, 8) if form == "tokens_2d" else (2, 7, 5)
    img_level = form == "image"
    s, t = torch.randn(shape, requires_grad=True), torch.randn(shape)
    out = dinov3_fast.GramLoss(img_level=img_level, backend=backend, **options)(s, t, img_level=img_level)
    s64 = s.detach().double().requires_grad_()
    want = gram_oracle(s64, t, img_level=img_level, **options)
    assert out.shape == () and out.dtype == torch.float32
    assert rel_err(out, want) < 1e-5
    assert rel_err(torch.autograd.grad(out, s)[0], torch.autograd.grad(want, s64)[0]) < 1e-5


def test_gram_forward_argument_decides_the_level():
    """DINOv3 does not keep the constructor's img_level: only forward's argument (default True) counts."""
    s, t = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    module = dinov3_fast.GramLoss(img_level=False)
    torch.testing.assert_close(module(s, t), dinov3_fast.GramLoss()(s, t))
    assert rel_err(module(s, t), gram_oracle(s, t, True, True, True, False)) < 1e-5


def koleo_oracle(x, eps, topk):
    """Normalise each row (norm clamped at eps); each row's topk nearest other rows (largest dot, its
    own entry scored -1); -mean log(||y_i - y_j + 1e-8|| + eps) over the (row, neighbour) pairs."""
    y = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(eps)
    with torch.no_grad():
        dots = y @ y.T
        dots.fill_diagonal_(-1)
        idx = dots.topk(topk, dim=1).indices
    d = (y[:, None, :] - y[idx] + 1e-8).norm(dim=-1)
    return -torch.log(d + eps).mean(), idx


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_koleo_modules_eps_and_topk(eps):
    x = torch.randn(11, 6, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    for module, topk in ((dinov3_fast.KoLeoLoss(), 1), (dinov3_fast.KoLeoLossDistributed(topk=3), 3)):
        out = module(x, eps=eps)
        want, _ = koleo_oracle(x64, eps, topk)
        assert out.shape == () and out.dtype == torch.float32
        assert rel_err(out, want) < 1e-5
        assert rel_err(torch.autograd.grad(out, x)[0], torch.autograd.grad(want, x64)[0]) < 1e-5


def test_koleo_pairwise_nns_inner():
    """DINOv3's neighbour search methods: KoLeoLoss's on normalised rows gives (n,) indices;
    KoLeoLossDistributed's scores this rank's rows against its loss group, `rank` being the rank's
    place in the group (its rows start at rank * n), and gives (n, topk), best first."""
    y = F.normalize(torch.randn(12, 5), dim=-1)
    _, idx = koleo_oracle(y, 1e-8, 1)
    got = dinov3_fast.KoLeoLoss().pairwise_NNs_inner(y)
    assert got.shape == (12,) and torch.equal(got, idx[:, 0])
    group = torch.cat([F.normalize(torch.randn(8, 5), dim=-1), y[:4], F.normalize(torch.randn(4, 5), dim=-1)])
    got = dinov3_fast.KoLeoLossDistributed(topk=3).pairwise_NNs_inner(y[:4], group, 2)
    dots = y[:4].double() @ group.double().T
    dots[torch.arange(4), torch.arange(8, 12)] = -1  # the rows' own entries
    assert got.shape == (4, 3) and torch.equal(got, dots.topk(3, dim=1).indices)
